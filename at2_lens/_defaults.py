"""Defaults shared by the library and the ``at2-lens`` command line, defined once (a light module: no torch)."""

from __future__ import annotations

DEFAULT_MAX_NEW_TOKENS = 64
"""The generation budget (tokens) when a response is generated: the default of every ``max_new_tokens`` argument
and of every ``at2-lens`` command's ``--max-new-tokens``."""

# Provisional, not yet measured: benchmarks/bench_context_pruning.py --splits train,held_out chooses the mass share per
# method on the training split of the SQuAD paragraphs (never on the held-out split); that run has not been made yet,
# and this constant is to be set to its choice for AT2 then.
DEFAULT_MASS = 0.8
"""The share of the positive score mass that context pruning keeps when no rule is given: the default of
``at2_lens.pruning.prune_and_reanswer`` and of ``at2-lens prune`` (re-exported as ``at2_lens.pruning.DEFAULT_MASS``)."""

__all__ = ["DEFAULT_MASS", "DEFAULT_MAX_NEW_TOKENS"]
