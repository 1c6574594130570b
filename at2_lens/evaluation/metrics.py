"""Faithfulness metrics for context attributions: pure functions on scores and outputs, and the model-running
functions that produce those outputs (the ablations themselves, and the ground truth LDS compares against, come
from :mod:`at2_lens.ablation`; correlations from :mod:`at2_lens.evaluation.correlation`).

- **LDS** (ContextCite / AT2): for one task, the Spearman correlation over held-out random keep-masks ``m`` between
  the prediction ``ŷ(m) = Σ_s m_s · score_s = m · w`` and the actual output ``y(m)``. (AT2 writes the prediction as
  ``Σ_s (2 m_s − 1) · score_s = 2 m · w − Σ_s w_s``, an increasing affine map of ``m · w``, so the rank correlation
  is the same.) Reported as the mean over tasks.
- **Top-k drop**: ``log P(target) − log P(target | the k highest-scored sources ablated)``; larger is better.
- **Kendall τ** (Jain & Wallace 2019) between two score vectors, and its top-k variant: τ over the union of the two
  rankings' top-k sources.
- **Counterfactual attention**: random permutations of the target rows' attention over the context keys (median
  ``|Δ output|``), and an adversarial search for attention far from the original (Jensen–Shannon divergence) that
  keeps ``|Δ output|`` within a tolerance. Large divergence with small change means attention did not determine
  the output.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from scipy.stats import kendalltau
from torch import Tensor

from at2_lens._typing import typechecked
from at2_lens._validate import check_choice, check_int, check_positive
from at2_lens.ablation import (
    AblationFn,
    AblationMode,
    OutputType,
    ablation_fn,
    check_output_type,
    full_keep,
    query_rows,
    span_output,
    topk_masks,
)
from at2_lens.backends import get_backend
from at2_lens.errors import InputError
from at2_lens.evaluation.correlation import spearman
from at2_lens.interventions import replace_pattern
from at2_lens.ranking import top_k
from at2_lens.tasks import TokenizedTask

RowSelection = Literal["target", "after_context"]
KeySelection = Literal["context", "all"]

# ================================================================================================ pure functions


def _np(x: Tensor | np.ndarray | Sequence[float]) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


@typechecked
def predicted_outputs(
    scores: Float[Tensor, " source"], masks: Bool[Tensor, "mask source"] | Float[Tensor, "mask source"]
) -> Float[Tensor, " mask"]:
    """The linear prediction of each mask's output from scores: ``ŷ(m) = Σ_s m_s · score_s``."""
    if masks.shape[1] != scores.shape[0]:
        raise InputError(f"masks: expected {scores.shape[0]} columns (one per source), got {masks.shape[1]}")
    return masks.double() @ scores.double()


@typechecked
def lds_score(
    scores: Float[Tensor, " source"],
    masks: Bool[Tensor, "mask source"] | Float[Tensor, "mask source"],
    actual: Float[Tensor, " mask"],
) -> float:
    """LDS of one task: Spearman correlation between ``masks @ scores`` and the actual outputs (NaN if either is
    constant, e.g. all-equal scores)."""
    if actual.shape[0] != masks.shape[0]:
        raise InputError(f"actual: expected {masks.shape[0]} outputs (one per mask), got {actual.shape[0]}")
    return spearman(predicted_outputs(scores, masks), actual.double())


def topk_drop_defined(k: int, n_sources: int) -> bool:
    """Whether top-k drop tells methods apart: ``k < n_sources`` (ablating all sources is the same for every
    ranking)."""
    return k < n_sources


def topk_drop_from(
    ablate: AblationFn, scores: Tensor | Sequence[float], ks: Sequence[int], full: float | None = None
) -> dict[int, float]:
    """Top-k drop with any ablation function: ``full − ablate(top-k removed)`` for every ``k``. ``full`` is the
    unablated output (computed with one more call if None).

    ``k`` at or above the number of sources gives NaN: removing every source ranks nothing, so each method would get
    the same value (the summaries of ``evaluate`` leave such rows out; see :func:`topk_drop_defined`)."""
    n = len(_np(scores))
    valid = [k for k in ks if topk_drop_defined(k, n)]
    out: dict[int, float] = {k: math.nan for k in ks}
    if not valid:
        return out
    masks = topk_masks(scores, valid)
    if full is None:
        masks = torch.cat([full_keep(n), masks])
    values = torch.as_tensor(ablate(masks)).double().reshape(-1)
    base = float(values[0]) if full is None else float(full)
    ablated = values[1:] if full is None else values
    for k, v in zip(valid, ablated.tolist(), strict=True):
        out[k] = base - v
    return out


