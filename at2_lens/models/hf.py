"""Load any Hugging Face model (hub id or local directory) as a TransformerLens model, never running remote code.

``load_hf`` is the path for users with a model hub or their own checkpoints; the embedded models go through it
too. Decoders are loaded with ``AutoModelForCausalLM``; BERT/RoBERTa-type configs with ``AutoModelForMaskedLM``
(TransformerLens's encoder classes expect an MLM head; checkpoints without one get a deterministic, untrained
head, seed 0). The Hugging Face model is then wrapped:

- ``"bridge"``: ``TransformerBridge.boot_transformers(label, hf_model=..., tokenizer=...)`` (TL 3.9 and 4.x);
  logits and attention equal the Hugging Face model's.
- ``"hooked"``: ``HookedTransformer`` / ``HookedEncoder`` (TL 3.9 only) built with TransformerLens's
  ``loading`` functions, weights left unprocessed (no LayerNorm folding or centering), so logits and
  ``hook_pattern`` match Hugging Face's.
- ``"auto"``: hooked where TransformerLens has the hooked classes, else bridge.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import torch

from at2_lens._optional import require
from at2_lens._validate import check_choice
from at2_lens.backends import _tl
from at2_lens.errors import InputError, ModelLoadError
from at2_lens.models import BACKEND_CHOICES, BackendChoice, DtypeLike, resolve_dtype

# Model types loaded as masked-LM encoders (TransformerBridge adapters: BertForMaskedLM, RobertaForMaskedLM).
ENCODER_MODEL_TYPES = frozenset({"bert", "roberta"})
# Encoder types TL 3.9's HookedEncoder can be built for.
HOOKED_ENCODER_MODEL_TYPES = frozenset({"bert"})
# Substrings of a model path from which TL 3.9's loader infers the architecture instead of reading config.json.
_TL_NAME_TRIGGERS = ("llama", "gemma", "wav2vec2")
# A hub id: "name" or "org/name" (no leading dot or slash, at most one slash).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")
_RESERVED_KWARGS = frozenset(
    {"trust_remote_code", "dtype", "torch_dtype", "attn_implementation", "device_map", "config", "device"}
)
_SEED = 0


def resolve_backend(backend: str) -> Literal["hooked", "bridge"]:
    """Map ``"auto"`` to ``"hooked"`` where TransformerLens has HookedTransformer (3.x), else ``"bridge"``.

    Raises InputError for an unknown name and ModelLoadError for ``"hooked"`` on TransformerLens 4.x, before any
    weights are read.
    """
    check_choice("backend", backend, BACKEND_CHOICES)
    has_hooked = _tl.has_hooked_classes()
    if backend == "auto":
        return "hooked" if has_hooked else "bridge"
    if backend == "hooked" and not has_hooked:
        version = ".".join(map(str, _tl.tl_version()))
        raise ModelLoadError(
            f"backend='hooked': HookedTransformer/HookedEncoder do not exist in TransformerLens 4.x "
            f"(installed: transformer-lens {version}). Use backend='bridge' (or 'auto'), or install "
            "transformer-lens==3.9.0 for the hooked classes."
        )
    return backend  # type: ignore[return-value]


def _looks_like_path(s: str) -> bool:
    """Whether ``s`` can only be meant as a filesystem path (not a hub id such as ``org/name``)."""
    return not _HUB_ID.match(s) or os.path.isabs(s) or "\\" in s


def _resolve_source(name_or_path: str | os.PathLike[str], gguf_file: str | None) -> tuple[str, bool]:
    """Return ``(source, is_local)``: an absolute directory for local models, else the hub id as given."""
    if isinstance(name_or_path, os.PathLike):
        raw = os.fspath(name_or_path)
        forced_path = True
    elif isinstance(name_or_path, str) and name_or_path.strip():
        raw = name_or_path.strip()
        forced_path = False
    else:
        raise InputError(f"name_or_path: expected a hub id or a local directory, got {name_or_path!r}")
    p = Path(raw).expanduser()
    if p.exists():
        p = p.resolve()
        if not p.is_dir():
            raise ModelLoadError(f"local model path {p} is not a directory (expected a Hugging Face model folder)")
        needed = gguf_file if gguf_file else "config.json"
        if not (p / needed).is_file():
            raise ModelLoadError(
                f"local model directory {p} has no {needed}; expected a Hugging Face model folder "
                "(config.json, weights in safetensors, tokenizer files)"
            )
        return str(p), True
    if forced_path or _looks_like_path(raw):
        raise ModelLoadError(f"local model directory {p.absolute()} does not exist")
    return raw, False


@contextlib.contextmanager
def _seeded() -> Iterator[None]:
    """Fixed RNG while loading, so heads missing from a checkpoint are initialised the same way every time."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        yield


