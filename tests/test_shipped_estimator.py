"""The estimator shipped for SmolLM2: loads, matches the model, and is reproduced from the committed store."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import at2_lens
from at2_lens.at2.pretrained import DEFAULT_ESTIMATOR, shipped_estimator_paths
from at2_lens.data import SQUAD_V2_DEV_SUBSET

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.line_independent
def test_shipped_estimator_file_is_valid() -> None:
    est = at2_lens.load_estimator()
    assert est.weights.shape == (30, 9)
    assert (est.weights >= 0).all() and abs(float(est.weights.sum()) - 1.0) < 1e-5
    assert est.model_fingerprint["n_layers"] == 30 and est.model_fingerprint["architecture"] == "LlamaForCausalLM"
    assert est.training is not None and est.training["lds_held_out"] > est.training["lds_held_out_init"]
    assert est.feature_layout == "per_head_mean_target_sum_source"
    assert est.calibration is not None and est.calibration["scale"] > 0 and est.calibration["offset"] == 0.0
    assert "logit-probability" in est.units
    assert any(p.name == DEFAULT_ESTIMATOR for p in shipped_estimator_paths())


@pytest.mark.line_independent
def test_shipped_estimator_is_reproduced_from_the_store(tmp_path: Path) -> None:
    out = tmp_path / "est.safetensors"
    subprocess.run([sys.executable, "scripts/train_smollm2_estimator.py", "--out", str(out)], check=True, cwd=ROOT,
                   capture_output=True, timeout=600)
    shipped, again = at2_lens.load_estimator(), at2_lens.load_estimator(out)
    torch.testing.assert_close(again.weights, shipped.weights, atol=1e-5, rtol=0)
    assert abs(again.training["lds_held_out"] - shipped.training["lds_held_out"]) < 1e-3
    assert again.calibration["scale"] == pytest.approx(shipped.calibration["scale"], rel=1e-4)


@pytest.mark.real
def test_default_estimator_is_used_for_smollm2(smollm2: object, tiny_llama: object) -> None:
    from at2_lens.at2.pretrained import default_estimator_for

    est = default_estimator_for(smollm2)
    assert est is not None
    at2 = at2_lens.AT2Attribution(smollm2, estimator=est)
    torch.testing.assert_close(at2.head_weights, at2_lens.load_estimator(model=smollm2).weights)
    assert default_estimator_for(tiny_llama) is None  # no shipped estimator fits the tiny model


@pytest.mark.real
def test_shipped_estimator_ranks_the_answer_sentence_first(smollm2: object) -> None:
    """On the demo task, leave-one-out says the answer sentence matters most (tests/test_real_at2.py); AT2 agrees."""
    from at2_lens.tasks import ContextTask
    from at2_lens.tasks.loaders import DEMO_CONTEXT

    task = ContextTask(context=DEMO_CONTEXT, query="What is the height of Mount Everest?",
                       response="The height of Mount Everest is 8,849.")
    res = at2_lens.AT2Attribution(smollm2, estimator=at2_lens.load_estimator()).attribute(task)
    assert "8,849" in res.top_k(1)[0][1]


@pytest.mark.real
@pytest.mark.slow
def test_recorded_squad_metrics_are_reproduced_by_evaluate(smollm2: object) -> None:
    """The model card's held-out SQuAD numbers come from benchmarks/results/faithfulness_full.csv; ``evaluate`` with
    the benchmark's settings reproduces AT2's rows of its first task."""
    import pandas as pd

    from at2_lens.evaluation.runner import evaluate
    from at2_lens.evaluation.squad import squad_split

    recorded = pd.read_csv(ROOT / "benchmarks" / "results" / "faithfulness_full.csv")
    recorded = recorded[(recorded.method == "at2") & (recorded.task == 0)].set_index(["metric", "k"], drop=False)
    _, held = squad_split(SQUAD_V2_DEV_SUBSET)
    methods = {"at2": at2_lens.AT2Attribution(smollm2, estimator=at2_lens.load_estimator())}
    df = evaluate(methods, held[:1], ["lds", "topk_drop_mask"], n_eval_masks=32, ks=(1, 3), max_new_tokens=32,
                  seed=0, task_ids=[0], timing_repeats=1)  # the recorded values do not depend on the timing
    assert len(df) == 3
    for row in df.itertuples():
        want = recorded[(recorded.metric == row.metric) & (recorded.k.fillna(-1) == (-1 if pd.isna(row.k) else row.k))]
        assert len(want) == 1, (row.metric, row.k)
        assert abs(row.value - float(want.value.iloc[0])) < 0.02, (row.metric, row.k, row.value)


@pytest.mark.line_independent
def test_learning_curve_trains_on_halving_subsets_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "never.safetensors"
    proc = subprocess.run([sys.executable, "scripts/train_smollm2_estimator.py", "--tasks", "60", "--steps", "20",
                           "--learning-curve", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    rows = [line.strip("|").split("|") for line in lines]
    sizes = [int(r[0]) for r in rows[1:]]  # rows[0] is the header
    assert sizes == [12, 24, 48]  # 48 = 60 minus the 20 % held out, then halved while >= 12
    assert all(-1.0 <= float(r[1]) <= 1.0 for r in rows[1:])
    assert not out.exists()


@pytest.mark.line_independent
def test_train_script_refuses_more_tasks_than_the_store_holds(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "scripts/train_smollm2_estimator.py", "--tasks", "100000", "--out",
                           str(tmp_path / "x.safetensors")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "--tasks 100000" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x.safetensors").exists()
