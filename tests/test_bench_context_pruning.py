"""The context-pruning benchmark's pure parts: suites (deterministic, never mixing train and held-out text), the
oracle keep-mask, the keep rules, the mass share chosen on training tasks only, the report; and one end-to-end run on
a tiny model where two shards merged equal one run."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from at2_lens.data import SQUAD_V2_DEV_SUBSET
from at2_lens.evaluation.squad import squad_split_records
from tests.test_bench_faithfulness import _squad_file

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_context_pruning.py"

pytestmark = pytest.mark.line_independent


def _bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_context_pruning", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_context_pruning"] = mod  # dataclasses look their module up
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


bench = _bench()


@pytest.mark.parametrize("suite", ["squad", "multidoc", "long"])
def test_suites_are_deterministic_and_hold_only_their_split_text(suite: str) -> None:
    train_recs, held_recs = squad_split_records(SQUAD_V2_DEV_SUBSET)
    held_text = {r["context"] for r in held_recs}
    train_text = {r["context"] for r in train_recs}
    for split, own, other in (("held_out", held_text, train_text), ("train", train_text, held_text)):
        a = bench.build_suite(suite, SQUAD_V2_DEV_SUBSET, split, seed=0)
        b = bench.build_suite(suite, SQUAD_V2_DEV_SUBSET, split, seed=0)
        assert [x.task for x in a] == [x.task for x in b] and len(a) == len(train_recs if split == "train" else
                                                                          held_recs)
        for item in a:
            docs = [item.task.context] if isinstance(item.task.context, str) else list(item.task.context)
            for doc in docs:  # every document is (a snippet of) a paragraph of this split, of no other
                assert any(doc in p for p in own) and not any(doc in p for p in other)
            text = item.task.context_text
            a0, b0 = item.own
            assert text[a0:b0] in own  # the question's own paragraph is where `own` says
        if suite == "long":
            assert all(len(x.task.context) == 1 + bench.LONG_OTHERS for x in a)
    other_seed = bench.build_suite(suite, SQUAD_V2_DEV_SUBSET, "held_out", seed=1)
    if suite != "squad":
        assert [x.task for x in other_seed] != [x.task for x in bench.build_suite(suite, SQUAD_V2_DEV_SUBSET,
                                                                                  "held_out", seed=0)]


def test_oracle_keeps_the_sentences_holding_the_gold_answer_in_the_own_paragraph() -> None:
    text = "Paris is big. The Seine flows here. It is long."
    spans = [(0, 13), (14, 35), (36, 47)]
    assert bench.oracle_mask(text, spans, ["Seine"], (0, len(text))).tolist() == [False, True, False]
    assert bench.oracle_mask(text, spans, ["big. The Seine"], (0, len(text))).tolist() == [True, True, False]
    assert bench.oracle_mask(text, spans, ["the seine"], (0, len(text))).tolist() == [False, True, False]
    assert bench.oracle_mask(text, spans, ["Rhine"], (0, len(text))) is None
    # only the question's own paragraph counts: "Paris" lies outside (14, 47)
    assert bench.oracle_mask(text, spans, ["Paris"], (14, 47)) is None


def test_rules_keep_k_or_the_mass_share_and_all_sources_for_a_large_k() -> None:
    scores = torch.tensor([0.1, 0.6, 0.3])
    got = {(r, v): m.tolist() for r, v, m in bench.rule_masks(scores, [1, 5], [0.5, 0.8])}
    assert got[("top_k", 1.0)] == [False, True, False]
    assert got[("top_k", 5.0)] == [True, True, True]
    assert got[("mass", 0.5)] == [False, True, False]
    assert got[("mass", 0.8)] == [False, True, True]


def test_refusals_are_recognised() -> None:
    assert bench.is_refusal("The context does not mention the year.")
    assert bench.is_refusal("I cannot answer that.")
    assert bench.is_refusal("The name of the count is not explicitly mentioned in the given text.")
    assert bench.ends_mid_sentence("it was Robert Gu") and not bench.ends_mid_sentence("It was Robert Guiscard.")
    assert not bench.is_refusal("The Normans lived in France.")


def _rows(split: str, task: str, method: str, rule: str, value: float, f1: float) -> dict:
    return {"suite": "squad", "split": split, "task": task, "method": method, "rule": rule, "value": value,
            "n_sources": 4, "kept": 2, "kept_has_gold": 1.0, "answer": "x", "em": float(f1 == 1.0), "f1": f1,
            "contains": float(f1 > 0), "answer_words": 1, "refusal": 0.0, "log_prob": -1.0, "delta_log_prob": 0.5}


def _frame() -> pd.DataFrame:
    rows = []
    for t in ("train:0", "train:1"):  # on train, mass 0.5 is best for at2
        rows += [_rows("train", t, "full", "full", 4, 0.5), _rows("train", t, "at2", "mass", 0.5, 0.9),
                 _rows("train", t, "at2", "mass", 0.9, 0.2), _rows("train", t, "at2", "top_k", 1, 0.3)]
    for t in ("held_out:0", "held_out:1"):  # on held-out, mass 0.9 would be best: it must not be chosen
        rows += [_rows("held_out", t, "full", "full", 4, 0.5), _rows("held_out", t, "at2", "mass", 0.5, 0.25),
                 _rows("held_out", t, "at2", "mass", 0.9, 1.0), _rows("held_out", t, "at2", "top_k", 1, 0.75)]
    return pd.DataFrame(rows)


def test_mass_share_is_chosen_on_training_tasks_only() -> None:
    df = _frame()
    assert bench.choose_masses(df) == {("squad", "at2"): 0.5}
    # a tie goes to the smaller share
    tie = df.copy()
    tie.loc[(tie.split == "train") & (tie.value == 0.9) & (tie.rule == "mass"), "f1"] = 0.9
    assert bench.choose_masses(tie) == {("squad", "at2"): 0.5}


def test_summary_reports_held_out_means_and_the_paired_difference() -> None:
    summary = bench.summary_rows(_frame())
    by = {(r.method, r.rule): r for r in summary.itertuples()}
    assert set(by) == {("full", "full context"), ("at2", "top-1"), ("at2", "mass 0.5 (train)")}
    assert by[("at2", "top-1")].f1 == pytest.approx(0.75)
    assert by[("at2", "top-1")].df1 == pytest.approx(0.25)
    assert by[("at2", "mass 0.5 (train)")].df1 == pytest.approx(-0.25)  # held-out numbers at the train choice
    md = bench.markdown(summary)
    assert "| at2 | top-1 | 0.000 | 0.750 | +0.250 [+0.250, +0.250] | 1.00 | +0.50 | 2.0 | 1.00 | 1.0 | 0.00 |" in md
    assert "### squad (2 held-out tasks" in md
    ov = bench.overview(summary)
    assert "**squad** (2 held-out tasks, 4.0 sentences on average): full context F1 0.500" in ov
    assert "| at2 | 0.750 (+0.250) | 0.5: 0.250 (-0.250 [-0.250, -0.250]), 2.0 kept |" in ov
    mass_only = bench.overview(summary[summary["rule"] != "top-1"])  # no top-k rule: no empty column
    assert "| method | mass share chosen on training tasks |\n|---|---|" in mass_only


def test_paired_interval_brackets_the_mean() -> None:
    import numpy as np

    diff = np.array([0.0, 0.5, 1.0, -0.25, 0.25, 0.75])
    low, high = bench.paired_interval(diff)
    assert low < diff.mean() < high


def test_shards_split_the_tasks_disjointly() -> None:
    items = list(range(7))
    parts = [bench.shard(items, i, 3) for i in range(3)]
    assert sorted(i for part in parts for i in part) == items and parts[0] == [0, 3, 6]
    with pytest.raises(SystemExit):
        bench.shard(items, 3, 3)


@pytest.mark.slow
def test_two_shards_merged_equal_one_run_on_a_tiny_model(tmp_path: Path) -> None:
    data = _squad_file(tmp_path, 3)
    cheap = [sys.executable, str(SCRIPT), "--model", "tiny", "--data", str(data), "--methods", "avg_attention",
             "--ks", "1", "--masses", "0.5", "--max-new-tokens", "3", "--splits", "held_out,train",
             "--train-limit", "1"]
    one, a, b, merged = (tmp_path / f"{n}.csv" for n in ("one", "a", "b", "merged"))
    for out, extra in ((one, []), (a, ["--shard-index", "0", "--shard-count", "2"]),
                       (b, ["--shard-index", "1", "--shard-count", "2"])):
        proc = subprocess.run([*cheap, "--out", str(out), *extra], capture_output=True, text=True, cwd=ROOT,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
    proc = subprocess.run([sys.executable, str(SCRIPT), "--merge", str(a), str(b), "--out", str(merged)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    key = ["split", "task", "method", "rule", "value"]
    got = pd.read_csv(merged).sort_values(key).reset_index(drop=True)
    want = pd.read_csv(one).sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(got, want)
    assert "## Answer quality (held-out)" in proc.stdout


def test_results_under_another_prompt_are_reported_as_their_own_suite(tmp_path: Path) -> None:
    df = _frame()
    for name, prompt in (("a", "default"), ("b", "short_query")):
        df.to_csv(tmp_path / f"{name}.csv", index=False)
        (tmp_path / f"{name}.json").write_text(f'{{"settings": {{"prompt": "{prompt}"}}}}')
    both = bench.read_results([str(tmp_path / "a.csv"), str(tmp_path / "b.csv")])
    assert set(both["suite"]) == {"squad", "squad (short_query)"}
    summary = bench.summary_rows(both)
    assert set(summary["suite"]) == {"squad", "squad (short_query)"}
    assert bench.choose_masses(both) == {("squad", "at2"): 0.5, ("squad (short_query)", "at2"): 0.5}


def test_a_second_run_adding_methods_combines_with_the_first(tmp_path: Path) -> None:
    df = _frame()
    first = df[df.method != "at2"]  # full context only
    second = df.copy()  # full again (identical rows) and at2
    second.loc[second.method == "at2", "method"] = "loo"
    for name, part in (("a", first), ("b", second)):
        part.to_csv(tmp_path / f"{name}.csv", index=False)
        (tmp_path / f"{name}.json").write_text('{"settings": {"prompt": "default"}}')
    both = bench.read_results([str(tmp_path / "a.csv"), str(tmp_path / "b.csv")])
    assert len(both) == len(df) and set(both["method"]) == {"full", "loo"}  # the shared rows once
    assert bench.choose_masses(both) == {("squad", "loo"): 0.5}
    # Shared rows that disagree (another model or prompt written without its settings) are refused.
    bad = second.copy()
    bad.loc[bad.method == "full", "answer"] = "other"
    bad.to_csv(tmp_path / "b.csv", index=False)
    with pytest.raises(SystemExit, match="differ between files"):
        bench.read_results([str(tmp_path / "a.csv"), str(tmp_path / "b.csv")])


RESULTS = ROOT / "benchmarks" / "results"


def test_readme_pruning_table_is_the_report_of_the_committed_results() -> None:
    """The README's context-pruning tables are what the report prints for the committed results files."""
    files = sorted(str(p) for p in RESULTS.glob("context_pruning_*.csv"))
    assert files, "no committed context-pruning results"
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("<!-- pruning -->", 1)[1].split("<!-- /pruning -->", 1)[0]
    summary = bench.summary_rows(bench.read_results(files))
    want = bench.overview(summary)
    assert [ln.strip() for ln in block.strip().splitlines()] == [ln.strip() for ln in want.strip().splitlines()]
    md = (RESULTS / "context_pruning.md").read_text(encoding="utf-8")
    assert want.strip() in md
    assert bench.markdown(summary).strip() in md
