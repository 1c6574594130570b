"""Keep-masks over sources: ``masks[m, s]`` is True where source ``s`` is kept in ablation ``m``.

Random masks (the ground truth of AT2's training and of LDS, ContextCite's ablations), the masks that ablate a
ranking's top-k sources (top-k drop), the one that ablates nothing, and their expansion to token positions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from jaxtyping import Bool
from torch import Tensor

from at2_lens._typing import typechecked
from at2_lens._validate import check_fraction, check_int
from at2_lens.ranking import top_k
from at2_lens.tasks import Span


@typechecked
def random_masks(
    n_sources: int, n_masks: int, keep_prob: float = 0.5, *, seed: int = 0, index: int = 0
) -> Bool[Tensor, "m s"]:
    """Deterministic random keep-masks for example ``index``: each source kept with probability ``keep_prob``.

    Seeded from (seed, index) only, so a resumed or sharded collection draws the same masks for the same example.
    """
    check_int("n_sources", n_sources)
    check_int("n_masks", n_masks)
    check_fraction("keep_prob", keep_prob)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(index)])))
    return torch.from_numpy(rng.random((n_masks, n_sources)) < keep_prob)


def full_keep(n_sources: int) -> Bool[Tensor, "1 source"]:
    """The keep-mask that ablates nothing."""
    return torch.ones(1, n_sources, dtype=torch.bool)


def topk_masks(scores: Tensor | Sequence[float], ks: Sequence[int]) -> Bool[Tensor, "k source"]:
    """Keep-masks that ablate the top-``k`` sources of ``scores`` (:func:`at2_lens.ranking.rank`), one row per
    ``k`` (``k`` larger than the number of sources is refused)."""
    n = len(scores)
    rows = []
    for k in ks:
        check_int("ks", k, maximum=n)
        keep = torch.ones(n, dtype=torch.bool)
        keep[top_k(scores, k)] = False
        rows.append(keep)
    return torch.stack(rows)


def token_keep(masks: Bool[Tensor, "mask source"], source_ranges: Sequence[Span], n_tokens: int) -> Tensor:
    """Expand source keep-masks to token keep-masks ``[mask, pos]`` (tokens outside sources are always kept)."""
    keep = torch.ones(masks.shape[0], n_tokens, dtype=torch.bool)
    for s, (a, b) in enumerate(source_ranges):
        keep[:, a:b] &= masks[:, s : s + 1]
    return keep


__all__ = ["full_keep", "random_masks", "token_keep", "topk_masks"]