def drop_gguf_quantizer(hf_model: Any) -> None:
    """Forget that ``hf_model`` came from a GGUF file: its weights are already dequantised, plain tensors.

    Without this, ``save_pretrained`` refuses the model and TransformerLens sees a quantisation config.
    """
    qc = getattr(hf_model.config, "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    if qc is not None and str(getattr(method, "value", method)) == "gguf":
        hf_model.hf_quantizer = None
        with contextlib.suppress(AttributeError):
            del hf_model.config.quantization_config
        if hasattr(hf_model, "is_quantized"):
            with contextlib.suppress(AttributeError):
                hf_model.is_quantized = False


def _check_hf_kwargs(hf_kwargs: dict[str, Any]) -> None:
    """Refuse keyword arguments that would enable remote code or clash with the ones load_hf sets itself."""
    bad = sorted(set(hf_kwargs) & _RESERVED_KWARGS)
    if bad:
        if "trust_remote_code" in bad:
            raise InputError(
                "trust_remote_code: at2_lens never runs code shipped with a model; only architectures built "
                "into transformers can be loaded"
            )
        raise InputError(f"load_hf: these keyword arguments are set by at2_lens and cannot be passed: {bad}")


def load_hf_model(
    source: str, *, dtype: torch.dtype = torch.float32, for_hooked: bool = False, **hf_kwargs: Any
) -> tuple[Any, Any, bool]:
    """Load ``(hf_model, tokenizer, is_encoder)`` from a hub id or local directory, in eval mode, on the CPU.

    Decoders load as ``AutoModelForCausalLM``; BERT/RoBERTa as ``AutoModelForMaskedLM``, or for the hooked
    encoder (``for_hooked``) as ``BertForPreTraining``, whose pooler and heads TL 3.9's converter reads. Heads
    missing from the checkpoint are initialised with seed 0. Eager attention (so ``output_attentions`` works and
    matches TransformerLens), ``trust_remote_code=False``, safetensors weights unless the caller says otherwise.
    """
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForMaskedLM,
        AutoTokenizer,
        BertForPreTraining,
    )

    _check_hf_kwargs(hf_kwargs)
    common = {k: v for k, v in hf_kwargs.items() if k != "use_safetensors"}
    model_kwargs = dict(hf_kwargs)
    if "gguf_file" not in model_kwargs:
        model_kwargs.setdefault("use_safetensors", True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False, **common)
            config = AutoConfig.from_pretrained(source, trust_remote_code=False, **common)
            model_type = getattr(config, "model_type", None)
            is_encoder = model_type in ENCODER_MODEL_TYPES
            if is_encoder and for_hooked:
                if model_type not in HOOKED_ENCODER_MODEL_TYPES:
                    raise ModelLoadError(f"HookedEncoder supports BERT only, not {model_type!r}; use backend='bridge'")
                model_cls: Any = BertForPreTraining
            else:
                model_cls = AutoModelForMaskedLM if is_encoder else AutoModelForCausalLM
            with _seeded():
                hf_model = model_cls.from_pretrained(
                    source,
                    config=config,
                    dtype=dtype,
                    attn_implementation="eager",
                    trust_remote_code=False,
                    **model_kwargs,
                )
    except Exception as exc:  # any failure to load (a refused pickle included) is a ModelLoadError
        if isinstance(exc, ModelLoadError):
            raise
        unpickling = type(exc).__name__ == "UnpicklingError"
        why = (
            "its .bin weights hold objects other than tensors; they are only read with torch.load(weights_only=True), "
            "so pickled code is never run" if unpickling else
            "remote code is never enabled; weights must be safetensors unless use_safetensors=False is passed"
        )
        raise ModelLoadError(
            f"could not load the Hugging Face model {source!r} ({why}): {type(exc).__name__}: {str(exc)[:500]}"
        ) from exc
    drop_gguf_quantizer(hf_model)
    # Name the class actually loaded (e.g. BertForMaskedLM for a "BertModel" checkpoint): TransformerLens picks
    # its adapter / weight converter from this.
    hf_model.config.architectures = [type(hf_model).__name__]
    hf_model.eval()
    return hf_model, tokenizer, is_encoder