def kendall_tau(a: Tensor | Sequence[float], b: Tensor | Sequence[float]) -> float:
    """Kendall's τ-b between two score vectors (``scipy.stats.kendalltau``); NaN if either is constant or has
    fewer than 2 entries."""
    x, y = _np(a), _np(b)
    if x.shape != y.shape or x.ndim != 1:
        raise InputError(f"kendall_tau: expected two vectors of the same length, got {x.shape} and {y.shape}")
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(kendalltau(x, y).statistic)


def topk_kendall_tau(a: Tensor | Sequence[float], b: Tensor | Sequence[float], k: int) -> float:
    """Jain & Wallace's top-k variant: Kendall τ-b restricted to the union of the top-``k`` sources of ``a`` and
    of ``b`` (so it asks whether the two methods agree on the sources that matter to either)."""
    x, y = _np(a), _np(b)
    idx = sorted(set(top_k(x, k)) | set(top_k(y, k)))
    return kendall_tau(x[idx], y[idx])


@typechecked
def jensen_shannon(
    p: Float[Tensor, "*batch n"], q: Float[Tensor, "*batch n"], eps: float = 1e-12
) -> Float[Tensor, "*batch"]:
    """Jensen–Shannon divergence (natural log, so in ``[0, ln 2]``) between distributions along the last axis.

    ``JSD = ½ KL(p ‖ m) + ½ KL(q ‖ m)``, ``m = (p + q)/2``; ``eps`` inside the logs keeps gradients finite at zeros.
    """
    m = 0.5 * (p + q)
    lm = torch.log(m + eps)
    kl_p = (p * (torch.log(p + eps) - lm)).sum(-1)
    kl_q = (q * (torch.log(q + eps) - lm)).sum(-1)
    return (0.5 * (kl_p + kl_q)).clamp_min(0.0)


@typechecked
def permute_keys(
    pattern: Float[Tensor, "batch head query key"],
    key_index: Int[Tensor, "batch head key"],
    row_mask: Bool[Tensor, " query"],
    head_mask: Bool[Tensor, " head"],
) -> Float[Tensor, "batch head query key"]:
    """``new[b, h, q, k] = pattern[b, h, q, key_index[b, h, k]]`` on the selected rows and heads, else unchanged.

    With ``key_index`` a permutation of the context keys (identity elsewhere) each selected row keeps its total
    mass and its mass outside the context; only which context key gets which weight changes.
    """
    b, h, q, k = pattern.shape
    idx = key_index.to(pattern.device)[:, :, None, :].expand(b, h, q, k)
    permuted = pattern.gather(-1, idx)
    sel = head_mask.to(pattern.device)[None, :, None, None] & row_mask.to(pattern.device)[None, None, :, None]
    return torch.where(sel, permuted, pattern)


# ========================================================================================= model-running metrics


def context_key_positions(task: TokenizedTask) -> Int[Tensor, " key"]:
    """Token positions that belong to some source (the context keys)."""
    return torch.cat([torch.arange(a, b) for a, b in task.source_token_ranges])


def selected_rows(task: TokenizedTask, rows: RowSelection) -> Bool[Tensor, " query"]:
    """Query rows an attention intervention edits: the rows that produce the target (``"target"``), or every row
    after the context (``"after_context"``: the query, the template and the response, which all see the whole
    context)."""
    if task.target_token_range is None:
        raise InputError("task: needs a response (a target)")
    check_choice("rows", rows, ("target", "after_context"))
    mask = torch.zeros(task.seq_len, dtype=torch.bool)
    if rows == "target":
        mask[query_rows(task.target_token_range, True)] = True
    else:
        mask[task.source_token_ranges[-1][1] :] = True
    return mask


def _heads(n_heads: int, heads: Sequence[int] | None) -> Bool[Tensor, " head"]:
    mask = torch.zeros(n_heads, dtype=torch.bool)
    if heads is None:
        mask[:] = True
        return mask
    for h in heads:
        mask[check_int("heads", h, minimum=0, maximum=n_heads - 1)] = True
    return mask


def topk_drop(
    model: Any,
    task: TokenizedTask,
    scores: Tensor | Sequence[float],
    ks: Sequence[int] = (1, 3, 5),
    *,
    mode: AblationMode = "mask",
    full_log_prob: float | None = None,
    batch_size: int = 8,
) -> dict[int, float]:
    """Fall in the target's log-probability (nats) when the top-k sources by ``scores`` are ablated, per ``k``.

    One forward pass per valid ``k`` (plus one for the unablated output if ``full_log_prob`` is None); ``k`` above
    the number of sources gives NaN.
    """
    run = ablation_fn(model, task, mode=mode, output="log_prob", batch_size=batch_size)
    return topk_drop_from(run, scores, ks, full=full_log_prob)


