"""Tests for the on-disk AT2 ablation store: round trip, atomicity, resume, sharding, manifest races, determinism."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import at2_lens.files as io_mod
from at2_lens.at2.store import (
    AblationExample,
    AblationStore,
    StoreSettings,
    example_to_bytes,
    random_masks,
    read_example,
    shard_indices,
    write_example,
)
from at2_lens.errors import InputError, StoreError
from at2_lens.files import atomic_write_bytes, is_temp_file, temp_path_for

pytestmark = pytest.mark.line_independent  # no TransformerLens model or backend code runs here

L, H, M = 2, 3, 8
REPO = Path(__file__).resolve().parents[1]


def make_settings(**overrides: object) -> StoreSettings:
    fp = {
        "architecture": "fake",
        "n_layers": L,
        "n_heads": H,
        "n_kv_heads": H,
        "d_model": 16,
        "d_vocab": 50,
        "vocab_sha256": None,
    }
    kwargs: dict = {
        "model_fingerprint": fp,
        "n_layers": L,
        "n_heads": H,
        "n_masks": M,
        "seed": 3,
        "granularity": "token",
    }
    kwargs.update(overrides)
    return StoreSettings(**kwargs)


def make_example(index: int, n_sources: int | None = None) -> AblationExample:
    s = n_sources if n_sources is not None else 3 + index % 5
    g = torch.Generator().manual_seed(index)
    return AblationExample(
        index=index,
        features=torch.rand(s, L, H, generator=g),
        masks=random_masks(s, M, 0.5, seed=3, index=index),
        outputs=torch.randn(M, generator=g),
        full_output=0.1 * index + 0.3,
        meta={"task_id": f"task-{index}", "n_sources": s, "granularity": "token"},
    )


def test_round_trip(tmp_path: Path) -> None:
    store = AblationStore(tmp_path / "s", make_settings())
    written = [make_example(i) for i in (0, 3, 7, 12)]
    for ex in written:
        path = store.write(ex)
        assert path == store.path_for(ex.index) and path.is_file()
    assert len(store) == 4
    assert store.indices() == [0, 3, 7, 12]
    assert store.has(7) and not store.has(8) and 3 in store and 4 not in store
    loaded = store.load()
    assert [e.index for e in loaded] == [0, 3, 7, 12]
    for a, b in zip(written, loaded, strict=True):
        assert a.equals(b)
        assert b.features.dtype == torch.float32 and b.masks.dtype == torch.bool
        assert b.meta == a.meta
    assert store.load([12, 0])[0].equals(written[3])
    # A second handle opened read-only sees the same data and settings.
    reader = AblationStore(tmp_path / "s")
    assert reader.settings == store.settings
    assert reader.read(3).equals(written[1])


def test_full_output_round_trips_exactly(tmp_path: Path) -> None:
    ex = make_example(1)
    assert ex.full_output == float(np.float32(0.1 * 1 + 0.3))  # normalised to float32 on construction
    back = read_example(write_example(tmp_path / "x.safetensors", ex))
    assert back.full_output == ex.full_output
    assert back.equals(ex)


def test_load_missing_indices_raises(tmp_path: Path) -> None:
    store = AblationStore(tmp_path, make_settings())
    store.write(make_example(0))
    with pytest.raises(StoreError, match="1 requested examples"):
        store.load([0, 5])
    with pytest.raises(StoreError, match="example 5 is not in store"):
        store.read(5)


def test_interrupted_write_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = AblationStore(tmp_path, make_settings())
    old = make_example(4)
    store.write(old)
    old_bytes = store.path_for(4).read_bytes()

    real_write = io_mod._write_fsync

    def half_then_crash(path: Path, data: bytes, *, exclusive: bool = True) -> None:
        real_write(path, data[: len(data) // 2], exclusive=exclusive)
        raise KeyboardInterrupt("simulated kill mid-write")

    monkeypatch.setattr(io_mod, "_write_fsync", half_then_crash)
    new = make_example(9)
    with pytest.raises(KeyboardInterrupt):
        store.write(new)
    replacement = AblationExample(4, new.features, new.masks, new.outputs, 1.0)
    with pytest.raises(KeyboardInterrupt):
        store.write(replacement)
    monkeypatch.undo()

    assert not store.path_for(9).exists()
    assert store.path_for(4).read_bytes() == old_bytes  # the old file survived the interrupted overwrite
    assert store.indices() == [4]
    assert sorted(p.name for p in store.examples_dir.iterdir()) == [store.path_for(4).name]


def test_stale_temp_files_ignored_and_cleaned(tmp_path: Path) -> None:
    store = AblationStore(tmp_path, make_settings())
    store.write(make_example(0))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = io_mod._host_tag()
    stale = store.examples_dir / f".{store.path_for(1).name}.{host}.{dead.pid}.0123456789ab.tmp"
    stale.write_bytes(b"partial garbage")
    live_other = store.examples_dir / f".{store.path_for(2).name}.{host}.{os.getppid()}.0123456789ab.tmp"
    live_other.write_bytes(b"someone else is writing")
    own = temp_path_for(store.path_for(3))
    own.write_bytes(b"this process is writing")
    assert is_temp_file(stale) and is_temp_file(live_other) and is_temp_file(own)
    # Readers never list temp files.
    assert store.indices() == [0] and store.missing([0, 1, 2]) == [1, 2]
    # Re-opening as a writer removes the dead writer's file, but not the live writer's.
    AblationStore(tmp_path, make_settings())
    assert not stale.exists()
    assert live_other.exists() and own.exists()


def test_resume_skips_finished_examples(tmp_path: Path) -> None:
    settings = make_settings()
    todo = list(range(10))
    collected: list[int] = []

    def collect(store: AblationStore, crash_after: int | None) -> None:
        for n, i in enumerate(store.missing(todo)):
            if crash_after is not None and n == crash_after:
                raise RuntimeError("killed")
            collected.append(i)
            store.write(make_example(i))

    with pytest.raises(RuntimeError):
        collect(AblationStore(tmp_path, settings), crash_after=4)
    assert collected == [0, 1, 2, 3]
    collect(AblationStore(tmp_path, settings), crash_after=None)
    assert collected == list(range(10))  # each example collected exactly once
    assert AblationStore(tmp_path).indices() == todo


@pytest.mark.parametrize(("n_total", "shard_count"), [(0, 1), (1, 3), (10, 1), (10, 3), (17, 4), (100, 7)])
def test_shards_cover_all_indices_exactly_once(n_total: int, shard_count: int) -> None:
    shards = [shard_indices(n_total, k, shard_count) for k in range(shard_count)]
    flat = sorted(i for shard in shards for i in shard)
    assert flat == list(range(n_total))
    for k, shard in enumerate(shards):
        assert all(i % shard_count == k for i in shard)


def test_shard_arguments_validated() -> None:
    with pytest.raises(InputError, match="shard_index"):
        shard_indices(10, 3, 3)
    with pytest.raises(InputError, match="shard_count"):
        shard_indices(10, 0, 0)


def test_sharded_writers_share_a_store(tmp_path: Path) -> None:
    settings = make_settings()
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            store = AblationStore(tmp_path, settings)
            for i in store.missing(shard_indices(12, k, 3)):
                store.write(make_example(i))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert AblationStore(tmp_path).indices() == list(range(12))


def test_manifest_with_different_settings_raises(tmp_path: Path) -> None:
    AblationStore(tmp_path, make_settings())
    AblationStore(tmp_path, make_settings())  # same settings: joins fine
    fp = dict(make_settings().model_fingerprint, n_layers=30)
    with pytest.raises(StoreError) as info:
        AblationStore(tmp_path, make_settings(n_masks=M, keep_prob=0.25, model_fingerprint=fp))
    msg = str(info.value)
    assert "keep_prob" in msg and "model_fingerprint.n_layers" in msg
    assert "n_masks" not in msg and "seed" not in msg
    assert "0.25" in msg and "30" in msg


def test_concurrent_manifest_creation_is_race_safe(tmp_path: Path) -> None:
    root = tmp_path / "race"
    results: list[str] = []
    barrier = threading.Barrier(8)

    def worker(k: int) -> None:
        settings = make_settings(seed=3 if k % 2 == 0 else 4)
        barrier.wait()
        try:
            AblationStore(root, settings)
            results.append(f"ok{settings.seed}")
        except StoreError as exc:
            assert "seed" in str(exc)
            results.append("err")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winner = AblationStore(root).settings.seed
    assert sorted(results) == sorted([f"ok{winner}"] * 4 + ["err"] * 4)
    assert [p.name for p in root.iterdir() if p.is_file()] == ["store.json"]  # no temp files left


def test_open_without_manifest_raises(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=r"no store\.json"):
        AblationStore(tmp_path)


def test_rewrite_is_byte_identical(tmp_path: Path) -> None:
    store = AblationStore(tmp_path, make_settings())
    ex = make_example(5)
    first = store.write(ex).read_bytes()
    second = store.write(make_example(5)).read_bytes()
    assert first == second
    # A different process (different hash seeds in safetensors' Rust code) writes the same bytes.
    code = (
        "import sys;"
        "from tests.test_store import make_example; from at2_lens.at2.store import example_to_bytes;"
        "sys.stdout.buffer.write(example_to_bytes(make_example(5)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True, cwd=REPO)
    assert out.stdout == first == example_to_bytes(ex)
    manifest = (tmp_path / "store.json").read_bytes()
    AblationStore(tmp_path / "again", make_settings())
    assert (tmp_path / "again" / "store.json").read_bytes() == manifest


def test_corrupted_example_file_is_a_store_error(tmp_path: Path) -> None:
    store = AblationStore(tmp_path, make_settings())
    path = store.write(make_example(2))
    data = path.read_bytes()
    atomic_write_bytes(path, data[:-7])
    with pytest.raises(StoreError, match=r"corrupted example file .*00000002\.safetensors"):
        store.read(2)
    atomic_write_bytes(path, b"\x00" * 5)
    with pytest.raises(StoreError, match="00000002"):
        store.load()
    atomic_write_bytes(path, pickle.dumps({"features": [1, 2, 3]}))
    with pytest.raises(StoreError, match="pickle"):
        store.read(2)
    # A valid file holding another example's data under this index.
    atomic_write_bytes(path, example_to_bytes(make_example(3)))
    with pytest.raises(StoreError, match="holds example 3"):
        store.read(2)


def test_write_checks_example_against_settings(tmp_path: Path) -> None:
    store = AblationStore(tmp_path, make_settings())
    ex = make_example(0)
    with pytest.raises(InputError, match="masks"):
        store.write(AblationExample(0, ex.features, ex.masks[:4], ex.outputs[:4], 0.0))
    with pytest.raises(InputError, match="layers"):
        store.write(AblationExample(0, torch.rand(ex.n_sources, L + 1, H), ex.masks, ex.outputs, 0.0))
    assert len(store) == 0


def test_example_validation() -> None:
    good = make_example(0)
    with pytest.raises(InputError, match="masks"):
        AblationExample(0, good.features, good.masks[:, :-1], good.outputs, 0.0)
    with pytest.raises(InputError, match="outputs"):
        AblationExample(0, good.features, good.masks, good.outputs[:-1], 0.0)
    with pytest.raises(InputError, match="NaN"):
        AblationExample(0, good.features, good.masks, torch.full((M,), float("nan")), 0.0)
    with pytest.raises(InputError, match="JSON"):
        AblationExample(0, good.features, good.masks, good.outputs, 0.0, meta={"x": object()})
    with pytest.raises(InputError, match="index"):
        AblationExample(-1, good.features, good.masks, good.outputs, 0.0)
    as_int = AblationExample(0, good.features, good.masks.to(torch.uint8), good.outputs, 0.0)
    assert as_int.masks.dtype == torch.bool and torch.equal(as_int.masks, good.masks)


def test_random_masks_deterministic_per_index() -> None:
    a = random_masks(50, 32, 0.5, seed=1, index=7)
    assert a.shape == (32, 50) and a.dtype == torch.bool
    assert torch.equal(a, random_masks(50, 32, 0.5, seed=1, index=7))
    assert not torch.equal(a, random_masks(50, 32, 0.5, seed=1, index=8))
    assert not torch.equal(a, random_masks(50, 32, 0.5, seed=2, index=7))
    assert 0.4 < float(a.float().mean()) < 0.6
    store_masks = AblationStore.__new__(AblationStore)
    store_masks.settings = make_settings()
    assert torch.equal(store_masks.masks_for(7, 5), random_masks(5, M, 0.5, seed=3, index=7))


def test_concurrent_reader_never_sees_partial_file(tmp_path: Path) -> None:
    store = AblationStore(tmp_path, make_settings())
    variants = [make_example(1, n_sources=s) for s in (3, 40, 200)]
    store.write(variants[0])
    stop = threading.Event()

    def writer() -> None:
        k = 0
        while not stop.is_set():
            store.write(variants[k % 3])
            k += 1

    t = threading.Thread(target=writer)
    t.start()
    try:
        for _ in range(150):
            got = store.read(1)
            assert any(got.equals(v) for v in variants)
    finally:
        stop.set()
        t.join()


def test_manifest_creation_without_hard_links(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_links(src: object, dst: object) -> None:
        raise PermissionError("hard links not supported")

    monkeypatch.setattr(io_mod.os, "link", no_links)
    assert io_mod.atomic_create_bytes(tmp_path / "m.json", b"first")
    assert not io_mod.atomic_create_bytes(tmp_path / "m.json", b"second")
    assert (tmp_path / "m.json").read_bytes() == b"first"
    AblationStore(tmp_path / "s", make_settings())
    with pytest.raises(StoreError, match="seed"):
        AblationStore(tmp_path / "s", make_settings(seed=9))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "s"]


def test_safetensors_whose_header_length_looks_like_a_pickle_marker_is_read() -> None:
    """Regression: a header of 896 bytes starts the file with 0x80 0x03, a pickle protocol-3 marker."""
    from at2_lens.files import parse_safetensors, safetensors_bytes

    for pad in range(0, 1200):
        data = safetensors_bytes({"x": torch.zeros(3)}, "k", {"pad": "a" * pad})
        if data[0] == 0x80 and data[1] == 0x03:
            break
    else:
        pytest.fail("could not build a header of the problematic length")
    tensors, meta = parse_safetensors(data, "k")
    assert torch.equal(tensors["x"], torch.zeros(3)) and meta["pad"] == "a" * pad
