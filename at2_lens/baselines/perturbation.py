"""Perturbation baselines: leave-one-out and the ContextCite linear surrogate.

Both measure the model directly by ablating sources (by attention masking or by deleting the text; see
``at2_lens.ablation.modes``), so they are the expensive references AT2 is compared with: leave-one-out costs one
forward pass per source plus one, ContextCite one per random ablation (32–256).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from captum.attr import PerturbationAttribution
from jaxtyping import Bool, Float
from torch import Tensor

from at2_lens._typing import typechecked
from at2_lens._validate import check_fraction, check_int, check_positive
from at2_lens.ablation import (
    OUTPUT_UNITS,
    AblationMode,
    OutputType,
    TaskAblationFn,
    ablation_fn,
    check_mode,
    check_output_type,
    full_keep,
    random_masks,
)
from at2_lens.backends import get_backend
from at2_lens.errors import InputError, NumericalError
from at2_lens.results import SourceAttribution
from at2_lens.tasks import DEFAULT_MAX_NEW_TOKENS, ContextTask, TargetSpan, TokenizedTask, prepare_task


class _AblationAttribution(PerturbationAttribution):
    """Common set-up: the model, the ablation mode and output, and an optional injected ablation function."""

    def __init__(
        self,
        forward_func: Any,
        *,
        mode: AblationMode = "mask",
        output: OutputType = "logit_prob",
        batch_size: int = 8,
        ablate: TaskAblationFn | None = None,
    ) -> None:
        backend = get_backend(forward_func)
        super().__init__(forward_func)
        if not backend.is_causal:
            raise InputError("forward_func: ablation baselines attribute generated responses; need a decoder")
        check_int("batch_size", batch_size)
        self.backend = backend
        self.mode: AblationMode = check_mode(mode)
        self.output: OutputType = check_output_type(output)
        if self.mode == "mask" and ablate is None:
            _ = backend.attention_access  # fails now, with the reason, if attention cannot be intervened on
        self.batch_size = batch_size
        self.ablate = ablate

    def has_convergence_delta(self) -> bool:
        return False

    def _outputs(self, task: TokenizedTask, masks: Tensor) -> Tensor:
        """The target's output under each keep-mask (one forward pass per mask)."""
        if self.ablate is not None:
            out = torch.as_tensor(self.ablate(task, masks.bool())).reshape(-1).float()
        else:
            out = ablation_fn(self.backend.model, task, mode=self.mode, output=self.output,
                              batch_size=self.batch_size)(masks.bool())
        if out.shape != (masks.shape[0],):
            raise InputError(f"ablate: returned {tuple(out.shape)} outputs for {masks.shape[0]} masks")
        if not torch.isfinite(out).all():
            raise NumericalError(
                f"ablation outputs hold NaN or inf for {int((~torch.isfinite(out)).sum())} of {masks.shape[0]} masks "
                "(non-finite attention or logits); refusing to return scores computed from them"
            )
        return out


class LeaveOneOut(_AblationAttribution):
    r"""Leave-one-out: ``score[s] = y(all sources) − y(all but s)``, the drop in the target's output.

    Costs ``n_sources + 1`` forward passes. The reference that attention is compared with in Jain & Wallace (2019).

    Args:
        forward_func: a TransformerLens decoder.
        mode: ``"mask"`` (mask the source's keys in every layer; batched) or ``"remove"`` (delete its text).
        output: ``"logit_prob"`` (default, AT2/ContextCite's output) or ``"log_prob"``.
        batch_size: ablations per forward call in mask mode.
        ablate: optional ``(task, keep_masks) -> outputs`` used instead of the model (tests, custom ablations).
    """

    def attribute(  # type: ignore[override]
        self,
        inputs: ContextTask | TokenizedTask,
        target: TargetSpan | Sequence[int] | None = None,
        *,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    ) -> SourceAttribution:
        """Score every source by the fall in the target's output when it alone is ablated."""
        task = prepare_task(self.backend, inputs, max_new_tokens, target)
        n = task.n_sources
        masks = torch.cat([full_keep(n), ~torch.eye(n, dtype=torch.bool)])
        out = self._outputs(task, masks)
        scores = out[0] - out[1:]
        return SourceAttribution.from_task(
            task, scores, method=f"leave-one-out ({self.mode})", units=f"drop in {OUTPUT_UNITS[self.output]}",
            forward_passes=n + 1, full_output=float(out[0]), mode=self.mode, output=self.output,
        )