@dataclass(frozen=True)
class PermutationCheck:
    """Target output under random permutations of attention over the context keys.

    ``deltas[i] = y(permutation i) − y(original)``; ``median_abs_delta`` is Jain & Wallace's summary.
    """

    deltas: Float[Tensor, " permutation"]
    original: float
    forward_passes: int

    @property
    def median_abs_delta(self) -> float:
        return float(self.deltas.abs().median())


def attention_permutation_check(
    model: Any,
    task: TokenizedTask,
    n_permutations: int = 16,
    *,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    rows: RowSelection = "target",
    output: OutputType = "log_prob",
    seed: int = 0,
    permutations: Int[Tensor, "permutation key"] | None = None,
    batch_size: int = 8,
) -> PermutationCheck:
    """Permute the attention weights of the selected rows over the context keys and measure ``|Δ output|``.

    Each sample draws an independent random permutation of the context key positions for every selected
    ``(layer, head)`` (applied to all selected rows); ``permutations`` (``[n, n_context_keys]``, one per sample,
    shared by all layers and heads) overrides the draw, e.g. the identity in tests. Layers default to all, heads to
    all; costs ``1 + n_permutations`` forward passes.
    """
    backend = get_backend(model)
    output = check_output_type(output)
    if task.target_token_range is None:
        raise InputError("task: needs a response (a target)")
    layer_list = backend.check_layers(layers)
    head_mask = _heads(backend.n_heads, heads)
    row_mask = selected_rows(task, rows)
    ctx = context_key_positions(task)
    n_tok, n_ctx, n_lay, n_head = task.seq_len, len(ctx), len(layer_list), backend.n_heads
    if permutations is not None:
        if permutations.dim() != 2 or permutations.shape[1] != n_ctx:
            raise InputError(f"permutations: expected [n, {n_ctx}] (one permutation of the context keys per row)")
        perms = permutations.long()[:, None, None, :].expand(-1, n_lay, n_head, -1)
    else:
        check_int("n_permutations", n_permutations)
        gen = torch.Generator().manual_seed(seed)
        perms = torch.rand(n_permutations, n_lay, n_head, n_ctx, generator=gen).argsort(dim=-1)
    if not torch.equal(perms.sort(dim=-1).values, torch.arange(n_ctx).expand_as(perms)):
        raise InputError("permutations: every row must be a permutation of 0..n_context_keys-1")
    key_index = torch.arange(n_tok).repeat(perms.shape[0], n_lay, n_head, 1)
    key_index[..., ctx] = ctx[perms]
    t0, t1 = task.target_token_range
    q_rows = query_rows((t0, t1), True)
    ids = task.input_ids

    def target_output(logits: Tensor, b: int) -> Tensor:
        return span_output(logits[:, q_rows], ids[None, t0:t1].expand(b, -1), output).cpu()

    with torch.no_grad():
        original = float(target_output(backend.run(ids[None]), 1)[0])
        outs = []
        for start in range(0, perms.shape[0], batch_size):
            chunk = key_index[start : start + batch_size]
            hooks = []
            for i, layer in enumerate(layer_list):

                def transform(pattern: Tensor, idx: Tensor = chunk[:, i]) -> Tensor:
                    return permute_keys(pattern, idx, row_mask, head_mask)

                hooks.extend(backend.pattern_hooks(layer, transform))
            logits = backend.run(ids[None].expand(chunk.shape[0], -1), hooks)
            outs.append(target_output(logits, chunk.shape[0]))
    deltas = torch.cat(outs).double() - original
    return PermutationCheck(deltas.float(), original, 1 + perms.shape[0])


@dataclass(frozen=True)
class AdversarialAttention:
    """Result of the adversarial attention search.

    ``max_jsd``: the largest mean Jensen–Shannon divergence (nats, ≤ ln 2 ≈ 0.693) from the original attention,
    over the optimised (layer, head, row) distributions, among iterates whose ``|Δ output| ≤ tolerance`` (0 if
    none beat the original); ``delta``: the output change at that iterate; ``max_head_jsd``: the largest per-head
    mean JSD at that iterate; ``trace``: ``(mean JSD, Δ output)`` at every step.
    """

    max_jsd: float
    delta: float
    max_head_jsd: float
    original: float
    tolerance: float
    forward_passes: int
    backward_passes: int
    trace: list[tuple[float, float]] = field(default_factory=list)


