"""Tests for the AT2 estimator: scoring, the safetensors file format, and every way loading must refuse a file."""

from __future__ import annotations

import hashlib
import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jaxtyping
import pytest
import torch
from safetensors.torch import save_file

import at2_lens.files as io_mod
from at2_lens.at2.estimator import (
    ESTIMATOR_META_KEY,
    LinearEstimator,
    compare_fingerprints,
    load_estimator_file,
    model_fingerprint,
    vocab_sha256,
)
from at2_lens.errors import EstimatorFileError, InputError

pytestmark = pytest.mark.line_independent  # no TransformerLens model or backend code runs here


class FakeTokenizer:
    def __init__(self, vocab: dict[str, int]) -> None:
        self._vocab = vocab

    def get_vocab(self) -> dict[str, int]:
        return dict(self._vocab)


@dataclass
class FakeBackend:
    architecture: str = "LlamaForCausalLM"
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    d_model: int = 32
    d_vocab: int = 5
    tokenizer: Any = None


def fake_backend(**kw: Any) -> FakeBackend:
    kw.setdefault("tokenizer", FakeTokenizer({"a": 0, "b": 1, "<s>": 2, "c": 3, "d": 4}))
    return FakeBackend(**kw)


def make_estimator(n_layers: int = 2, n_heads: int = 4, **kw: Any) -> LinearEstimator:
    weights = torch.arange(n_layers * n_heads, dtype=torch.float32).reshape(n_layers, n_heads) / 10
    kw.setdefault("model_fingerprint", model_fingerprint(fake_backend(n_layers=n_layers, n_heads=n_heads)))
    kw.setdefault("training", {"steps": 10, "lr": 0.001, "lds_held_out": 0.5, "n_examples": 3})
    return LinearEstimator(weights, granularity="sentence", **kw)


