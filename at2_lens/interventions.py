"""Attention interventions as small hook factories, TransformerLens style.

A *pattern transform* maps a layer's post-softmax attention pattern ``[batch, head, query, key]`` to a new one.
The backend decides where a transform is applied: at ``blocks.{l}.attn.hook_pattern`` where edits there take
effect, or at ``blocks.{l}.attn.hook_z`` (``z = A · V`` is linear in ``A``) where they are dropped. Readers only
observe and never edit, so they work on every backend that fires ``hook_pattern``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from einops import einsum, repeat
from jaxtyping import Bool, Float
from torch import Tensor

PatternTransform = Callable[[Tensor], Tensor]
"""Maps a pattern ``[batch, head, query, key]`` to a new pattern of the same shape."""

HookFn = Callable[..., Any]
FwdHook = tuple[str, HookFn]


def mask_keys(keep: Bool[Tensor, "batch key"] | Float[Tensor, "batch key"]) -> PatternTransform:
    """Zero the attention to dropped keys and renormalise each row over the kept ones.

    Equivalent to putting the dropped keys under the attention mask (−inf before the softmax). A row whose every
    key is dropped (only possible for a dropped query position) becomes all zeros instead of 0/0 = NaN; no kept
    position can read such a row, since every kept query keeps at least itself.
    """
    keep_f = keep.to(torch.float32)

    def transform(pattern: Tensor) -> Tensor:
        k = keep_f.to(pattern.device, pattern.dtype)
        if k.shape[-1] != pattern.shape[-1] or k.shape[0] not in (1, pattern.shape[0]):
            raise ValueError(
                f"keep mask of shape {tuple(k.shape)} does not fit a pattern of shape {tuple(pattern.shape)}"
            )
        kept = pattern * k[:, None, None, :]
        total = kept.sum(dim=-1, keepdim=True)
        # total == 0 only where every key was dropped; a NaN row (a broken pattern) stays NaN, so it is not hidden
        return torch.where(total == 0, torch.zeros_like(kept), kept / total.clamp_min(torch.finfo(kept.dtype).tiny))

    return transform


def replace_pattern(new_pattern: Float[Tensor, "batch head query key"]) -> PatternTransform:
    """Substitute a given pattern (e.g. ``α · A`` with gradients flowing into it) for the model's own."""

    def transform(pattern: Tensor) -> Tensor:
        if new_pattern.shape[1:] != pattern.shape[1:] or new_pattern.shape[0] not in (1, pattern.shape[0]):
            raise ValueError(
                f"replacement pattern of shape {tuple(new_pattern.shape)} does not fit the model's "
                f"pattern of shape {tuple(pattern.shape)}"
            )
        return new_pattern.to(pattern.dtype).expand_as(pattern)

    return transform


def scale_pattern(alpha: Float[Tensor, " batch"]) -> PatternTransform:
    """Multiply each batch element's pattern by its own ``alpha`` (the integrated-gradients path)."""

    def transform(pattern: Tensor) -> Tensor:
        return pattern * alpha.to(pattern.device, pattern.dtype)[:, None, None, None]

    return transform


def pattern_at_hook_pattern(transform: PatternTransform) -> HookFn:
    """Hook for ``hook_pattern`` that applies ``transform`` in place of the pattern."""

    def hook(pattern: Tensor, hook: Any) -> Tensor:
        return transform(pattern)

    return hook


