"""Data-parallel ``at2-lens collect`` / ``evaluate`` under torchrun: 2 CPU processes give the results of one."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from at2_lens.cli import main
from at2_lens.distributed import DataParallel
from at2_lens.errors import InputError
from at2_lens.models.tiny import save_tiny

pytestmark = pytest.mark.line_independent

ROOT = Path(__file__).resolve().parents[1]
EVAL_ARGS = ["--methods", "at2,avg_attention,loo", "--metrics", "lds,topk_drop,kendall_loo", "--n-eval-masks", "6",
             "--ks", "1,2", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny("llama", tmp_path_factory.mktemp("tiny") / "model")


def _write_tasks(path: Path, n: int) -> Path:
    lines = [
        json.dumps({"context": [f"The cat {i} sat on the mat. Dogs bark.", f"Paris is in France. Item {i} is red."],
                    "query": f"Question {i}?", "response": f"Answer {i}."})
        for i in range(n)
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run like the torchrun workers (OMP_NUM_THREADS=1), then restore the thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _torchrun(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "at2_lens.cli", *args]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- the environment contract (no processes needed) ----------------------------------------------------------------


def test_world_of_one_without_launcher_variables() -> None:
    with DataParallel(env={}) as dp:
        assert (dp.rank, dp.world_size, dp.is_main, dp.is_distributed) == (0, 1, True, False)
        assert dp.shard(5) == [0, 1, 2, 3, 4]
        assert dp.compose(1, 3) == (1, 3)
        assert dp.gather_json({"x": [1.5, float("inf")]}) == [{"x": [1.5, float("inf")]}]
        dp.barrier()
        assert dp.device("cpu") == torch.device("cpu")
        assert dp.device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_ranks_split_tasks_and_explicit_shards_exactly_once() -> None:
    world = 2
    ranks = [DataParallel(env={"RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_RANK": str(r)}) for r in range(world)]
    assert [dp.shard(5) for dp in ranks] == [[0, 2, 4], [1, 3]]
    owners: dict[int, list[tuple[int, int]]] = {i: [] for i in range(30)}
    for job in range(3):  # three jobs (--shard-index 0..2 --shard-count 3), each launched with torchrun x2
        for dp in ranks:
            index, count = dp.compose(job, 3)
            assert count == 6
            for i in range(index, 30, count):
                owners[i].append((job, dp.rank))
    assert all(len(o) == 1 for o in owners.values())


@pytest.mark.parametrize(("env", "match"), [
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE"),
    ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE"),
    ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "-1"}, "LOCAL_RANK"),
])
def test_bad_launcher_environment_is_a_clear_error(env: dict[str, str], match: str) -> None:
    with pytest.raises(InputError, match=match):
        DataParallel(env=env)


def test_bad_arguments_are_clear_errors() -> None:
    dp = DataParallel(env={})
    with pytest.raises(InputError, match="shard_index"):
        dp.compose(3, 3)
    with pytest.raises(InputError, match="device"):
        dp.device("tpu:banana")
    with pytest.raises(InputError, match="n_tasks"):
        dp.shard(-1)
    with pytest.raises(InputError, match="obj"):
        dp.gather_json({"x": object()})
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available"):
            dp.device("cuda")


# --- the store protocol, two ranks as threads of this process (rank 0 hosts the TCPStore, as under accelerate) -----


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _two_ranks(body: Callable[[DataParallel], Any], port: int, sessions: int = 1) -> list[list[Any]]:
    def run(rank: int) -> list[Any]:
        env = {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}
        out = []
        for _ in range(sessions):
            with DataParallel(env=env, timeout_s=60) as dp:
                out.append(body(dp))
        return out

    with ThreadPoolExecutor(2) as pool:
        return [f.result(timeout=120) for f in [pool.submit(run, r) for r in range(2)]]


def test_gathers_keep_rank_order_and_never_mix_rounds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)  # rank 0 hosts the store

    def body(dp: DataParallel) -> list[Any]:
        out = []
        for step in range(5):
            out.append(dp.gather_json({"rank": dp.rank, "step": step, "x": [0.1 * dp.rank, float("inf")][:step]}))
            dp.barrier()
        out.append(dp.gather_bytes(b"" if dp.rank else b"\x00\xff"))  # empty and binary payloads
        return out

    (rank0,), (rank1,) = _two_ranks(body, _free_port())
    assert rank0 == rank1
    for step, gathered in enumerate(rank0[:5]):
        assert gathered == [{"rank": r, "step": step, "x": [0.1 * r, float("inf")][:step]} for r in range(2)]
    assert rank0[5] == [b"\x00\xff", b""]


def test_sessions_share_a_store_that_outlives_them(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed as dist

    port = _free_port()
    agent = dist.TCPStore("127.0.0.1", port, 3, is_master=True, wait_for_workers=False)  # as torchrun's agent
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    calls = iter(range(100))

    def body(dp: DataParallel) -> list[Any]:
        return dp.gather_json([dp.rank, next(calls) if dp.rank == 0 else -1])

    rank0, rank1 = _two_ranks(body, port, sessions=3)
    assert rank0 == rank1
    assert [[g[0] for g in session] for session in rank0] == [[0, 1]] * 3
    assert [session[0][1] for session in rank0] == [0, 1, 2]  # each session got its own round, not a stale one
    assert [agent.add(f"at2_lens/0/sessions/{r}", 0) for r in range(2)] == [3, 3]  # one key space per session


def test_store_misconfiguration_is_a_clear_error_before_any_work() -> None:
    env = {"RANK": "1", "WORLD_SIZE": "2"}
    with pytest.raises(InputError, match="MASTER_ADDR"), DataParallel(env=env):
        pass
    with pytest.raises(InputError, match="MASTER_PORT"), DataParallel(env={**env, "MASTER_ADDR": "127.0.0.1",
                                                                           "MASTER_PORT": "70000"}):
        pass
    with pytest.raises(InputError, match="context manager"):
        DataParallel(env={**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}).barrier()


# --- two processes under torchrun ----------------------------------------------------------------------------


@pytest.mark.slow
def test_collect_under_torchrun_equals_one_process(tiny_dir: Path, tmp_path: Path) -> None:
    tasks = _write_tasks(tmp_path / "tasks.jsonl", 5)
    common = ["--model", str(tiny_dir), "--backend", "bridge", "--tasks", str(tasks), "--n-masks", "4",
              "--device", "cpu"]
    with _one_thread():
        assert main(["collect", *common, "--store", str(tmp_path / "single")]) == 0
    proc = _torchrun("collect", *common, "--store", str(tmp_path / "parallel"))
    assert "5 examples" in proc.stdout and "by 2 processes" in proc.stdout
    assert proc.stdout.count("examples in") == 1  # only rank 0 reports
    single, parallel = _files(tmp_path / "single"), _files(tmp_path / "parallel")
    assert sorted(single) == sorted(parallel) and len(single) == 6  # manifest + 5 examples
    for name, data in single.items():
        assert parallel[name] == data, f"{name} differs between 1 and 2 processes"


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        row.pop("time_ratio")  # wall-clock ratio: the only column that may differ between runs
    return rows


@pytest.mark.slow
def test_evaluate_under_torchrun_equals_one_process(tiny_dir: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    tasks = _write_tasks(tmp_path / "tasks.jsonl", 5)
    common = ["--model", str(tiny_dir), "--backend", "bridge", "--tasks", str(tasks), *EVAL_ARGS]
    with _one_thread():
        assert main(["evaluate", *common, "--out", str(tmp_path / "single.csv")]) == 0
    single_out = capsys.readouterr().out
    proc = _torchrun("evaluate", *common, "--out", str(tmp_path / "parallel.csv"))
    single, parallel = _rows(tmp_path / "single.csv"), _rows(tmp_path / "parallel.csv")
    assert len(single) == 5 * 3 * 6 and {r["task"] for r in single} == {"0", "1", "2", "3", "4"}
    assert parallel == single  # same rows, same order, every value to the last digit
    assert "5 tasks, 2 processes; ground truth: 35 forward passes" in proc.stdout
    assert "5 tasks; ground truth: 35 forward passes" in single_out
    assert proc.stdout.count("| method |") == 1  # only rank 0 prints the table
