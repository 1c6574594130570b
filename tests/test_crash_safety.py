"""Crash safety of AT2 collection: SIGKILL at random moments resumes to byte-identical files; bad files are never
read as valid (``AblationStore.read`` raises StoreError, ``collect`` recomputes them on resume)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from at2_lens.at2.collect import collect
from at2_lens.at2.store import AblationStore
from at2_lens.errors import StoreError
from at2_lens.files import temp_path_for
from at2_lens.models.tiny import save_tiny
from at2_lens.tasks import ContextTask

pytestmark = pytest.mark.line_independent

ROOT = Path(__file__).resolve().parents[1]
N_TASKS = 32


def _write_tasks(path: Path, n: int) -> Path:
    lines = [
        json.dumps({"context": [f"The cat {i} sat on the mat. Dogs bark at night.", f"Paris is in France. Item {i} "
                                "is red. The sky is blue."],
                    "query": f"Question {i}?", "response": f"Answer {i}."})
        for i in range(n)
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _n_examples(store: Path) -> int:
    d = store / "examples"
    return len(list(d.glob("*.safetensors"))) if d.is_dir() else 0


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny("llama", tmp_path_factory.mktemp("tiny") / "model")


@pytest.mark.slow
def test_collect_cli_killed_three_times_at_random_moments_resumes_to_identical_store(
    tiny_dir: Path, tmp_path: Path
) -> None:
    tasks = _write_tasks(tmp_path / "tasks.jsonl", N_TASKS)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")

    def cmd(store: Path) -> list[str]:
        return [sys.executable, "-m", "at2_lens.cli", "collect", "--model", str(tiny_dir), "--backend", "bridge",
                "--tasks", str(tasks), "--store", str(store), "--n-masks", "8", "--device", "cpu"]

    clean, killed = tmp_path / "clean", tmp_path / "killed"
    # The uninterrupted reference run goes on beside the killed ones (independent stores).
    reference = subprocess.Popen(cmd(clean), env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    rng = random.Random(20250806)  # seeded: the same three kill moments on every run of the test
    kills = []
    for attempt in range(3):
        before = _n_examples(killed)
        proc = subprocess.Popen(cmd(killed), env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # A random moment inside the collection: after this run has written a random number (1-3) of new examples,
        # plus a random delay (mostly mid-example, sometimes during a write). Counting examples rather than seconds
        # keeps every kill inside the collection on fast and slow machines alike.
        target = before + rng.randint(1, 3)
        deadline = time.time() + 240
        while time.time() < deadline and _n_examples(killed) < target and proc.poll() is None:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.15))
        assert proc.poll() is None, f"kill {attempt}: the collection finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kills.append(_n_examples(killed))
        assert kills[-1] < N_TASKS, f"kill {attempt} came too late ({kills[-1]} examples written)"
        # Whatever is on disk under an example's name is complete and valid.
        assert AblationStore(killed).invalid() == {}
    assert kills == sorted(kills) and kills[0] >= 1  # each run made progress before its kill
    subprocess.run(cmd(killed), check=True, env=env, cwd=ROOT, timeout=300, capture_output=True)
    _, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err.decode()
    assert _n_examples(clean) == N_TASKS
    clean_files, killed_files = _files(clean), _files(killed)
    assert sorted(clean_files) == sorted(killed_files)  # no temp file left behind either
    for name, data in clean_files.items():
        assert killed_files[name] == data, f"{name} differs after three SIGKILLs and a resume"


def _task(i: int) -> ContextTask:
    return ContextTask(context=["The cat sat on the mat. Dogs bark.", f"Paris is in France. Item {i} is red."],
                       query=f"Question {i}?", response="An answer.")


def test_invalid_example_files_are_never_read_as_valid_and_are_recomputed(tiny_llama: object, tmp_path: Path) -> None:
    tasks = [_task(i) for i in range(6)]
    clean = collect(tiny_llama, tasks, tmp_path / "clean", n_masks=4, progress=False)
    reference = _files(clean.root)
    shutil.copytree(clean.root, tmp_path / "store")
    store = AblationStore(tmp_path / "store")
    good = store.path_for(0).read_bytes()
    damaged = {
        1: good[: len(good) // 2],  # truncated (half-written)
        2: b"",  # empty
        3: os.urandom(len(good)),  # garbage
        4: good + b"\0" * 16,  # padded
        5: good,  # another example's complete data under this name
    }
    for index, data in damaged.items():
        store.path_for(index).write_bytes(data)
    for index in damaged:
        with pytest.raises(StoreError, match=store.path_for(index).name):
            store.read(index)
    assert sorted(store.invalid()) == sorted(damaged)
    with pytest.raises(StoreError):
        store.load()  # training never sees a damaged example
    # A temp file of a dead writer (as a SIGKILL mid-write leaves) is removed, never listed as an example.
    stale = temp_path_for(store.path_for(0))
    stale.write_bytes(good[:10])
    os.utime(stale, (0, 0))
    assert 0 in store.indices() and stale.name not in {p.name for p in store.examples_dir.iterdir()
                                                        if p.name.endswith(".safetensors")}
    with pytest.warns(UserWarning, match="5 invalid example files"):
        resumed = collect(tiny_llama, tasks, tmp_path / "store", n_masks=4, progress=False)
    assert resumed.invalid() == {}
    assert _files(resumed.root) == reference  # recomputed byte-identically, temp file gone
    assert all(resumed.read(i).equals(clean.read(i)) for i in range(6))
    assert torch.equal(resumed.read(3).features, clean.read(3).features)
