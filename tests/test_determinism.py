"""Determinism: the same seed gives identical masks, features, stores, estimators and scores — across runs and
across shard counts (one shard vs two shards merged by the store). Compared bitwise (zero tolerance) on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from at2_lens.ablation import extract_features, random_masks
from at2_lens.at2.attribution import AT2Attribution
from at2_lens.at2.collect import collect
from at2_lens.at2.store import AblationStore, shard_indices
from at2_lens.at2.training import train_estimator
from at2_lens.backends import get_backend
from at2_lens.baselines import LeaveOneOut
from at2_lens.evaluation.runner import evaluate
from at2_lens.tasks import ContextTask, prepare_task

N_TASKS = 6


def _task(i: int) -> ContextTask:
    return ContextTask(context=[f"The cat {i} sat on the mat. Dogs bark at night.",
                                f"Paris is in France. Item {i} is red. The sky is blue."],
                       query=f"Question {i}?", response=f"Answer {i}.")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_masks_depend_only_on_seed_and_index() -> None:
    a = random_masks(12, 32, seed=7, index=3)
    assert torch.equal(a, random_masks(12, 32, seed=7, index=3))
    assert not torch.equal(a, random_masks(12, 32, seed=8, index=3))
    assert not torch.equal(a, random_masks(12, 32, seed=7, index=4))
    assert 0.3 < a.float().mean().item() < 0.7  # keep probability 0.5


def test_features_are_bitwise_identical_across_passes(tiny_llama: object) -> None:
    backend = get_backend(tiny_llama)
    tt = prepare_task(backend, _task(0), 8)
    runs = [extract_features(tiny_llama, tt.input_ids, list(tt.source_token_ranges), tt.target_token_range)
            for _ in range(2)]
    assert torch.equal(runs[0].row_features, runs[1].row_features)
    assert runs[0].token_logprobs is not None and runs[1].token_logprobs is not None
    assert torch.equal(runs[0].token_logprobs, runs[1].token_logprobs)


@pytest.fixture(scope="module")
def stores(tiny_llama: object, tmp_path_factory: pytest.TempPathFactory) -> dict[str, AblationStore]:
    """The same collection three times: one shard, again one shard, and two shards (written in reverse order)."""
    root = tmp_path_factory.mktemp("determinism")
    tasks = [_task(i) for i in range(N_TASKS)]
    out = {}
    for name in ("one", "again"):
        out[name] = collect(tiny_llama, tasks, root / name, n_masks=4, seed=3, progress=False)
    for shard in (1, 0):
        out["two"] = collect(tiny_llama, tasks, root / "two", n_masks=4, seed=3, shard_index=shard, shard_count=2,
                             progress=False)
    return out


def test_stores_are_byte_identical_across_runs_and_shard_counts(stores: dict[str, AblationStore]) -> None:
    one = _files(stores["one"].root)
    assert len(one) == N_TASKS + 1
    assert _files(stores["again"].root) == one
    assert _files(stores["two"].root) == one
    assert shard_indices(N_TASKS, 1, 2) == [1, 3, 5]
    for i in range(N_TASKS):  # the masks stored are those the seed gives
        ex = stores["two"].read(i)
        assert torch.equal(ex.masks, random_masks(ex.n_sources, 4, seed=3, index=i))


def test_estimator_and_scores_are_bitwise_identical(
    tiny_llama: object, stores: dict[str, AblationStore], tmp_path: Path
) -> None:
    estimators, files, scores = [], [], []
    for name in ("one", "again", "two"):
        store = stores[name]
        examples = store.load()
        est, summary = train_estimator(examples[:4], held_out=examples[4:], steps=40, batch_size=4, seed=5,
                                       progress=False, settings=store.settings)
        estimators.append(est)
        files.append(est.save(tmp_path / f"{name}.safetensors").read_bytes())
        scores.append(AT2Attribution(tiny_llama, estimator=est).attribute(_task(99)).scores)
        assert summary.lds_held_out is not None
    for est, data, s in zip(estimators[1:], files[1:], scores[1:], strict=True):
        assert torch.equal(est.weights, estimators[0].weights)
        assert data == files[0]  # the estimator files too, byte for byte
        assert torch.equal(s, scores[0])
    assert not torch.allclose(estimators[0].weights, torch.full_like(estimators[0].weights, 1 / 8))  # it trained
    other, _ = train_estimator(stores["one"].load()[:4], steps=40, batch_size=4, seed=6, progress=False,
                               settings=stores["one"].settings)
    assert not torch.equal(other.weights, estimators[0].weights)  # and the seed matters (batch sampling)


def test_evaluation_rows_are_identical_whole_or_split_by_task(tiny_llama: object) -> None:
    tasks = [_task(i) for i in range(2)]
    kwargs = {"n_eval_masks": 6, "ks": (1,), "seed": 2, "timing_repeats": 1}
    metrics = ["lds", "topk_drop_mask", "kendall_loo"]

    def run(ids: list[int]) -> list[dict[str, object]]:
        methods = {"avg": AT2Attribution(tiny_llama), "loo": LeaveOneOut(tiny_llama)}  # fresh, as in each process
        df = evaluate(methods, [tasks[i] for i in ids], metrics, task_ids=ids, **kwargs)
        return df.drop(columns="time_ratio").to_dict("records")  # wall-clock ratio: the one column that varies

    whole = run([0, 1])
    merged = sorted(run([1]) + run([0]), key=lambda row: row["task"])
    assert len(whole) == 2 * 2 * 3 and merged == whole