@contextlib.contextmanager
def _tl_config_dir(hf_config: Any, architecture: str) -> Iterator[str]:
    """A temporary directory holding only ``config.json`` (architecture overridden), for TL 3.9's loader.

    TL 3.9 reads the config from a local path but infers the architecture from the path's *name* when it contains
    e.g. "llama" or "gemma" (then never reading config.json). A neutral temporary name avoids that whatever the
    user's directory is called, and the original weights are never copied.
    """
    cfg = json.loads(hf_config.to_json_string(use_diff=False))
    cfg["architectures"] = [architecture]
    for key in ("quantization_config", "auto_map"):
        cfg.pop(key, None)
    with tempfile.TemporaryDirectory(prefix="at2lens-") as tmp:
        d = Path(tmp).resolve() / "model"
        if any(t in str(d).lower() for t in _TL_NAME_TRIGGERS):
            raise ModelLoadError(
                f"the temporary directory {d} contains one of {_TL_NAME_TRIGGERS}, which makes TransformerLens "
                "misread the model; set TMPDIR to another directory"
            )
        d.mkdir()
        (d / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
        yield str(d)


def hooked_from_hf(
    hf_model: Any,
    tokenizer: Any,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    model_name: str | None = None,
    tokenizer_name: str | None = None,
) -> Any:
    """A TL 3.9 ``HookedTransformer`` (decoders) or ``HookedEncoder`` (BERT) with ``hf_model``'s weights.

    For BERT ``hf_model`` must be a ``BertForPreTraining`` (TL's converter reads its MLM and NSP heads).
    Weights are not folded or centred, so logits and attention patterns equal the Hugging Face model's.
    """
    ht, he = _tl.hooked_transformer_class(), _tl.hooked_encoder_class()
    if ht is None or he is None:
        resolve_backend("hooked")  # raises the explanatory ModelLoadError
    from transformer_lens import loading_from_pretrained as loading

    model_type = getattr(hf_model.config, "model_type", None)
    is_encoder = model_type in ENCODER_MODEL_TYPES
    if is_encoder and model_type not in HOOKED_ENCODER_MODEL_TYPES:
        raise ModelLoadError(f"HookedEncoder supports BERT only, not {model_type!r}; use backend='bridge'")
    if is_encoder:
        architecture = "BertForMaskedLM"
    else:
        architecture = (getattr(hf_model.config, "architectures", None) or [type(hf_model).__name__])[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with _tl_config_dir(hf_model.config, architecture) as cfg_dir:
                cfg = loading.get_pretrained_model_config(
                    cfg_dir,
                    hf_cfg=None if is_encoder else hf_model.config.to_dict(),
                    fold_ln=False,
                    device=str(device),
                    n_devices=1,
                    dtype=dtype,
                )
                state_dict = loading.get_pretrained_state_dict(cfg_dir, cfg, hf_model=hf_model, dtype=dtype)
        except (ValueError, KeyError, AttributeError, NotImplementedError) as exc:
            raise ModelLoadError(
                f"TransformerLens {'.'.join(map(str, _tl.tl_version()))} cannot build a hooked model for "
                f"architecture {architecture!r}: {type(exc).__name__}: {exc}. Try backend='bridge'."
            ) from exc
        if model_name:
            cfg.model_name = model_name
        if tokenizer_name:
            cfg.tokenizer_name = tokenizer_name
        if is_encoder:
            model = he(cfg, tokenizer=tokenizer, move_to_device=False)
            result = model.load_state_dict(state_dict, strict=False)
            # Only the attention-mask buffers (rebuilt in __init__) may be missing.
            missing = [k for k in result.missing_keys if not k.endswith((".mask", ".IGNORE"))]
            if missing or result.unexpected_keys:
                raise ModelLoadError(
                    f"HookedEncoder weights do not fit: missing {missing}, unexpected {result.unexpected_keys}"
                )
            with contextlib.redirect_stdout(io.StringIO()):  # TL prints 'Moving model to device'
                model.to(device)
        else:
            model = ht(cfg, tokenizer=tokenizer, move_to_device=False)
            model.load_and_process_state_dict(
                state_dict,
                fold_ln=False,
                center_writing_weights=False,
                center_unembed=False,
                fold_value_biases=False,
                refactor_factored_attn_matrices=False,
            )
            with contextlib.redirect_stdout(io.StringIO()):  # TL prints 'Moving model to device'
                model.move_model_modules_to_device()
    model.eval()
    return model


def bridge_from_hf(
    hf_model: Any, tokenizer: Any, *, label: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Any:
    """``TransformerBridge.boot_transformers(label, hf_model=..., tokenizer=...)``; ``label`` is only a name.

    With ``hf_model`` given, the bridge takes the config from the model and makes no hub call.
    """
    hf_model.to(device)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bridge = _tl.bridge_class().boot_transformers(
                label, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype
            )
    except (ValueError, KeyError, AttributeError, NotImplementedError) as exc:
        raise ModelLoadError(
            f"TransformerBridge cannot wrap {label!r} ({type(hf_model).__name__}): {type(exc).__name__}: {exc}"
        ) from exc
    bridge.eval()
    return bridge


def load_hf(
    name_or_path: str | os.PathLike[str],
    backend: BackendChoice = "auto",
    *,
    device: str | torch.device = "cpu",
    dtype: DtypeLike = torch.float32,
    model_name: str | None = None,
    edit_hf: Callable[[Any], None] | None = None,
    **hf_kwargs: Any,
) -> Any:
    """Load a Hugging Face model id or local model directory as a TransformerLens model, in eval mode.

    Args:
        name_or_path: a hub id (``"org/name"``) or a local directory with ``config.json`` (or with the file named
            by ``gguf_file=``, whose weights are dequantised on load).
        backend: ``"hooked"`` (TL 3.9: ``HookedTransformer``/``HookedEncoder``), ``"bridge"``
            (``TransformerBridge``, TL 3.9 and 4.x) or ``"auto"`` (hooked where available, else bridge).
        device: where the model runs.
        dtype: parameter dtype, a ``torch.dtype`` or its name (``"float32"``, the default; ``"bfloat16"``,
            ``"float16"``, ``"float64"``). The attribution methods run in the model's dtype and do their own
            reductions in float32.
        model_name: the name recorded in ``cfg.model_name`` (default: the hub id or the directory's name).
        edit_hf: called with the loaded Hugging Face model before TransformerLens converts it (e.g. to merge a
            fine-tuned adapter into its weights, ``at2_lens.models.finetuned``); both model classes see the edit.
        **hf_kwargs: passed to ``from_pretrained`` (e.g. ``revision``, ``token``, ``cache_dir``,
            ``local_files_only``, ``gguf_file``, ``use_safetensors=False`` for ``.bin``-only checkpoints).
            ``trust_remote_code`` is refused: remote code is never run.

    Raises:
        InputError: bad backend or keyword argument. ModelLoadError: the path or model cannot be loaded.
    """
    which = resolve_backend(backend)
    dtype = resolve_dtype(dtype)
    _check_hf_kwargs(hf_kwargs)
    if hf_kwargs.get("gguf_file"):
        require("gguf", "smollm2", "loading a GGUF model file (gguf_file=...)")
    source, is_local = _resolve_source(name_or_path, hf_kwargs.get("gguf_file"))
    label = model_name or source
    try:
        hf_model, tokenizer, _ = load_hf_model(source, dtype=dtype, for_hooked=which == "hooked", **hf_kwargs)
    except ModelLoadError as exc:
        if is_local:
            raise
        raise ModelLoadError(f"{exc} (no local directory {Path(source).absolute()} exists either)") from exc
    if edit_hf is not None:
        edit_hf(hf_model)
    if which == "bridge":
        return bridge_from_hf(hf_model, tokenizer, label=label, device=device, dtype=dtype)
    return hooked_from_hf(
        hf_model,
        tokenizer,
        device=device,
        dtype=dtype,
        model_name=(model_name or (Path(source).name if is_local else source.split("/")[-1])),
        tokenizer_name=source,
    )
