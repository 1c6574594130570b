"""Pooling a hidden state ``[batch, pos, d_model]`` over positions, padding excluded: the one implementation.

Used by ``SentimentClassifier`` (its head's ``mean`` / ``mean_l2`` pooling, as sentence-transformers pools
all-MiniLM-L6-v2) and by AttAttr's ``PooledOutput`` read-out (which also offers ``cls`` and ``last``).
"""

from __future__ import annotations

from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from at2_lens._validate import check_choice

POOLINGS: tuple[str, ...] = ("mean", "mean_l2")
"""What a classifier head may use. ``mean``: mean of the final hidden states over real tokens; ``mean_l2``: the
same, L2-normalised."""
Pooling = Literal["mean", "mean_l2", "cls", "last"]
POOLING_MODES: tuple[Pooling, ...] = ("mean", "mean_l2", "cls", "last")
"""Every pooling ``pool`` knows: ``POOLINGS``, ``cls`` (position 0) and ``last`` (each row's last real token)."""


def last_real_positions(n_rows: int, n_pos: int, attention_mask: Tensor | None) -> Tensor:
    """Index of each row's last real (unpadded) token, ``[batch]`` (``n_pos - 1`` everywhere without a mask)."""
    if attention_mask is None:
        return torch.full((n_rows,), n_pos - 1, dtype=torch.long)
    idx = torch.arange(n_pos).expand(n_rows, n_pos)
    return torch.where(attention_mask.cpu().bool(), idx, -1).max(dim=1).values


def mean_pool(
    hidden: Float[Tensor, "batch pos d_model"], attention_mask: Int[Tensor, "batch pos"] | None = None
) -> Float[Tensor, "batch d_model"]:
    """Mean of ``hidden`` over the real tokens (``attention_mask`` 1); all positions when the mask is None."""
    if attention_mask is None:
        return hidden.mean(dim=1)
    m = attention_mask.to(device=hidden.device, dtype=hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)


def pool(
    hidden: Float[Tensor, "batch pos d_model"], attention_mask: Int[Tensor, "batch pos"] | None, pooling: str
) -> Float[Tensor, "batch d_model"]:
    """Apply a pooling from :data:`POOLING_MODES`."""
    check_choice("pooling", pooling, POOLING_MODES)
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "last":
        last = last_real_positions(hidden.shape[0], hidden.shape[1], attention_mask).to(hidden.device)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    pooled = mean_pool(hidden, attention_mask)
    if pooling == "mean_l2":
        pooled = torch.nn.functional.normalize(pooled, p=2.0, dim=-1, eps=1e-12)
    return pooled


__all__ = ["POOLINGS", "POOLING_MODES", "Pooling", "last_real_positions", "mean_pool", "pool"]
