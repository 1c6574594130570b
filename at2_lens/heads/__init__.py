"""Decoder head finders and one-call causal checks.

Each finder returns a ``[layer, head]`` score tensor, like AT2's head weights and AttAttr's head importance:

- :func:`retrieval_scores` (``retrieval``): Wu et al. 2024's copy-paste score on needle tasks
  (:func:`at2_lens.tasks.needle.needle_tasks`);
- :func:`query_focus_scores` (``query_focus``): QRHead-style attention mass from the query to the relevant context,
  calibrated against a content-free query;
- :func:`attattr_head_importance` (``attattr_importance``): AttAttr importance for the answer's log-probability;
- :func:`at2_head_importance` (``at2_weights``): AT2's estimator weights.

:func:`causal_check` (``causal``) ablates a ranking's top-k heads (zero, mean, resample) against random k-head sets;
:func:`knockout_check` knocks out the chosen heads' attention to the gold source; :func:`compare_rankings`
(``compare``) gives rank correlations and top-k overlaps.
"""

from at2_lens.heads.at2_weights import at2_head_importance
from at2_lens.heads.attattr_importance import attattr_head_importance
from at2_lens.heads.causal import (
    AblationReference,
    CausalCheck,
    KnockoutCheck,
    ablation_reference,
    causal_check,
    knockout_check,
)
from at2_lens.heads.compare import compare_rankings
from at2_lens.heads.query_focus import query_focus_scores
from at2_lens.heads.retrieval import retrieval_scores

__all__ = [
    "AblationReference",
    "CausalCheck",
    "KnockoutCheck",
    "ablation_reference",
    "at2_head_importance",
    "attattr_head_importance",
    "causal_check",
    "compare_rankings",
    "knockout_check",
    "query_focus_scores",
    "retrieval_scores",
]
