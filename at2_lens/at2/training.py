"""Train AT2's linear head weighting from stored ablation examples (model-independent part of AT2).

Surrogate for one example with sources s and keep-mask m: ŷ(m) = Σ_s (2 m_s − 1) · (w · φ[s]). Because ŷ is linear
in w, it equals w · Ψ(m) with Ψ(m) = Σ_s (2 m_s − 1) φ[s]; Ψ is computed once per example and mask ([N, M, L·H]),
so examples with different numbers of sources need no padding and each step is one batched matrix product.

Loss: minus the Pearson correlation between ŷ(m) and the actual output y(m) over the masks of an example, averaged
over a batch of examples (sampled without replacement when there are at least ``batch_size`` examples, with
replacement otherwise; seeded). Adam, cosine learning-rate schedule, gradient-norm clipping; with
``non_negative=True`` the weights are projected onto w >= 0 (clamped) after every step. w starts at 1/(L·H)
("average attention") and is L1-normalised at the end (Σ|w| = 1). Evaluation: LDS (Spearman over masks, mean over
examples). Examples whose outputs are the same under every mask carry no signal and are skipped.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm

from at2_lens._typing import typechecked
from at2_lens._validate import check_fraction, check_int, check_optional_int, check_positive
from at2_lens.at2.estimator import LinearEstimator
from at2_lens.at2.store import AblationExample, AblationStore, StoreSettings
from at2_lens.errors import InputError
from at2_lens.evaluation.correlation import lds_per_example, mean_ignoring_nan


@dataclass
class TrainingSummary:
    """What a training run did and how well the result ranks held-out ablations (LDS, higher is better)."""

    steps: int
    lr: float
    batch_size: int
    grad_clip: float | None
    non_negative: bool
    seed: int
    n_examples: int
    n_held_out: int
    n_skipped: int
    final_loss: float
    lds_train: float
    lds_held_out: float | None
    lds_train_init: float
    lds_held_out_init: float | None
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (NaN becomes None) for the estimator file's ``training`` entry."""

        def clean(v: Any) -> Any:
            if isinstance(v, float) and not math.isfinite(v):
                return None
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            if isinstance(v, list):
                return [clean(x) for x in v]
            return v

        return clean(asdict(self))


@dataclass
class _Packed:
    """Examples reduced to what the loss needs: Ψ [N, M, F], standardised outputs [N, M], valid-mask [N, M]."""

    psi: Float[Tensor, "n m f"]
    y: Float[Tensor, "n m"]
    valid: Bool[Tensor, "n m"]
    n_masks: list[int]
    n_skipped: int


def _pack(examples: list[AblationExample], n_layers: int, n_heads: int, what: str) -> _Packed:
    """Compute Ψ(m) = Σ_s (2 m_s − 1) φ[s] per example and mask; centre and unit-normalise y per example."""
    n_feat = n_layers * n_heads
    kept = []
    skipped = 0
    for pos, ex in enumerate(examples):
        if not isinstance(ex, AblationExample):
            raise InputError(f"{what}[{pos}] must be an AblationExample, got {type(ex).__name__}")
        if (ex.n_layers, ex.n_heads) != (n_layers, n_heads):
            raise InputError(
                f"{what}[{pos}] (example {ex.index}) has features for {ex.n_layers} layers x {ex.n_heads} heads, "
                f"expected {n_layers} x {n_heads} like the first training example"
            )
        y = ex.outputs.double()
        yc = y - y.mean()
        norm = float(yc.norm())
        if ex.n_masks < 2 or norm <= 1e-9 * (float(y.abs().max()) + 1e-12):
            skipped += 1
            continue
        signs = ex.masks.to(torch.float32) * 2.0 - 1.0
        kept.append((signs @ ex.features.reshape(ex.n_sources, n_feat), (yc / norm).float()))
    m_max = max((p.shape[0] for p, _ in kept), default=1)
    psi = torch.zeros(len(kept), m_max, n_feat)
    ys = torch.zeros(len(kept), m_max)
    valid = torch.zeros(len(kept), m_max, dtype=torch.bool)
    for i, (p, y) in enumerate(kept):
        psi[i, : p.shape[0]] = p
        ys[i, : p.shape[0]] = y
        valid[i, : p.shape[0]] = True
    return _Packed(psi, ys, valid, [p.shape[0] for p, _ in kept], skipped)


