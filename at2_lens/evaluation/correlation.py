"""Correlations of predicted vs actual outputs: Pearson, Spearman and the linear datamodeling score (LDS).

LDS (ContextCite / AT2 evaluation): for one example, the Spearman rank correlation, over random ablation masks,
between a surrogate's predicted output and the actual output; averaged over examples. Ranks use average ranks for
ties (``scipy.stats.rankdata``), so the values equal ``scipy.stats.spearmanr``. A constant input has no defined
correlation: the functions return NaN for it and the means skip NaNs.
"""

from __future__ import annotations

import numpy as np
from jaxtyping import Real
from scipy.stats import rankdata
from torch import Tensor

from at2_lens._typing import typechecked
from at2_lens.errors import InputError

ArrayLike1 = Real[Tensor | np.ndarray, " m"]
ArrayLike2 = Real[Tensor | np.ndarray, "n m"]


def _as_numpy(x: Tensor | np.ndarray) -> np.ndarray:
    """float64 numpy copy of a tensor or array."""
    if isinstance(x, Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _row_pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of x with the same row of y; NaN where a row is constant."""
    xc = x - x.mean(axis=-1, keepdims=True)
    yc = y - y.mean(axis=-1, keepdims=True)
    num = (xc * yc).sum(axis=-1)
    den = np.sqrt((xc * xc).sum(axis=-1) * (yc * yc).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        # A row is constant if its spread is at rounding level relative to its magnitude.
        scale_x = np.abs(x).max(axis=-1) + 1e-300
        scale_y = np.abs(y).max(axis=-1) + 1e-300
        constant = (np.abs(xc).max(axis=-1) <= 1e-12 * scale_x) | (np.abs(yc).max(axis=-1) <= 1e-12 * scale_y)
        r = np.where(constant | (den == 0), np.nan, num / np.where(den == 0, 1.0, den))
    return np.clip(r, -1.0, 1.0)


def _check_pair(x: np.ndarray, y: np.ndarray, name: str) -> None:
    """Both inputs need the same shape and at least two entries per row, all finite."""
    if x.shape != y.shape:
        raise InputError(f"{name}: prediction and actual must have the same shape, got {x.shape} and {y.shape}")
    if x.shape[-1] < 2:
        raise InputError(f"{name}: need at least 2 values to correlate, got {x.shape[-1]}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise InputError(f"{name}: inputs contain NaN or inf")


@typechecked
def pearson(x: ArrayLike1, y: ArrayLike1) -> float:
    """Pearson correlation of two vectors (NaN if either is constant)."""
    a, b = _as_numpy(x), _as_numpy(y)
    _check_pair(a, b, "pearson")
    return float(_row_pearson(a, b))


@typechecked
def spearman(x: ArrayLike1, y: ArrayLike1) -> float:
    """Spearman rank correlation of two vectors (average ranks for ties; NaN if either is constant)."""
    a, b = _as_numpy(x), _as_numpy(y)
    _check_pair(a, b, "spearman")
    return float(_row_pearson(rankdata(a), rankdata(b)))


@typechecked
def lds(pred: ArrayLike1, actual: ArrayLike1) -> float:
    """Linear datamodeling score of one example: Spearman correlation of predicted vs actual outputs over masks."""
    return spearman(pred, actual)


@typechecked
def lds_per_example(pred: ArrayLike2, actual: ArrayLike2) -> np.ndarray:
    """LDS of each row (example) of ``pred`` vs ``actual``, [N masks-per-example] -> [N]; vectorised."""
    a, b = _as_numpy(pred), _as_numpy(actual)
    _check_pair(a, b, "lds_per_example")
    return _row_pearson(rankdata(a, axis=-1), rankdata(b, axis=-1))


def mean_ignoring_nan(values: np.ndarray | list[float]) -> float:
    """Mean over the defined (non-NaN) values; NaN if there are none."""
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else float("nan")