def _query_heads(x: Tensor, n_heads: int) -> Tensor:
    """Grouped key/value heads ``[batch, pos, kv_head, d]`` repeated to the ``n_heads`` query heads (each kv head
    serves a contiguous group of query heads)."""
    if x.shape[2] == n_heads:
        return x
    return repeat(x, "batch pos kv_head d -> batch pos (kv_head group) d", group=n_heads // x.shape[2])


def z_from_pattern(pattern: Tensor, v: Tensor) -> Tensor:
    """``z[b, q, h, :] = Σ_k A[b, h, q, k] · v[b, k, h, :]``, repeating grouped key/value heads to query heads."""
    v = _query_heads(v, pattern.shape[1]).to(pattern.dtype)
    return einsum(pattern, v, "batch head query key, batch key head d -> batch query head d")


def pattern_from_qk(q: Tensor, k: Tensor, causal: bool, key_mask: Tensor | None = None) -> Tensor:
    """Softmax attention ``softmax(q·kᵀ/√d + masks)`` from ``hook_q``/``hook_k`` (no rotary positions)."""
    k = _query_heads(k, q.shape[2])
    scores = einsum(q, k, "batch query head d, batch key head d -> batch head query key") / q.shape[-1] ** 0.5
    n_q, n_k = scores.shape[-2:]
    if causal:
        future = torch.triu(torch.ones(n_q, n_k, dtype=torch.bool, device=scores.device), diagonal=1)
        scores = scores.masked_fill(future, float("-inf"))
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask.bool().to(scores.device)[:, None, None, :], float("-inf"))
    return torch.softmax(scores, dim=-1)


def pattern_via_z(transform: PatternTransform) -> tuple[HookFn, HookFn, HookFn]:
    """Hooks for ``hook_pattern``, ``hook_v`` and ``hook_z`` that apply ``transform`` by recomputing ``z``.

    For models where ``hook_pattern`` fires before ``hook_z`` but edits to it are dropped. The first two hooks
    only record; the third replaces ``z = A · V`` by ``transform(A) · V``.
    """
    seen: dict[str, Tensor] = {}

    def read_pattern(pattern: Tensor, hook: Any) -> None:
        seen["pattern"] = pattern

    def read_v(v: Tensor, hook: Any) -> None:
        seen["v"] = v

    def write_z(z: Tensor, hook: Any) -> Tensor:
        pattern, v = seen.pop("pattern"), seen.pop("v")
        return z_from_pattern(transform(pattern), v).to(z.dtype)

    return read_pattern, read_v, write_z


def pattern_via_qk_z(
    transform: PatternTransform, causal: bool, key_mask: Callable[[], Tensor | None]
) -> tuple[HookFn, HookFn, HookFn, HookFn]:
    """Hooks for ``hook_q``, ``hook_k``, ``hook_v`` and ``hook_z`` that apply ``transform`` by recomputing ``z``.

    For models whose ``hook_pattern`` fires only after the output was computed (TL 4.x BERT bridge): the pattern
    is rebuilt from ``q`` and ``k`` (the probe checks that this reproduces the model's own pattern), transformed,
    and multiplied into ``v``. ``key_mask`` returns the padding mask of the current forward pass.
    """
    seen: dict[str, Tensor] = {}

    def reader(key: str) -> HookFn:
        def hook(x: Tensor, hook: Any) -> None:
            seen[key] = x

        return hook

    def write_z(z: Tensor, hook: Any) -> Tensor:
        pattern = pattern_from_qk(seen.pop("q"), seen.pop("k"), causal, key_mask())
        return z_from_pattern(transform(pattern), seen.pop("v")).to(z.dtype)

    return reader("q"), reader("k"), reader("v"), write_z


def read_pattern_rows(
    rows: Tensor | slice,
    sink: Callable[[Tensor], None],
) -> HookFn:
    """Hook for ``hook_pattern`` that passes only the query ``rows`` to ``sink``; never stores [N, N]."""

    def hook(pattern: Tensor, hook: Any) -> None:
        sink(pattern[:, :, rows, :])

    return hook


def on_heads(transform: PatternTransform, heads: Sequence[int]) -> PatternTransform:
    """Apply ``transform`` to the patterns of ``heads`` only; every other head keeps its own pattern."""
    chosen_heads = list(heads)

    def on_chosen(pattern: Tensor) -> Tensor:
        chosen = torch.zeros(pattern.shape[1], dtype=torch.bool, device=pattern.device)
        chosen[chosen_heads] = True
        return torch.where(chosen[None, :, None, None], transform(pattern), pattern)

    return on_chosen
