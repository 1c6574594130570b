"""Defaults shared by the library and the ``at2-lens`` command line, defined once (a light module: no torch)."""

from __future__ import annotations

DEFAULT_MAX_NEW_TOKENS = 64
"""The generation budget (tokens) when a response is generated: the default of every ``max_new_tokens`` argument
and of every ``at2-lens`` command's ``--max-new-tokens``."""

# Chosen on training tasks only (benchmarks/bench_context_pruning.py --splits train,held_out, AT2 with the shipped
# estimator, candidates 0.5-0.9): the share with the best mean answer F1 over the 40 training tasks of the SQuAD and
# multi-document suites (20 each): 0.6 (0.101; 0.5: 0.098, 0.9: 0.094, 0.8: 0.093, 0.7: 0.085). Per suite the best
# were 0.9 (SQuAD) and 0.6 (multi-document): the differences are small and noisy (README, "Context pruning"). With
# the long-context suite's 12 training tasks added (52 tasks), 0.5 and 0.6 tie (0.090 / 0.089): 0.6 was kept.
DEFAULT_MASS = 0.6
"""The share of the positive score mass that context pruning keeps when no rule is given: the default of
``at2_lens.pruning.prune_and_reanswer`` and of ``at2-lens prune`` (re-exported as ``at2_lens.pruning.DEFAULT_MASS``)."""

__all__ = ["DEFAULT_MASS", "DEFAULT_MAX_NEW_TOKENS"]