def adversarial_attention(
    model: Any,
    task: TokenizedTask,
    *,
    layers: Sequence[int] | None = None,
    rows: RowSelection = "target",
    keys: KeySelection = "context",
    tolerance: float = 0.1,
    steps: int = 30,
    lr: float = 0.1,
    penalty: float = 10.0,
    init_noise: float = 0.5,
    output: OutputType = "log_prob",
    seed: int = 0,
) -> AdversarialAttention:
    """Search for attention far from the model's own that leaves the target's output (almost) unchanged.

    The selected rows of the chosen layers' patterns are replaced (``backend.pattern_hooks`` with
    ``replace_pattern``) by ``softmax`` of free logits, initialised at the original pattern's log plus Gaussian
    noise (``init_noise``; JSD has zero gradient at the original). With ``keys="context"`` only the distribution
    over context keys is free (its total mass and the weights outside the context stay); ``"all"`` frees every
    visible key. Adam maximises ``mean JSD − penalty · max(0, |Δ output| − tolerance)`` for ``steps`` steps.
    Costs ``1 + steps`` forward and ``steps`` backward passes.
    """
    backend = get_backend(model)
    output = check_output_type(output)
    check_choice("keys", keys, ("context", "all"))
    check_int("steps", steps)
    check_positive("tolerance", tolerance, allow_zero=True)
    check_positive("penalty", penalty, allow_zero=True)
    if task.target_token_range is None:
        raise InputError("task: needs a response (a target)")
    layer_list = backend.check_layers(layers)
    row_idx = selected_rows(task, rows).nonzero()[:, 0]
    ctx = context_key_positions(task)
    ids = task.input_ids
    t0, t1 = task.target_token_range
    q_rows = query_rows((t0, t1), True)
    device = backend.device

    originals: dict[int, Tensor] = {}

    def keeper(layer: int) -> Callable[..., None]:
        def hook(pattern: Tensor, hook: Any) -> None:
            originals[layer] = pattern.detach()[:1].float()

        return hook

    with torch.no_grad():
        logits0 = backend.run(ids[None], [(backend.pattern_hook(layer), keeper(layer)) for layer in layer_list])
        y0 = float(span_output(logits0[:, q_rows], ids[None, t0:t1], output)[0])
    orig = torch.stack([originals[layer][0] for layer in layer_list])  # [L, H, n, n]
    orig_rows = orig[:, :, row_idx.to(orig.device), :]  # [L, H, R, n]
    gen = torch.Generator().manual_seed(seed)
    if keys == "context":
        ctx_dev = ctx.to(orig.device)
        ctx_w = orig_rows[..., ctx_dev]
        ctx_mass = ctx_w.sum(-1, keepdim=True)
        init = torch.log(ctx_w / ctx_mass.clamp_min(1e-30) + 1e-9)
        base = orig_rows.index_fill(-1, ctx_dev, 0.0)
    else:
        visible = (torch.arange(task.seq_len)[None, :] <= row_idx[:, None]).to(orig.device)  # [R, n]
        init = torch.log(orig_rows + 1e-9).masked_fill(~visible, -1e9)
    noise = torch.randn(init.shape, generator=gen).to(init.device) * init_noise
    free = (init + noise).clone().requires_grad_(True)
    opt = torch.optim.Adam([free], lr=lr)

    def new_rows() -> Tensor:
        if keys == "context":
            return base.index_add(-1, ctx_dev, ctx_mass * torch.softmax(free, dim=-1))
        return torch.softmax(free.masked_fill(~visible, float("-inf")), dim=-1)

    best = (0.0, 0.0, 0.0)  # (mean JSD, Δ, max head JSD): the original attention is always feasible
    trace: list[tuple[float, float]] = []
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            rows_new = new_rows()
            jsd = jensen_shannon(rows_new, orig_rows)  # [L, H, R]
            hooks = []
            for i, layer in enumerate(layer_list):
                full = orig[i].index_copy(1, row_idx.to(orig.device), rows_new[i])[None]
                hooks.extend(backend.pattern_hooks(layer, replace_pattern(full.to(device))))
            y = span_output(backend.run(ids[None], hooks)[:, q_rows], ids[None, t0:t1], output)[0]
            delta = y - y0
            mean_jsd = jsd.mean()
            loss = -mean_jsd + penalty * torch.relu(delta.abs() - tolerance)
            loss.backward()
            opt.step()
            m, d = float(mean_jsd.detach()), float(delta.detach())
            trace.append((m, d))
            if abs(d) <= tolerance and m > best[0]:
                best = (m, d, float(jsd.detach().mean(-1).max()))
    return AdversarialAttention(best[0], best[1], best[2], y0, tolerance, 1 + steps, steps, trace)
