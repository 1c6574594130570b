"""How much head rankings agree: Spearman correlation over all heads and the overlap of their top-k sets."""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd
from scipy.stats import spearmanr
from torch import Tensor

from at2_lens._validate import check_int
from at2_lens.errors import InputError
from at2_lens.head_ablation import top_heads


def compare_rankings(rankings: Mapping[str, Tensor], k: int = 10) -> pd.DataFrame:
    """One row per pair of rankings: Spearman's ρ over all heads and how many of their top-``k`` heads they share
    (``overlap``, out of ``k``)."""
    if not isinstance(rankings, Mapping) or len(rankings) < 2:
        raise InputError("rankings: expected a mapping of at least two {name: [layer, head]} tensors")
    shapes = {tuple(r.shape) for r in rankings.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise InputError(f"rankings: expected [layer, head] tensors of one shape, got shapes {sorted(shapes)}")
    k = check_int("k", k, minimum=1, maximum=next(iter(rankings.values())).numel())
    names = list(rankings)
    tops = {n: set(top_heads(rankings[n].float(), k)) for n in names}
    rows = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            rho = spearmanr(rankings[a].flatten().numpy(), rankings[b].flatten().numpy()).statistic
            rows.append({"a": a, "b": b, "spearman": float(rho), "overlap": len(tops[a] & tops[b]), "k": k})
    return pd.DataFrame(rows)


__all__ = ["compare_rankings"]
