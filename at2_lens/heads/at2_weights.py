"""AT2's per-head weights as a head ranking: the estimator's ``[layer, head]`` weights (Cohen-Wang et al. 2025).

A large weight says that a head's attention to a source predicts the effect of ablating that source; whether those
heads are the ones the answer needs is what :func:`~at2_lens.heads.causal_check` tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jaxtyping import Float
from torch import Tensor

from at2_lens.errors import InputError


def at2_head_importance(estimator: Any) -> Float[Tensor, "layer head"]:
    """AT2's head weights, ``[layer, head]``, from an ``AT2Attribution``, a ``LinearEstimator`` or an estimator
    file's path (a copy: editing it leaves the estimator alone)."""
    from at2_lens.at2.attribution import AT2Attribution
    from at2_lens.at2.estimator import LinearEstimator, load_estimator_file

    if isinstance(estimator, AT2Attribution):
        return estimator.head_weights
    if isinstance(estimator, str | Path):
        estimator = load_estimator_file(estimator)
    if isinstance(estimator, LinearEstimator):
        return estimator.weights.detach().float().clone()
    raise InputError(f"estimator: expected an AT2Attribution, a LinearEstimator or an estimator file path, got "
                     f"{type(estimator).__name__}")


__all__ = ["at2_head_importance"]
