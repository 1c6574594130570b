"""The faithfulness benchmark script: ``--tasks`` splits the held-out tasks between processes and ``--merge`` folds
their results into one file that equals a single-process run; ``--rescore`` recomputes one method's rows and then equals
a fresh run; the multi-document suite; the README's tables are the script's output for the committed results."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from at2_lens.data import SQUAD_V2_DEV_SUBSET
from at2_lens.evaluation.squad import is_held_out, squad_split

pytestmark = pytest.mark.line_independent

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_faithfulness.py"
CHEAP = ["--model", "tiny", "--small", "--methods", "avg_attention,loo", "--metrics", "lds,kendall_loo",
         "--n-eval-masks", "4"]


def _squad_file(tmp_path: Path, n_held_out: int = 3) -> Path:
    """A SQuAD-format file with ``n_held_out`` held-out and two training paragraphs (ids picked by the split's
    hash), spread over two articles so that multi-document tasks find distractors from another article."""
    held: list[dict] = []
    train: list[dict] = []
    i = 0
    while len(held) < n_held_out or len(train) < 2:
        qid = f"q{i:04d}"
        i += 1
        split = held if is_held_out(qid) else train
        if split is train and len(train) >= 2:
            continue
        n = i
        context = (f"Paragraph {n} is about rivers. The river number {n} flows north. "
                   f"It is {n + 3} miles long. Fish live in it.")
        split.append({"context": context, "qas": [{"id": qid, "question": f"How long is river {n}?",
                                                    "answers": [{"text": f"{n + 3} miles", "answer_start": 0}],
                                                    "is_impossible": False}]})
    articles = [{"title": title, "paragraphs": held[k::2] + train[k::2]} for k, title in enumerate(("Rivers", "Lakes"))]
    path = tmp_path / "squad.json"
    path.write_text(json.dumps({"version": "v2.0", "data": articles}))
    return path


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *CHEAP, *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)


def test_two_processes_with_tasks_then_merge_equal_one_run(tmp_path: Path) -> None:
    data = _squad_file(tmp_path)
    one, a, b = tmp_path / "one.csv", tmp_path / "a.csv", tmp_path / "b.csv"
    for out, extra in ((one, []), (a, ["--tasks", ":1"]), (b, ["--tasks", "1:"])):
        proc = _run("--data", str(data), "--out", str(out), *extra)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert set(pd.read_csv(a)["task"]) == {0}
    assert set(pd.read_csv(b)["task"]) == {1, 2}
    merged = _run("--data", str(data), "--out", str(a), "--merge", str(b), "--table-only")
    assert merged.returncode == 0, merged.stderr[-2000:]
    got, want = pd.read_csv(a), pd.read_csv(one)
    cols = ["method", "task", "metric", "k", "value", "n_sources", "forward_passes", "backward_passes"]
    pd.testing.assert_frame_equal(got[cols], want[cols])  # time_ratio is a measured wall time, not compared
    meta_a = json.loads(a.with_suffix(".json").read_text())
    meta_one = json.loads(one.with_suffix(".json").read_text())
    assert meta_a == meta_one
    # merging again would count tasks twice: refused, and the file is left as it was
    before = a.read_bytes()
    again = _run("--data", str(data), "--out", str(a), "--merge", str(b), "--table-only")
    assert again.returncode != 0 and "in both" in again.stderr
    assert a.read_bytes() == before


@pytest.mark.parametrize("bad", ["5", "a:b", "1:2:3"])
def test_bad_task_range_is_refused_before_any_work(tmp_path: Path, bad: str) -> None:
    # the data file does not exist: the range is checked first, before data or model are touched
    proc = _run("--data", str(tmp_path / "absent.json"), "--tasks", bad)
    assert proc.returncode != 0
    assert "--tasks" in proc.stderr and "START:STOP" in proc.stderr and "absent" not in proc.stderr


def test_missing_merge_file_is_refused_before_any_work(tmp_path: Path) -> None:
    # the data file does not exist either: the merge file is checked first, before data or model are touched
    proc = _run("--data", str(tmp_path / "absent.json"), "--out", str(tmp_path / "a.csv"),
                "--merge", str(tmp_path / "nope.csv"))
    assert proc.returncode != 0
    assert "--merge" in proc.stderr and "nope.csv" in proc.stderr and "absent" not in proc.stderr
    assert not (tmp_path / "a.csv").exists()


def test_merge_of_a_file_with_other_settings_is_refused(tmp_path: Path) -> None:
    data = _squad_file(tmp_path, 2)
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    assert _run("--data", str(data), "--out", str(a), "--tasks", ":1").returncode == 0
    assert _run("--data", str(data), "--out", str(b), "--tasks", "1:", "--seed", "1").returncode == 0
    before = a.read_bytes()
    proc = _run("--data", str(data), "--out", str(a), "--merge", str(b))
    assert proc.returncode != 0 and "other settings" in proc.stderr
    assert a.read_bytes() == before


def test_multidoc_suite_runs_generated_tasks_and_keeps_its_own_results(tmp_path: Path) -> None:
    data = _squad_file(tmp_path, 2)
    out = tmp_path / "md.csv"
    proc = _run("--data", str(data), "--out", str(out), "--suite", "multidoc", "--tasks", ":1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "suite: multidoc" in proc.stdout
    rows = pd.read_csv(out)
    assert set(rows["task"]) == {0} and rows["value"].notna().any()
    assert json.loads(out.with_suffix(".json").read_text())["settings"]["suite"] == "multidoc"
    # the same file cannot be resumed as the squad suite: the settings differ
    again = _run("--data", str(data), "--out", str(out), "--tasks", "1:2")
    assert again.returncode != 0 and "other settings" in again.stderr


def _markdown_table(text: str) -> list[str]:
    """The lines of the first markdown table in ``text``, without indentation."""
    lines = [line.strip() for line in text.splitlines()]
    start = next(i for i, line in enumerate(lines) if line.startswith("| method |"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[start:end]


@pytest.mark.real
@pytest.mark.parametrize(("suite", "csv", "marker"), [
    ("squad", "faithfulness_full.csv", "faithfulness"),
    ("multidoc", "faithfulness_multidoc.csv", "faithfulness-multidoc"),
])
def test_readme_tables_are_the_benchmark_output(suite: str, csv: str, marker: str) -> None:
    """The README's faithfulness tables are what ``--table-only`` prints for the committed results, not hand-written."""
    data = SQUAD_V2_DEV_SUBSET
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split(f"<!-- {marker} -->", 1)[1].split(f"<!-- /{marker} -->", 1)[0]
    proc = subprocess.run([sys.executable, str(SCRIPT), "--suite", suite, "--data", str(data), "--table-only",
                           "--out", str(ROOT / "benchmarks" / "results" / csv)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _markdown_table(block) == _markdown_table(proc.stdout)
    evaluated = proc.stdout.split("evaluated ", 1)[1].split(" held-out tasks", 1)[0]
    assert f"{evaluated} held-out" in block or f"all {evaluated}" in block  # the prose states how many tasks


def _tiny_estimator(path: Path, sign: float) -> Path:
    """An estimator for the benchmark's tiny model (its fingerprint, so it loads) that reads its first head only,
    with weight ``sign``: the two signs rank the sources in opposite orders, so their metrics differ."""
    import torch

    from at2_lens.at2.estimator import LinearEstimator, model_fingerprint
    from at2_lens.backends import get_backend
    from at2_lens.models.tiny import load_tiny

    backend = get_backend(load_tiny("llama"))
    weights = torch.zeros(backend.n_layers * backend.n_heads)
    weights[0] = sign
    LinearEstimator(weights.reshape(backend.n_layers, backend.n_heads), granularity="sentence",
                    model_fingerprint=model_fingerprint(backend)).save(path)
    return path


def test_rescore_replaces_only_at2_rows_and_equals_a_fresh_run(tmp_path: Path) -> None:
    """After retraining, ``--rescore at2`` recomputes AT2's rows; the file then equals a run made with the new
    estimator from scratch, the other methods' rows are untouched, and the settings name the new weights."""
    data = _squad_file(tmp_path, 2)
    est_a, est_b = _tiny_estimator(tmp_path / "a.safetensors", 1.0), _tiny_estimator(tmp_path / "b.safetensors", -1.0)
    methods = ["--methods", "at2,avg_attention,loo"]
    old, fresh = tmp_path / "old.csv", tmp_path / "fresh.csv"
    assert _run("--data", str(data), "--out", str(old), *methods, "--estimator", str(est_a)).returncode == 0
    assert _run("--data", str(data), "--out", str(fresh), *methods, "--estimator", str(est_b)).returncode == 0
    before = pd.read_csv(old)
    # a plain resume with another estimator is refused: its rows would be mixed with the old estimator's
    mixed = _run("--data", str(data), "--out", str(old), *methods, "--estimator", str(est_b))
    assert mixed.returncode != 0 and "other settings" in mixed.stderr
    proc = _run("--data", str(data), "--out", str(old), *methods, "--estimator", str(est_b), "--rescore", "at2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    got, want = pd.read_csv(old), pd.read_csv(fresh)
    cols = ["method", "task", "metric", "k", "value", "n_sources", "forward_passes", "backward_passes"]
    pd.testing.assert_frame_equal(got[cols], want[cols])
    others = before["method"] != "at2"
    pd.testing.assert_frame_equal(got[others].reset_index(drop=True), before[others].reset_index(drop=True))
    assert "re-scored ['at2'] on task 1" in proc.stderr
    at2 = before["method"] == "at2"
    assert not got.loc[at2, "value"].reset_index(drop=True).equals(before.loc[at2, "value"].reset_index(drop=True))
    meta = json.loads(old.with_suffix(".json").read_text())
    assert meta["settings"] == json.loads(fresh.with_suffix(".json").read_text())["settings"]
    assert "rescore" not in meta


def test_rescore_can_add_a_method_and_then_equals_a_fresh_run(tmp_path: Path) -> None:
    """``--rescore at2,at2_refined4`` on a file run without AT2Refined adds its rows after AT2's; the file then
    equals a run made with both from scratch. Re-scoring only AT2 while AT2Refined is in the run is refused (both
    use the estimator), and so is a re-scoring that would add a method it does not compute."""
    data = _squad_file(tmp_path, 2)
    est = _tiny_estimator(tmp_path / "a.safetensors", 1.0)
    old, fresh = tmp_path / "old.csv", tmp_path / "fresh.csv"
    assert _run("--data", str(data), "--out", str(old), "--methods", "at2,avg_attention",
                "--estimator", str(est)).returncode == 0
    both = ["--methods", "at2,at2_refined4,avg_attention", "--estimator", str(est)]
    assert _run("--data", str(data), "--out", str(fresh), *both).returncode == 0
    half = _run("--data", str(data), "--out", str(old), *both, "--rescore", "at2")
    assert half.returncode != 0 and "re-score them together" in half.stderr
    sneaky = _run("--data", str(data), "--out", str(old), *both, "--rescore", "avg_attention")
    assert sneaky.returncode != 0 and "may only add methods it re-scores" in sneaky.stderr
    proc = _run("--data", str(data), "--out", str(old), *both, "--rescore", "at2,at2_refined4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    cols = ["method", "task", "metric", "k", "value", "n_sources", "forward_passes", "backward_passes"]
    pd.testing.assert_frame_equal(pd.read_csv(old)[cols], pd.read_csv(fresh)[cols])
    assert list(dict.fromkeys(pd.read_csv(old)["method"])) == ["at2", "at2_refined4", "avg_attention"]


def test_unfinished_rescore_is_resumed_and_blocks_plain_runs(tmp_path: Path) -> None:
    data = _squad_file(tmp_path, 2)
    est = _tiny_estimator(tmp_path / "a.safetensors", 1.0)
    out = tmp_path / "r.csv"
    args = ["--data", str(data), "--out", str(out), "--methods", "at2,avg_attention", "--estimator", str(est)]
    assert _run(*args).returncode == 0
    meta_file = out.with_suffix(".json")
    meta = json.loads(meta_file.read_text())
    meta["rescore"] = {"methods": ["at2"], "tasks_left": [1]}  # as a re-scoring killed after task 0 leaves it
    meta_file.write_text(json.dumps(meta))
    before = out.read_bytes()
    plain = _run(*args)
    assert plain.returncode != 0 and "being re-scored" in plain.stderr and out.read_bytes() == before
    resumed = _run(*args, "--rescore", "at2")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "re-scored ['at2'] on task 1" in resumed.stderr and "on task 0" not in resumed.stderr
    assert "rescore" not in json.loads(meta_file.read_text())


@pytest.fixture(scope="module")
def one_task_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished benchmark run on a one-task file (x.csv + x.json), made once for the refusal cases."""
    root = tmp_path_factory.mktemp("one_task_run")
    data = _squad_file(root, 1)
    proc = _run("--data", str(data), "--out", str(root / "x.csv"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return root


@pytest.mark.parametrize(("extra", "needle"), [
    (["--rescore", "at2"], "existing --out"),
    (["--rescore", ",", "--out", "OUT"], "method names"),
    (["--rescore", "contextcite256", "--out", "OUT"], "not among"),
    (["--rescore", "avg_attention", "--out", "OUT", "--tasks", "0:1"], "takes no"),
])
def test_bad_rescore_is_refused_before_the_model_loads(one_task_run: Path, tmp_path: Path, extra: list[str],
                                                      needle: str) -> None:
    data = one_task_run / "squad.json"
    out = tmp_path / "x.csv"
    for suffix in (".csv", ".json"):  # each case gets its own copy of the finished run
        out.with_suffix(suffix).write_bytes((one_task_run / "x").with_suffix(suffix).read_bytes())
    before = out.read_bytes()
    proc = _run("--data", str(data), *[str(out) if a == "OUT" else a for a in extra])
    assert proc.returncode != 0 and needle in proc.stderr, proc.stderr[-1000:]
    assert "--rescore" in proc.stderr and "Traceback" not in proc.stderr
    assert out.read_bytes() == before


@pytest.mark.real
@pytest.mark.slow
def test_rescore_on_smollm2_equals_a_fresh_run(tmp_path: Path) -> None:
    """``--rescore at2`` on the real model: the shipped estimator's rows of a held-out SQuAD task replaced by those of
    an estimator with other weights equal a fresh run with that estimator."""
    import dataclasses

    import at2_lens

    # One short held-out paragraph (task 7: 380 characters, 4 sentences), so each of the three runs is cheap.
    _, held = squad_split(SQUAD_V2_DEV_SUBSET)
    squad = json.loads(Path(SQUAD_V2_DEV_SUBSET).read_text(encoding="utf-8"))
    for article in squad["data"]:
        article["paragraphs"] = [p for p in article["paragraphs"] if p["context"] == held[7].context]
    squad["data"] = [a for a in squad["data"] if a["paragraphs"]]
    data = tmp_path / "one_paragraph.json"
    data.write_text(json.dumps(squad), encoding="utf-8")
    shipped = at2_lens.load_estimator()
    other = tmp_path / "other.safetensors"
    dataclasses.replace(shipped, weights=shipped.weights.flip(0)).save(other)  # layers reversed: other rankings
    base = ["--model", "smollm2", "--small", "--limit", "1", "--methods", "at2,avg_attention",
            "--metrics", "lds,kendall_loo", "--n-eval-masks", "8", "--data", str(data)]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(SCRIPT), *base, *args], capture_output=True, text=True, cwd=ROOT,
                              timeout=900)

    old, fresh = tmp_path / "old.csv", tmp_path / "fresh.csv"
    assert run("--out", str(old)).returncode == 0
    assert run("--out", str(fresh), "--estimator", str(other)).returncode == 0
    before = pd.read_csv(old)
    proc = run("--out", str(old), "--estimator", str(other), "--rescore", "at2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    cols = ["method", "task", "metric", "k", "value", "n_sources", "forward_passes", "backward_passes"]
    got, want = pd.read_csv(old), pd.read_csv(fresh)
    pd.testing.assert_frame_equal(got[cols], want[cols])
    at2 = before["method"] == "at2"
    assert not before.loc[at2, "value"].reset_index(drop=True).equals(got.loc[at2, "value"].reset_index(drop=True))
