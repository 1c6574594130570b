"""The one ranking rule: highest first, ties by position; every top-k in the package follows it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from at2_lens.ablation import topk_masks
from at2_lens.errors import InputError
from at2_lens.head_ablation import top_heads
from at2_lens.pruning import top_k_mask
from at2_lens.ranking import rank, top_k
from at2_lens.results import SourceAttribution

pytestmark = pytest.mark.line_independent  # no TransformerLens model or backend code runs here

SCORES = [0.5, 2.0, 0.5, 2.0, -1.0]


def test_rank_breaks_ties_by_position_in_both_directions() -> None:
    assert rank(SCORES) == [1, 3, 0, 2, 4]
    assert rank(SCORES, largest=False) == [4, 0, 2, 1, 3]
    assert rank(torch.tensor(SCORES)) == rank(np.array(SCORES)) == rank(SCORES)
    assert top_k(SCORES, 3) == [1, 3, 0] and top_k(SCORES, 9) == rank(SCORES)
    with pytest.raises(InputError, match=r"^k: expected an integer >= 1"):
        top_k(SCORES, 0)


def test_every_top_k_of_the_package_agrees() -> None:
    scores = torch.tensor(SCORES)
    result = SourceAttribution(scores, tuple("abcde"), tuple((i, i + 1) for i in range(5)), "abcde", "t", "t", "m")
    assert result.ranking() == rank(scores)
    assert [i for i, _, _ in result.top_k(3)] == top_k(scores, 3)
    assert top_k_mask(scores, 3).nonzero().flatten().tolist() == sorted(top_k(scores, 3))
    assert (~topk_masks(scores, [3])[0]).nonzero().flatten().tolist() == sorted(top_k(scores, 3))
    heads = top_heads(scores.reshape(1, 5), 3)
    assert [h for _, h in heads] == top_k(scores, 3)