def _neg_pearson_loss(pred: Tensor, y: Tensor, valid: Tensor) -> Tensor:
    """Minus the mean over examples of Pearson(pred, y) over valid masks; y is already centred and unit-norm."""
    count = valid.sum(dim=1, keepdim=True).clamp(min=1)
    pred = pred * valid
    centred = (pred - pred.sum(dim=1, keepdim=True) / count) * valid
    corr = (centred * y).sum(dim=1) / centred.norm(dim=1).clamp(min=1e-12)
    return -corr.mean()


def _mean_lds(packed: _Packed, w: Tensor) -> float:
    """Mean LDS over the packed examples for weights ``w`` [F] (NaN if there are none)."""
    if packed.psi.shape[0] == 0:
        return float("nan")
    with torch.no_grad():
        pred = (packed.psi @ w).detach().cpu().numpy()
    actual = packed.y.detach().cpu().numpy()
    scores = np.full(len(packed.n_masks), np.nan)
    counts = np.asarray(packed.n_masks)
    for m in np.unique(counts):  # one vectorised call per distinct number of masks
        rows = np.nonzero(counts == m)[0]
        scores[rows] = lds_per_example(pred[rows, :m], actual[rows, :m])
    return mean_ignoring_nan(scores)


def split_held_out(
    examples: list[AblationExample], fraction: float, seed: int
) -> tuple[list[AblationExample], list[AblationExample]]:
    """``(train, held_out)``: ``fraction`` of the examples split off deterministically (by ``seed``), the split
    ``train_estimator(held_out=fraction, seed=seed)`` makes."""
    check_fraction("held_out", fraction)
    n_ho = max(1, round(len(examples) * fraction))
    if n_ho >= len(examples):
        raise InputError(f"held_out={fraction} leaves no training examples out of {len(examples)}")
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed + 1)).tolist()
    ho = set(order[:n_ho])
    return [e for i, e in enumerate(examples) if i not in ho], [e for i, e in enumerate(examples) if i in ho]


