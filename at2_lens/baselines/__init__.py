"""Baselines for context attribution, as Captum attribution classes with AT2Attribution's contract.

Every class takes a TransformerLens decoder and has ``attribute(task, target=None, ...) -> SourceAttribution``
(built by ``SourceAttribution.from_task``; ``extra`` records the cost of the call, ``forward_passes`` and
``backward_passes``, counted in sequences). Ablations, features and target outputs come from ``at2_lens.ablation``.

- ``AverageAttention`` / ``LastLayerAttention`` (``captum.attr.Attribution``): attention averaged over heads;
  all layers = AT2 with uniform weights. 1 forward pass.
- ``LeaveOneOut`` (``PerturbationAttribution``): drop in output when one source is ablated. S + 1 forwards.
- ``ContextCite`` (``PerturbationAttribution``): LASSO surrogate over random ablations. n forwards (32 default).
- ``GradientXInput`` / ``IntegratedGradientsAttribution`` (``GradientAttribution``): on the input embeddings,
  summed over embedding dimensions and over each source's tokens. 1 F + 1 B / (1 + n) F + n B.
"""

from at2_lens.baselines.attention import AverageAttention, LastLayerAttention
from at2_lens.baselines.gradient import (
    GradientXInput,
    IntegratedGradientsAttribution,
    embedding_hook_point,
    sources_from_tokens,
)
from at2_lens.baselines.perturbation import ContextCite, LeaveOneOut, fit_lasso_surrogate

__all__ = [
    "AverageAttention",
    "ContextCite",
    "GradientXInput",
    "IntegratedGradientsAttribution",
    "LastLayerAttention",
    "LeaveOneOut",
    "embedding_hook_point",
    "fit_lasso_surrogate",
    "sources_from_tokens",
]
