"""``AT2Refined``: AT2's one-pass scores as a prior, refined by a few ablations.

AT2 (Cohen-Wang, Chuang, Madry 2025) costs one forward pass; ablation surrogates such as ContextCite (Cohen-Wang et
al. 2024) are more faithful but need 32-256 ablations. ``AT2Refined`` sits between them: it runs ``n_ablations``
random source ablations (4-16) and fits a linear surrogate from keep-masks to the target's output whose weights are
shrunk towards AT2's scores (rescaled to output units by the same ablations), so that few ablations are enough.
With zero information in the ablations it returns the rescaled AT2 scores; with many it approaches the
least-squares surrogate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from at2_lens._typing import typechecked
from at2_lens._validate import check_int, check_positive
from at2_lens.ablation import OUTPUT_UNITS, AblationMode, OutputType, TaskAblationFn
from at2_lens.at2.attribution import AT2Attribution
from at2_lens.at2.estimator import LinearEstimator
from at2_lens.baselines import ContextCite
from at2_lens.errors import InputError
from at2_lens.results import SourceAttribution
from at2_lens.tasks import TokenizedTask

# Chosen on training tasks of the store (a sweep over 0.25-8 with 4, 8 and 16 ablations; model card): the ridge
# penalty pulling the surrogate's weights towards the rescaled AT2 scores (masks are 0/1, so XᵀX ≈ n_ablations/4·I).
DEFAULT_SHRINKAGE = 0.5


@typechecked
def fit_shrunk_surrogate(
    masks: Bool[Tensor, "mask source"] | Float[Tensor, "mask source"],
    outputs: Float[Tensor, " mask"],
    prior: Float[Tensor, " n"],  # checked against the masks below, with a message naming it
    shrinkage: float = DEFAULT_SHRINKAGE,
    prior_scale: float | None = None,
) -> tuple[Float[Tensor, " source"], float, float]:
    """Fit ``outputs ≈ intercept + masks @ w`` with ``w`` shrunk towards ``scale * prior``.

    ``scale`` (≥ 0) is the least-squares slope of the centred outputs on the centred prior prediction
    ``masks @ prior`` — itself shrunk towards ``prior_scale`` when that is given (1 for a prior already in output
    units, such as a calibrated AT2 estimator's scores, with penalty ``λ‖prior‖²(scale − prior_scale)²``); then
    ``w = scale·prior + (XᵀX + λI)⁻¹ Xᵀ (y − X·scale·prior)`` on centred ``X, y`` with ``λ = shrinkage``: a fixed
    prior precision, so more ablations move the fit further from the prior (with many, it is least squares).
    Returns ``(w, intercept, scale)``, ``w`` in output units per kept source. ``shrinkage`` does not depend on the
    outputs' scale (both terms scale alike).
    """
    check_positive("shrinkage", shrinkage)
    if masks.shape[0] < 2:
        raise InputError(f"masks: need at least 2 ablations to fit a surrogate, got {masks.shape[0]}")
    if prior.shape[0] != masks.shape[1]:
        raise InputError(f"prior: expected {masks.shape[1]} scores (one per source), got {prior.shape[0]}")
    x = masks.detach().cpu().double()
    y = outputs.detach().cpu().double()
    p = prior.detach().cpu().double()
    xc, yc = x - x.mean(0), y - y.mean()
    xp = xc @ p
    lam = shrinkage
    if prior_scale is None:
        denom = float(xp @ xp)
        scale = max(float(xp @ yc) / denom, 0.0) if denom > 0 else 0.0
    else:
        check_positive("prior_scale", prior_scale)
        strength = lam * float(p @ p)
        denom = float(xp @ xp) + strength
        scale = max((float(xp @ yc) + strength * prior_scale) / denom, 0.0) if denom > 0 else prior_scale
    residual = yc - xp * scale
    w = scale * p + torch.linalg.solve(xc.T @ xc + lam * torch.eye(x.shape[1], dtype=x.dtype), xc.T @ residual)
    intercept = float(y.mean() - x.mean(0) @ w)
    return w.float(), intercept, scale


class AT2Refined(ContextCite):
    r"""AT2 scores refined by ``n_ablations`` random ablations into a surrogate in output units.

    A ContextCite-style surrogate (same masks, same ablation machinery) whose fit is the ridge of
    :func:`fit_shrunk_surrogate`, centred on AT2's scores instead of a LASSO centred on zero. Costs AT2's pass (none
    when cached) plus ``n_ablations`` ablated forward passes (batched in ``mask`` mode). Scores are in output units
    (logit-probability by default) per kept source, like ContextCite's.

    Args:
        forward_func: a TransformerLens decoder.
        estimator: the AT2 estimator (a ``LinearEstimator`` or a file); default the one shipped for the model.
        n_ablations: random ablations (≥ 2; 4-16 is the range this is made for).
        shrinkage: how strongly the surrogate is pulled towards the rescaled AT2 scores.
        keep_prob: probability of keeping each source in an ablation.
        mode: ``"mask"`` (attention masking, AT2's ground truth) or ``"remove"`` (delete the text).
        output: ``"logit_prob"`` (default) or ``"log_prob"``.
        seed: seed of the ablation masks.
        batch_size: ablations per forward call in mask mode.
        ablate: optional ``(task, keep_masks) -> outputs`` used instead of the model.
    """

    def __init__(
        self,
        forward_func: Any,
        estimator: LinearEstimator | str | Path | None = None,
        n_ablations: int = 8,
        *,
        shrinkage: float = DEFAULT_SHRINKAGE,
        keep_prob: float = 0.5,
        mode: AblationMode = "mask",
        output: OutputType = "logit_prob",
        seed: int = 0,
        batch_size: int = 8,
        ablate: TaskAblationFn | None = None,
    ) -> None:
        check_positive("shrinkage", shrinkage)
        check_int("seed", seed, minimum=0)
        super().__init__(forward_func, n_ablations, keep_prob=keep_prob, mode=mode, output=output, seed=seed,
                         batch_size=batch_size, ablate=ablate)
        self.at2 = AT2Attribution.for_model(forward_func, estimator)
        self.shrinkage = shrinkage

    def _attribute(self, task: TokenizedTask) -> SourceAttribution:
        prior = self.at2.attribute(task)
        masks = self.masks_for(task.n_sources)
        out = self._outputs(task, masks)
        prior_scale = None if self.at2.estimator.calibration is None else 1.0
        weights, intercept, scale = fit_shrunk_surrogate(masks, out, prior.scores, self.shrinkage, prior_scale)
        return SourceAttribution.from_task(
            task, weights, method=f"AT2Refined ({self.n_ablations} ablations, {self.mode})",
            units=f"{OUTPUT_UNITS[self.output]} per kept source (surrogate weight)",
            forward_passes=int(prior.extra["forward_passes"]) + self.n_ablations,
            intercept=intercept, prior_scale=scale, mode=self.mode, output=self.output,
            n_ablations=self.n_ablations,
        )


__all__ = ["DEFAULT_SHRINKAGE", "AT2Refined", "fit_shrunk_surrogate"]
