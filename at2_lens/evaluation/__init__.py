"""Faithfulness evaluation of context attributions: metrics, the ``evaluate`` runner, method names, the CLI.

- ``metrics``: LDS, top-k drop, Kendall τ (and its top-k variant), Jensen–Shannon divergence, counterfactual
  (permuted) and adversarial attention; pure functions plus the functions that run the model.
- ``correlation``: Pearson, Spearman and per-example LDS on predicted vs actual outputs (also used in training).
- The ground truth (held-out random ablations) is the engine's: ``at2_lens.ablation.ground_truth``.
- ``runner``: ``evaluate(methods, tasks, metrics) -> DataFrame`` (tidy), ``summarize``, ``markdown_table``.
- ``methods``: build attribution objects by name (``at2``, ``loo``, ``contextcite64``, ...).
- ``squad``: the benchmark's SQuAD tasks and their deterministic train / held-out split.
- ``cli``: ``add_evaluate_parser`` / ``cmd_evaluate`` for ``at2-lens evaluate``.

Names are imported lazily, so that importing the CLI part stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "DEFAULT_METRICS": "at2_lens.evaluation._names",
    "METRICS": "at2_lens.evaluation._names",
    "METHOD_INDEPENDENT_METRICS": "at2_lens.evaluation._names",
    "evaluate": "at2_lens.evaluation.runner",
    "summarize": "at2_lens.evaluation.runner",
    "markdown_table": "at2_lens.evaluation.runner",
    "build_methods": "at2_lens.evaluation.methods",
    "squad_split": "at2_lens.evaluation.squad",
    "adversarial_attention": "at2_lens.evaluation.metrics",
    "attention_permutation_check": "at2_lens.evaluation.metrics",
    "ground_truth": "at2_lens.ablation.ground_truth",
    "jensen_shannon": "at2_lens.evaluation.metrics",
    "kendall_tau": "at2_lens.evaluation.metrics",
    "lds_score": "at2_lens.evaluation.metrics",
    "predicted_outputs": "at2_lens.evaluation.metrics",
    "topk_drop": "at2_lens.evaluation.metrics",
    "topk_drop_from": "at2_lens.evaluation.metrics",
    "topk_kendall_tau": "at2_lens.evaluation.metrics",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'at2_lens.evaluation' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