@typechecked
def fit_lasso_surrogate(
    masks: Bool[Tensor, "mask source"] | Float[Tensor, "mask source"],
    outputs: Float[Tensor, " mask"],
    alpha: float = 0.01,
) -> tuple[Float[Tensor, " source"], float]:
    """ContextCite's surrogate: LASSO from standardised 0/1 keep-masks to outputs, with an intercept.

    Returns ``(weights, intercept)`` in the outputs' units per kept source (the standardisation undone):
    ``outputs ≈ intercept + masks @ weights``. A source kept (or ablated) in every mask gets weight 0.
    """
    from sklearn.linear_model import Lasso
    from sklearn.preprocessing import StandardScaler

    check_positive("alpha", alpha)
    if masks.shape[0] < 2:
        raise InputError(f"masks: need at least 2 ablations to fit a surrogate, got {masks.shape[0]}")
    x = masks.detach().cpu().double().numpy()
    y = outputs.detach().cpu().double().numpy()
    scaler = StandardScaler()
    xs = scaler.fit_transform(x)
    lasso = Lasso(alpha=alpha, fit_intercept=True, max_iter=100_000, tol=1e-8)
    lasso.fit(xs, y)
    scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
    weights = lasso.coef_ / scale
    intercept = float(lasso.intercept_ - (scaler.mean_ / scale) @ lasso.coef_)
    return torch.from_numpy(weights).float(), intercept


class ContextCite(_AblationAttribution):
    r"""ContextCite (Cohen-Wang et al. 2024): a sparse linear surrogate fitted to random source ablations.

    ``n_ablations`` keep-masks (each source kept with probability ``keep_prob``) are run through the model; a LASSO
    (``alpha``, standardised masks, intercept) maps masks to the target's output. The fitted weights are the scores,
    in output units (logit-probability by default): the predicted change in output from keeping the source.
    Costs ``n_ablations`` forward passes (32 by default; the paper uses 32–256).

    Args:
        forward_func: a TransformerLens decoder.
        n_ablations: random ablations per attribution.
        keep_prob: probability of keeping each source in an ablation.
        alpha: LASSO regularisation (scikit-learn convention, on standardised masks).
        mode: ``"mask"`` (attention masking, batched; AT2's ground truth) or ``"remove"`` (delete the text and
            re-tokenise: ContextCite's own choice).
        output: ``"logit_prob"`` (default) or ``"log_prob"``.
        seed: seed of the ablation masks (each attribution draws the same masks for the same number of sources).
        batch_size: ablations per forward call in mask mode.
        ablate: optional ``(task, keep_masks) -> outputs`` used instead of the model.
    """

    def __init__(
        self,
        forward_func: Any,
        n_ablations: int = 32,
        *,
        keep_prob: float = 0.5,
        alpha: float = 0.01,
        mode: AblationMode = "mask",
        output: OutputType = "logit_prob",
        seed: int = 0,
        batch_size: int = 8,
        ablate: TaskAblationFn | None = None,
    ) -> None:
        super().__init__(forward_func, mode=mode, output=output, batch_size=batch_size, ablate=ablate)
        check_int("n_ablations", n_ablations, minimum=2)
        check_fraction("keep_prob", keep_prob)
        check_positive("alpha", alpha)
        self.n_ablations = n_ablations
        self.keep_prob = keep_prob
        self.alpha = alpha
        self.seed = seed

    def masks_for(self, n_sources: int) -> Bool[Tensor, "mask source"]:
        """The keep-masks this instance ablates with for a task of ``n_sources`` sources."""
        return random_masks(n_sources, self.n_ablations, self.keep_prob, seed=self.seed, index=n_sources)

    def attribute(  # type: ignore[override]
        self,
        inputs: ContextTask | TokenizedTask,
        target: TargetSpan | Sequence[int] | None = None,
        *,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    ) -> SourceAttribution:
        """Fit the surrogate on ``n_ablations`` random ablations of ``inputs``; its weights are the scores."""
        return self._attribute(prepare_task(self.backend, inputs, max_new_tokens, target))

    def _attribute(self, task: TokenizedTask) -> SourceAttribution:
        masks = self.masks_for(task.n_sources)
        out = self._outputs(task, masks)
        weights, intercept = fit_lasso_surrogate(masks, out, self.alpha)
        return SourceAttribution.from_task(
            task, weights, method=f"ContextCite ({self.n_ablations} ablations, {self.mode})",
            units=f"{OUTPUT_UNITS[self.output]} per kept source (LASSO weight)", forward_passes=self.n_ablations,
            intercept=intercept, mode=self.mode, output=self.output, n_ablations=self.n_ablations,
        )