class Boom:
    """Unpickling this object would create a marker file: proves loading never unpickles."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def test_score_matches_manual_sum() -> None:
    est = make_estimator()
    feats = torch.rand(7, 2, 4)
    expected = (feats * est.weights).sum(dim=(1, 2))
    torch.testing.assert_close(est.score(feats), expected)
    batched = torch.rand(3, 7, 2, 4, dtype=torch.float64)
    out = est.score(batched)
    assert out.shape == (3, 7) and out.dtype == torch.float64
    torch.testing.assert_close(out[1], (batched[1] * est.weights.double()).sum(dim=(1, 2)))
    with pytest.raises(InputError, match="trained for"):
        est.score(torch.rand(7, 3, 4))
    with pytest.raises(jaxtyping.TypeCheckError):
        est.score(torch.rand(2, 4))  # no source axis


def test_uniform_is_average_attention() -> None:
    est = LinearEstimator.uniform(3, 5)
    feats = torch.rand(6, 3, 5)
    torch.testing.assert_close(est.score(feats), feats.mean(dim=(1, 2)))


def test_save_load_round_trip(tmp_path: Path) -> None:
    est = make_estimator()
    path = est.save(tmp_path / "est.safetensors")
    back = load_estimator_file(path, expected_fingerprint=est.model_fingerprint)
    assert torch.equal(back.weights, est.weights)
    assert back.metadata() == est.metadata()
    assert back.granularity == "sentence" and back.training == est.training
    assert LinearEstimator.load(path).metadata() == est.metadata()
    # Self-describing: the metadata is readable JSON in the safetensors header.
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8 : 8 + header_len])
    meta = json.loads(header["__metadata__"][ESTIMATOR_META_KEY])
    assert meta["feature_layout"] == {"name": "per_head_mean_target_sum_source", "n_layers": 2, "n_heads": 4}
    assert meta["format_version"] == 1 and meta["ablation_mode"] == "mask" and meta["output_type"] == "logit_prob"
    # Deterministic bytes, and no temp files left behind.
    first = path.read_bytes()
    est.save(path)
    assert path.read_bytes() == first
    assert [p.name for p in tmp_path.iterdir()] == ["est.safetensors"]


def test_interrupted_save_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = make_estimator().save(tmp_path / "est.safetensors")
    before = path.read_bytes()

    def crash(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(io_mod.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        LinearEstimator.uniform(2, 4).save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["est.safetensors"]


def test_model_fingerprint_of_fake_backend() -> None:
    tok = FakeTokenizer({"b": 1, "a": 0})
    fp = model_fingerprint(fake_backend(tokenizer=tok))
    expected_hash = hashlib.sha256(json.dumps(sorted({"a": 0, "b": 1}.items())).encode()).hexdigest()
    assert fp == {
        "architecture": "LlamaForCausalLM",
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 2,
        "d_model": 32,
        "d_vocab": 5,
        "vocab_sha256": expected_hash,
    }
    assert vocab_sha256(None) is None
    with pytest.raises(InputError, match="d_vocab"):
        model_fingerprint(object())


def test_compare_fingerprints_messages() -> None:
    a = model_fingerprint(fake_backend(n_layers=30, n_heads=9))
    b = model_fingerprint(fake_backend())
    diffs = compare_fingerprints(a, b)
    assert diffs == [
        "estimator was trained for n_layers=30, this model has n_layers=2",
        "estimator was trained for n_heads=9, this model has n_heads=4",
    ]
    assert compare_fingerprints(a, a) == []
    other_vocab = model_fingerprint(fake_backend(tokenizer=FakeTokenizer({"x": 0})))
    (vocab_diff,) = compare_fingerprints(b, other_vocab, a_label="A has", b_label="B has")
    assert vocab_diff.startswith("A has vocab_sha256=") and "B has vocab_sha256=" in vocab_diff
    # Unknown (None or absent) fields are not differences.
    assert compare_fingerprints(b, dict(b, vocab_sha256=None)) == []
    assert compare_fingerprints(b, {"n_layers": 2}) == []


def test_fingerprint_mismatch_refused(tmp_path: Path) -> None:
    path = make_estimator(30, 9).save(tmp_path / "big.safetensors")
    small = model_fingerprint(fake_backend())
    with pytest.raises(EstimatorFileError) as info:
        load_estimator_file(path, expected_fingerprint=small)
    msg = str(info.value)
    assert "estimator was trained for n_layers=30, this model has n_layers=2" in msg
    assert "n_heads=9" in msg and str(path) in msg
    assert "architecture" not in msg  # only the differing fields are named
    load_estimator_file(path)  # without an expected fingerprint it loads


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(EstimatorFileError, match=r"not found: .*nope\.safetensors"):
        load_estimator_file(tmp_path / "nope.safetensors")
    with pytest.raises(EstimatorFileError, match="not a file"):
        load_estimator_file(tmp_path)


@pytest.mark.parametrize("cut", [3, 8, 40, -1, -16])
def test_truncated_file(tmp_path: Path, cut: int) -> None:
    data = make_estimator().to_bytes()
    path = tmp_path / "t.safetensors"
    path.write_bytes(data[:cut])
    with pytest.raises(EstimatorFileError, match="corrupted or not an at2_lens estimator") as info:
        load_estimator_file(path)
    assert str(path) in str(info.value)


def test_garbage_and_padded_files(tmp_path: Path) -> None:
    path = tmp_path / "g.safetensors"
    for data in (b"", b"hello world, not an estimator", make_estimator().to_bytes() + b"\x00" * 8):
        path.write_bytes(data)
        with pytest.raises(EstimatorFileError, match="corrupted or not an at2_lens estimator"):
            load_estimator_file(path)


def test_pickle_refused_without_unpickling(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled.marker"
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps({"weights": Boom(marker)}))
    with pytest.raises(EstimatorFileError, match="pickle") as info:
        load_estimator_file(path)
    assert "refus" in str(info.value)
    assert not marker.exists()
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"weights": [1.0, 2.0]}, protocol=2))
    with pytest.raises(EstimatorFileError, match="pickle"):
        load_estimator_file(plain)


@pytest.mark.parametrize("zipfile_format", [True, False])
def test_torch_save_refused(tmp_path: Path, zipfile_format: bool) -> None:
    path = tmp_path / "est.pt"
    torch.save({"weights": torch.ones(2, 4)}, path, _use_new_zipfile_serialization=zipfile_format)
    with pytest.raises(EstimatorFileError, match="pickle"):
        load_estimator_file(path)


def _write_raw(path: Path, weights: torch.Tensor, meta: dict[str, Any]) -> Path:
    save_file({"weights": weights}, str(path), metadata={ESTIMATOR_META_KEY: json.dumps(meta)})
    return path


def test_metadata_lying_about_shape_refused(tmp_path: Path) -> None:
    meta = make_estimator().metadata()
    meta["feature_layout"]["n_layers"] = 3
    path = _write_raw(tmp_path / "lie.safetensors", torch.ones(2, 4), meta)
    with pytest.raises(EstimatorFileError, match=r"n_layers=3.*shape \(2, 4\)"):
        load_estimator_file(path)
    # Fingerprint disagreeing with the layout is inconsistent too.
    meta = make_estimator().metadata()
    meta["model_fingerprint"]["n_heads"] = 12
    path = _write_raw(tmp_path / "lie2.safetensors", torch.ones(2, 4), meta)
    with pytest.raises(EstimatorFileError, match="inconsistent"):
        load_estimator_file(path)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda m: m.update(format="something.else"), "metadata format"),
        (lambda m: m.update(format_version=99), "newer at2_lens"),
        (lambda m: m.update(ablation_mode="zero"), "ablation_mode"),
        (lambda m: m.update(output_type="prob"), "output_type"),
        (lambda m: m.update(model_fingerprint=None), "model_fingerprint"),
        (lambda m: m["feature_layout"].update(name="other_layout"), "feature layout"),
    ],
)
def test_bad_metadata_refused(tmp_path: Path, mutate: Any, match: str) -> None:
    meta = make_estimator().metadata()
    mutate(meta)
    path = _write_raw(tmp_path / "bad.safetensors", torch.ones(2, 4), meta)
    with pytest.raises(EstimatorFileError, match=match):
        load_estimator_file(path)


def test_wrong_tensors_refused(tmp_path: Path) -> None:
    meta = make_estimator().metadata()
    path = _write_raw(tmp_path / "f64.safetensors", torch.ones(2, 4, dtype=torch.float64), meta)
    with pytest.raises(EstimatorFileError, match="float32"):
        load_estimator_file(path)
    path = _write_raw(tmp_path / "nan.safetensors", torch.full((2, 4), float("nan")), meta)
    with pytest.raises(EstimatorFileError, match="NaN"):
        load_estimator_file(path)
    other = tmp_path / "plain.safetensors"
    save_file({"weights": torch.ones(2, 4)}, str(other))  # a safetensors file, but not ours
    with pytest.raises(EstimatorFileError, match="not an at2_lens estimator"):
        load_estimator_file(other)


def test_constructor_validation() -> None:
    with pytest.raises(InputError, match="weights"):
        LinearEstimator(torch.ones(8))
    with pytest.raises(InputError, match="ablation_mode"):
        LinearEstimator(torch.ones(2, 4), ablation_mode="zero")
    with pytest.raises(InputError, match="JSON"):
        LinearEstimator(torch.ones(2, 4), training={"lds": float("nan")}).to_bytes()
