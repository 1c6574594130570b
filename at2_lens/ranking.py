"""The one ranking rule of at2_lens: highest score first, ties broken by position (earlier first).

Every top-k in the package (a result's ``ranking``/``top_k``, the sources a top-k drop ablates, the sources context
pruning keeps, the heads ``top_heads`` picks) orders with :func:`rank`, so two of them never disagree on a tie.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import Tensor

from at2_lens._validate import check_int


def _as_list(scores: Tensor | np.ndarray | Sequence[float]) -> list[float]:
    if isinstance(scores, Tensor):
        return scores.detach().cpu().double().reshape(-1).tolist()
    return np.asarray(scores, dtype=np.float64).reshape(-1).tolist()


def rank(scores: Tensor | np.ndarray | Sequence[float], *, largest: bool = True) -> list[int]:
    """Indices of ``scores`` (flattened) from highest to lowest (``largest=False``: lowest first); ties by index."""
    values = _as_list(scores)
    sign = -1.0 if largest else 1.0
    return sorted(range(len(values)), key=lambda i: (sign * values[i], i))


def top_k(scores: Tensor | np.ndarray | Sequence[float], k: int, *, largest: bool = True) -> list[int]:
    """The first ``k`` indices of :func:`rank` (all of them when ``k`` exceeds the number of scores)."""
    check_int("k", k)
    return rank(scores, largest=largest)[:k]


__all__ = ["rank", "top_k"]
