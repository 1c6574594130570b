"""Token positions of the sources and the target: their validation, which tokens belong to which source, and the
query rows that produce the target.

For a causal model the row producing target token ``t`` is ``t − 1`` (its logits predict ``t``); for an encoder it
is ``t`` itself. Every piece of the engine that reads the target's rows (features, outputs, ablations, attention
checks) takes them from :func:`query_rows`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from at2_lens.errors import InputError
from at2_lens.tasks import Span


def check_spans(source_ranges: Sequence[Span], target_range: Span, n_tokens: int, causal: bool) -> None:
    """Validate token ranges of sources and target before any model work."""
    if not source_ranges:
        raise InputError("source_ranges: expected at least one source")
    prev_end = -1
    for i, (a, b) in enumerate(source_ranges):
        if not (0 <= a < b <= n_tokens):
            raise InputError(f"source_ranges[{i}]: expected 0 <= start < end <= {n_tokens}, got ({a}, {b})")
        if a < prev_end:
            raise InputError(f"source_ranges[{i}]: ({a}, {b}) overlaps or precedes the previous source")
        prev_end = b
    t0, t1 = target_range
    lowest = 1 if causal else 0
    if not (lowest <= t0 < t1 <= n_tokens):
        raise InputError(f"target_range: expected {lowest} <= start < end <= {n_tokens}, got ({t0}, {t1})")
    if causal and t0 < source_ranges[-1][1]:
        raise InputError(f"target_range: the target ({t0}, {t1}) must come after every source for a causal model")


def membership(source_ranges: Sequence[Span], n_tokens: int) -> Float[Tensor, "pos source"]:
    """One-hot matrix: entry ``[k, s]`` is 1 when token ``k`` belongs to source ``s``."""
    m = torch.zeros(n_tokens, len(source_ranges))
    for s, (a, b) in enumerate(source_ranges):
        m[a:b, s] = 1.0
    return m


def query_rows(target_range: Span, causal: bool) -> slice:
    """The query rows whose outputs produce the target tokens (shifted by one for a causal model)."""
    t0, t1 = target_range
    return slice(t0 - 1, t1 - 1) if causal else slice(t0, t1)


__all__ = ["check_spans", "membership", "query_rows"]
