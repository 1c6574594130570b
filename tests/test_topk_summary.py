"""Top-k drop where k >= the task's number of sources removes every source: the same ablation for every method, so
it is NaN and the summaries leave it out instead of flattening the table (issue #16)."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from at2_lens.evaluation.metrics import topk_drop_defined, topk_drop_from
from at2_lens.evaluation.runner import COLUMNS, markdown_table, summarize

pytestmark = pytest.mark.line_independent  # no TransformerLens model or backend code runs here


def test_topk_drop_is_nan_when_k_reaches_the_number_of_sources() -> None:
    v = torch.tensor([0.0, 5.0, 1.0])

    def ablate(masks: torch.Tensor) -> torch.Tensor:
        return masks.float() @ v

    drops = topk_drop_from(ablate, v, ks=(1, 2, 3, 4), full=6.0)
    assert drops[1] == 5.0 and drops[2] == 6.0
    assert math.isnan(drops[3]) and math.isnan(drops[4])
    assert topk_drop_defined(2, 3) and not topk_drop_defined(3, 3)


def _row(method: str, task: int, k: int, value: float, n_sources: int) -> dict[str, object]:
    return {"method": method, "task": task, "metric": "topk_drop_mask", "k": k, "value": value,
            "n_sources": n_sources, "forward_passes": 1, "backward_passes": 0, "time_ratio": 1.0}


def test_summaries_leave_out_rows_where_k_reaches_the_number_of_sources() -> None:
    """Also rows written before evaluate made them NaN (the committed benchmark CSVs hold such values)."""
    rows = []
    for method, good in (("a", 3.0), ("b", 1.0)):
        rows += [_row(method, 0, 1, good, 4), _row(method, 0, 3, good + 1, 4),
                 _row(method, 1, 1, 9.0, 1), _row(method, 1, 3, 9.0, 1)]  # task 1: one source, same for all
    df = pd.DataFrame(rows, columns=COLUMNS)
    df["k"] = df["k"].astype("Int64")
    table = summarize(df)
    assert table.loc["a", "topk_drop_mask@1"] == 3.0 and table.loc["b", "topk_drop_mask@1"] == 1.0
    assert table.loc["a", "topk_drop_mask@3"] == 4.0 and table.loc["b", "topk_drop_mask@3"] == 2.0
    only_undefined = summarize(df[df["task"] == 1])
    assert only_undefined["topk_drop_mask@1"].isna().all()
    assert "–" in markdown_table(only_undefined)
    assert df.loc[2, "value"] == 9.0  # the caller's frame is not changed