@typechecked
def train_estimator(
    examples: list[AblationExample],
    *,
    steps: int = 1000,
    lr: float = 1e-3,
    batch_size: int = 512,
    grad_clip: float | None = 1.0,
    non_negative: bool = False,
    seed: int = 0,
    held_out: list[AblationExample] | float | None = None,
    log_every: int | None = None,
    progress: bool = True,
    settings: StoreSettings | None = None,
    num_threads: int | None = None,
    prompt_format: dict[str, Any] | None = None,
) -> tuple[LinearEstimator, TrainingSummary]:
    """Fit AT2's per-head weights to ablation examples; returns the L1-normalised estimator and a summary.

    ``held_out`` is a separate list of examples, or a fraction of ``examples`` to hold out (split by ``seed``), or
    None. ``log_every`` (default steps // 10) sets how often LDS is evaluated for the progress bar and history.
    ``settings`` (the store's collection settings) supplies the ablation mode, output type, granularity and model
    fingerprint recorded in the estimator, and the prompt format when ``collect`` recorded it
    (``settings.extra["prompt_format"]``); ``prompt_format`` (see ``at2_lens.at2.estimator.prompt_format_record``)
    overrides it. ``num_threads``, if given, sets torch's intra-op thread count for the
    duration of training (restored afterwards): each step is small, and on a busy machine one thread was measured
    up to 6x faster than two.
    """
    if len(examples) == 0:
        raise InputError("examples must not be empty")
    check_int("steps", steps)
    check_positive("lr", lr)
    check_int("batch_size", batch_size)
    if grad_clip is not None:
        check_positive("grad_clip", grad_clip)
    check_int("seed", seed, minimum=0)
    log_every = max(1, steps // 10) if log_every is None else check_int("log_every", log_every)
    check_optional_int("num_threads", num_threads)
    if isinstance(held_out, float):
        examples, held_out = split_held_out(examples, held_out, seed)
    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        estimator, summary = _train(
            examples,
            held_out,
            steps=steps,
            lr=lr,
            batch_size=batch_size,
            grad_clip=grad_clip,
            non_negative=non_negative,
            seed=seed,
            log_every=log_every,
            progress=progress,
            settings=settings,
        )
        if prompt_format is not None:
            estimator = replace(estimator, prompt_format=prompt_format)
        return estimator, summary
    finally:
        if num_threads is not None:
            torch.set_num_threads(previous_threads)


def _train(
    examples: list[AblationExample],
    held_out: list[AblationExample] | None,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    grad_clip: float | None,
    non_negative: bool,
    seed: int,
    log_every: int,
    progress: bool,
    settings: StoreSettings | None,
) -> tuple[LinearEstimator, TrainingSummary]:
    """The body of :func:`train_estimator`, after argument checks."""

    n_layers, n_heads = examples[0].n_layers, examples[0].n_heads
    if settings is not None and (settings.n_layers, settings.n_heads) != (n_layers, n_heads):
        raise InputError(
            f"settings are for {settings.n_layers} x {settings.n_heads} heads, examples have {n_layers} x {n_heads}"
        )
    train = _pack(examples, n_layers, n_heads, "examples")
    n_train = train.psi.shape[0]
    if n_train == 0:
        raise InputError(f"all {len(examples)} training examples have constant outputs; nothing to learn from")
    ho = _pack(held_out, n_layers, n_heads, "held_out") if held_out else None

    n_feat = n_layers * n_heads
    w = torch.full((n_feat,), 1.0 / n_feat, requires_grad=True)
    lds_train_init = _mean_lds(train, w.detach())
    lds_ho_init = _mean_lds(ho, w.detach()) if ho is not None else None
    optimizer = torch.optim.Adam([w], lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    generator = torch.Generator().manual_seed(seed)
    history: list[dict[str, Any]] = []
    loss_value = float("nan")

    bar = tqdm(range(1, steps + 1), desc="AT2 training", disable=not progress, leave=True)
    for step in bar:
        if n_train >= batch_size:
            idx = torch.randperm(n_train, generator=generator)[:batch_size]
        else:
            idx = torch.randint(n_train, (batch_size,), generator=generator)
        loss = _neg_pearson_loss(train.psi[idx] @ w, train.y[idx], train.valid[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_([w], grad_clip)
        optimizer.step()
        schedule.step()
        if non_negative:
            with torch.no_grad():
                w.clamp_(min=0.0)
        loss_value = float(loss.detach())
        if step % log_every == 0 or step == steps:
            entry: dict[str, Any] = {"step": step, "loss": loss_value, "lds_train": _mean_lds(train, w.detach())}
            if ho is not None:
                entry["lds_held_out"] = _mean_lds(ho, w.detach())
            history.append(entry)
            bar.set_postfix({k: f"{v:.4f}" for k, v in entry.items() if k != "step"})

    with torch.no_grad():
        final = w.detach().clone()
        total = float(final.abs().sum())
        if total <= 0 or not math.isfinite(total):
            warnings.warn("training ended with all-zero weights; returning the uniform estimator", stacklevel=2)
            final = torch.full((n_feat,), 1.0 / n_feat)
        else:
            final = final / total
    lds_train = _mean_lds(train, final)
    lds_ho = _mean_lds(ho, final) if ho is not None else None
    summary = TrainingSummary(
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        grad_clip=grad_clip,
        non_negative=non_negative,
        seed=seed,
        n_examples=n_train,
        n_held_out=0 if ho is None else ho.psi.shape[0],
        n_skipped=train.n_skipped + (0 if ho is None else ho.n_skipped),
        final_loss=loss_value,
        lds_train=lds_train,
        lds_held_out=lds_ho,
        lds_train_init=lds_train_init,
        lds_held_out_init=lds_ho_init,
        history=history,
    )
    if progress:
        held = "" if lds_ho is None else f", held-out LDS {lds_ho_init:.4f} -> {lds_ho:.4f}"
        tqdm.write(f"AT2 training done: train LDS {lds_train_init:.4f} -> {lds_train:.4f}{held} (init -> trained)")
    meta: dict[str, Any] = {}
    if settings is not None:
        meta = {
            "ablation_mode": settings.ablation_mode,
            "output_type": settings.output_type,
            "granularity": settings.granularity,
            "model_fingerprint": settings.model_fingerprint,
            "feature_layout": settings.feature_layout,
            "prompt_format": settings.extra.get("prompt_format"),
        }
    estimator = LinearEstimator(final.reshape(n_layers, n_heads), training=summary.to_dict(), **meta)
    return estimator, summary


def train_from_store(
    store: AblationStore, *, held_out: list[AblationExample] | float | None = 0.1, **kwargs: Any
) -> tuple[LinearEstimator, TrainingSummary]:
    """Load every complete example of ``store`` and train on it, recording the store's settings in the estimator."""
    if not isinstance(store, AblationStore):
        raise InputError(f"store must be an AblationStore, got {type(store).__name__}")
    examples = store.load()
    if not examples:
        raise InputError(f"store {store.root} holds no examples")
    return train_estimator(examples, held_out=held_out, settings=store.settings, **kwargs)


def calibrate(
    estimator: LinearEstimator, examples: list[AblationExample], *, with_offset: bool = False
) -> LinearEstimator:
    """A copy of ``estimator`` whose scores are in the examples' output units.

    Fits ``y(m) − ȳ = a · Σ_s m_s score_s + b · |m|`` (centred per example, pooled over examples; ``|m|`` the
    number of kept sources) by least squares, so that ``a · score_s + b`` is the average change of the output
    (logit-probability for AT2's stores) when source ``s`` is kept rather than removed: the units ContextCite
    reports. ``with_offset=False`` fixes ``b = 0``: a positive scale keeps every ranking (and LDS) as it is, while an
    offset shifts each mask's predicted output by its number of kept sources.
    """
    if not isinstance(estimator, LinearEstimator):
        raise InputError(f"estimator: expected a LinearEstimator, got {type(estimator).__name__}")
    if not examples:
        raise InputError("examples: expected at least one AblationExample to calibrate on")
    xs, ys = [], []
    for pos, ex in enumerate(examples):
        if not isinstance(ex, AblationExample):
            raise InputError(f"examples[{pos}]: expected an AblationExample, got {type(ex).__name__}")
        kept = ex.masks.double()
        pred = kept @ estimator.score(ex.features.float()).double()
        count = kept.sum(dim=1)
        xs.append(torch.stack([pred - pred.mean(), count - count.mean()], dim=1))
        ys.append(ex.outputs.double() - ex.outputs.double().mean())
    x, y = torch.cat(xs), torch.cat(ys)
    x = x if with_offset else x[:, :1]
    coef = torch.linalg.lstsq(x, y[:, None]).solution[:, 0]
    scale, offset = float(coef[0]), float(coef[1]) if with_offset else 0.0
    if not scale > 0:
        raise InputError(f"examples: the fitted scale is {scale:.4g}; the scores do not predict the outputs")
    output = "logit-probability" if estimator.output_type == "logit_prob" else "log-probability"
    calibration = {
        "scale": scale,
        "offset": offset,
        "units": f"predicted fall in the target's {output} when the source is removed (calibrated)",
        "fitted_on": len(examples),
    }
    return replace(estimator, weights=estimator.weights.clone(), calibration=calibration)
