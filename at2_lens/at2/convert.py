"""Convert a score estimator saved by the AT2 authors' package (``pip install at2``) into an at2_lens estimator file.

This is the one place at2_lens reads a pickle-based format, and only when asked to: the AT2 package saves its
estimators (``score_estimator.pt``, e.g. on the Hugging Face hub) with ``torch.save``. The file is read with
``torch.load(..., weights_only=True)``, which builds only tensors and plain containers and refuses any other class or
callable *before* constructing it, so no code in the file can run. The loaded structure is then checked against the
one layout the AT2 package writes (version 0.0.1) and anything else is refused, naming the file and the key:

- top level: ``class`` (``"LinearScoreEstimator"``), ``state_dict``, ``feature_extractor``, ``kwargs``, ``extras``;
- ``state_dict``: ``linear.weight`` float ``[1, num_layers * num_heads]`` and, when ``kwargs["bias"]`` is true,
  ``linear.bias`` ``[1]``;
- ``feature_extractor``: ``{"class": "AttentionFeatureExtractor", "kwargs": {"num_layers", "num_heads",
  "model_type"}}``;
- ``kwargs``: the booleans ``normalize``, ``non_negative``, ``bias`` (training options) and, in a file that was loaded
  and saved again, ``extras``; ``extras``: JSON-like values, kept as provenance.

How the reference scores, and why the converted weights give the same scores: for every target token ``t`` and
every token ``k`` before it, its features are the attention weights of all heads from the row predicting ``t`` to
``k``, flattened layer-major (feature ``i = layer * num_heads + head``); the token score is ``w · A[t, k] + b``; a
source's score is the sum of its tokens' scores, averaged over the target tokens. With ``b = 0`` this is exactly
at2_lens's default feature family (``per_head_mean_target_sum_source``: sum over a source's keys, mean over target
rows, raw attention) scored with ``w`` reshaped to ``[num_layers, num_heads]``. A bias adds ``b`` per source *token*,
i.e. ``b · len(source)`` to each source, which no at2_lens feature family represents: a non-zero bias is refused
(the published estimators have none; a zero one is accepted).

What the file does not record, and the converted estimator therefore states as assumptions in its ``training``
provenance: the ablation mode and output the estimator was trained to predict (the AT2 trainer's defaults: masked
sources, the target's logit-probability) and the source granularity (``"unrecorded"``).
"""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from at2_lens.ablation import DEFAULT_LAYOUT
from at2_lens.at2.estimator import LinearEstimator, model_fingerprint
from at2_lens.backends import get_backend
from at2_lens.errors import EstimatorFileError, InputError
from at2_lens.files import canonical_json, read_named_file, sniff_unsafe_format

REFERENCE_PACKAGE = "at2 0.0.1 (the AT2 authors' package)"
REFERENCE_KEYS = ("class", "state_dict", "feature_extractor", "kwargs", "extras")
REFERENCE_ESTIMATOR_CLASS = "LinearScoreEstimator"
REFERENCE_FEATURE_CLASS = "AttentionFeatureExtractor"
# The reference's model_type names (which attention code it runs); each is part of the Hugging Face architecture name
# of the models it is for (LlamaForCausalLM, Qwen2ForCausalLM, Phi3ForCausalLM, Gemma3ForConditionalGeneration).
REFERENCE_MODEL_TYPES = ("llama", "qwen2", "phi3", "gemma3")
_TRAINING_KWARGS = ("normalize", "non_negative", "bias")
_FEATURE_KWARGS = ("num_layers", "num_heads", "model_type")
_STATE_KEYS = ("linear.weight", "linear.bias")
UNRECORDED_GRANULARITY = "unrecorded"

GEMMA3_NOTE = (
    "the AT2 package recomputes gemma-3 attention with a plain causal mask (no sliding window on the local layers), "
    "while at2_lens reads the model's own attention: on prompts longer than the model's sliding window the scores "
    "differ from the reference package's"
)


def _err(path: Path, what: str) -> EstimatorFileError:
    return EstimatorFileError(f"{path}: not an AT2 reference score estimator this converter knows: {what}")


def _refusal_reason(exc: Exception) -> str:
    """The informative part of torch's weights_only refusal (which class/opcode it would not build)."""
    text = str(exc)
    hit = re.search(r"Unsupported (?:global: GLOBAL \S+|operand \d+|[^\n.]*)", text)
    if hit:
        return hit.group(0).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:300]


def _load_weights_only(path: Path) -> tuple[Any, bytes]:
    """``torch.load(weights_only=True)`` of a file that must be a torch.save / pickle file, and the file's bytes."""
    data = read_named_file(path, "reference estimator", EstimatorFileError)
    if sniff_unsafe_format(data) is None:
        if data[:4] == b"PK\x03\x04":
            raise _err(path, "a damaged or unreadable torch.save file (a zip archive that cannot be read: truncated?)")
        hint = " (it looks like a safetensors file: already converted?)" if data[8:9] == b"{" else ""
        raise _err(path, f"not a torch.save file{hint}; the AT2 package saves its estimators with torch.save")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols it was not written with
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True), data
    except Exception as exc:  # the weights_only refusal or a damaged file; never retried unsafely
        if type(exc).__name__ != "UnpicklingError":
            raise _err(path, f"a damaged or unreadable torch.save file ({type(exc).__name__}: {exc})") from None
        raise EstimatorFileError(
            f"{path}: refused: torch.load(weights_only=True) would not build its contents ({_refusal_reason(exc)}). "
            "An AT2 score estimator holds only tensors, strings, numbers and dicts; this file holds something else "
            "(a class or callable), which was not constructed and nothing in it ran. at2_lens never loads such "
            "files with weights_only=False"
        ) from None


def _check_keys(path: Path, where: str, value: Any, allowed: tuple[str, ...], required: tuple[str, ...]) -> dict:
    if not isinstance(value, dict):
        raise _err(path, f"{where} is a {type(value).__name__}, expected a dict")
    bad = [k for k in value if not isinstance(k, str)]
    if bad:
        raise _err(path, f"{where} has non-string key(s) {bad!r}")
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise _err(path, f"unexpected key(s) {unknown} in {where} (known: {list(allowed)})")
    missing = [k for k in required if k not in value]
    if missing:
        raise _err(path, f"missing key(s) {missing} in {where}")
    return value


def _plain_dict(path: Path, where: str, value: Any) -> dict[str, Any]:
    """``value`` if it is a dict of plain JSON data (what provenance can record), else refused."""
    if not isinstance(value, dict):
        raise _err(path, f"{where} is a {type(value).__name__}, expected a dict")
    try:
        canonical_json(value)
    except (TypeError, ValueError) as exc:
        raise _err(path, f"{where} holds values that are not plain JSON data ({exc})") from None
    return dict(value)


def _tensor(path: Path, where: str, value: Any, shape: tuple[int, ...]) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise _err(path, f"{where} is a {type(value).__name__}, expected a tensor")
    if not value.is_floating_point():
        raise _err(path, f"{where} has dtype {value.dtype}, expected a floating-point tensor")
    if tuple(value.shape) != shape:
        raise _err(path, f"{where} has shape {tuple(value.shape)}, expected {shape}")
    out = value.detach().to("cpu", torch.float32)
    if not torch.isfinite(out).all():
        raise _err(path, f"{where} contains NaN or inf")
    return out


def read_reference_estimator(path: Path | str) -> dict[str, Any]:
    """Read and fully validate an AT2-package score estimator file (no model needed).

    Returns ``{"weights": float32 [num_layers, num_heads], "bias": float | None, "model_type": str | None,
    "training_kwargs": {...}, "extras": {...}, "sha256": hex of the file}``; ``weights[l, h]`` is the reference's
    feature ``l * num_heads + h``. Every problem is an ``EstimatorFileError`` naming the file and the key.
    """
    path = Path(path)
    obj, data = _load_weights_only(path)
    top = _check_keys(path, "the top level", obj, REFERENCE_KEYS, REFERENCE_KEYS)
    if top["class"] != REFERENCE_ESTIMATOR_CLASS:
        raise _err(path, f"estimator class {top['class']!r}; only {REFERENCE_ESTIMATOR_CLASS!r} can be converted")
    kwargs = _check_keys(path, "'kwargs'", top["kwargs"], (*_TRAINING_KWARGS, "extras"), _TRAINING_KWARGS)
    for key in _TRAINING_KWARGS:
        if not isinstance(kwargs[key], bool):
            raise _err(path, f"kwargs[{key!r}] is {kwargs[key]!r}, expected True or False")
    fe = _check_keys(path, "'feature_extractor'", top["feature_extractor"], ("class", "kwargs"), ("class", "kwargs"))
    if fe["class"] != REFERENCE_FEATURE_CLASS:
        raise _err(path, f"feature extractor class {fe['class']!r}; only {REFERENCE_FEATURE_CLASS!r} (attention "
                         "weights per head) matches an at2_lens feature layout")
    fkw = _check_keys(path, "feature_extractor['kwargs']", fe["kwargs"], _FEATURE_KWARGS, ("num_layers", "num_heads"))
    n_layers, n_heads = fkw["num_layers"], fkw["num_heads"]
    for key, value in (("num_layers", n_layers), ("num_heads", n_heads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _err(path, f"feature_extractor['kwargs'][{key!r}] is {value!r}, expected a positive integer")
    model_type = fkw.get("model_type")
    if model_type is not None and model_type not in REFERENCE_MODEL_TYPES:
        raise _err(path, f"feature_extractor['kwargs']['model_type'] is {model_type!r}, expected None or one of "
                         f"{list(REFERENCE_MODEL_TYPES)}")
    state = _check_keys(path, "'state_dict'", top["state_dict"], _STATE_KEYS, ("linear.weight",))
    weight = _tensor(path, "state_dict['linear.weight']", state["linear.weight"], (1, n_layers * n_heads))
    bias = None
    if kwargs["bias"] != ("linear.bias" in state):
        raise _err(path, f"kwargs['bias'] is {kwargs['bias']} but state_dict "
                         f"{'has' if 'linear.bias' in state else 'has no'} 'linear.bias'; the file is inconsistent")
    if "linear.bias" in state:
        bias = float(_tensor(path, "state_dict['linear.bias']", state["linear.bias"], (1,))[0])
        if bias != 0.0:
            raise EstimatorFileError(
                f"{path}: the reference estimator has a non-zero bias ({bias!r}). The AT2 package adds the bias to "
                "every source token, so a source's score gains bias x (its number of tokens); no at2_lens feature "
                "layout represents that, so converting it could not reproduce the reference scores. Refused"
            )
    extras = _plain_dict(path, "'extras'", top["extras"])
    if "extras" in kwargs:
        _plain_dict(path, "kwargs['extras']", kwargs["extras"])
    return {
        # The reference flattens features (layer, head) row-major: feature i is layer i // H, head i % H.
        "weights": weight.reshape(n_layers, n_heads).contiguous(),
        "bias": bias,
        "model_type": model_type,
        "training_kwargs": {k: kwargs[k] for k in _TRAINING_KWARGS},
        "extras": extras,
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def convert_reference_estimator(path: Path | str, model: Any) -> LinearEstimator:
    """An at2_lens ``LinearEstimator`` from an AT2-package ``score_estimator.pt``, for ``model``.

    The file is read with ``torch.load(weights_only=True)`` and validated (:func:`read_reference_estimator`); its
    heads must match the model (``num_layers x num_heads`` = the model's layers x attention heads) and its
    ``model_type`` the model's architecture. The result scores with at2_lens's default feature layout (the reference's
    features) and carries ``model``'s fingerprint; save it with ``.save(out)``.

    Raises:
        EstimatorFileError: the file is missing, unsafe, not a known AT2 estimator, or made for another model.
    """
    path = Path(path)
    ref = read_reference_estimator(path)
    backend = get_backend(model)
    fingerprint = model_fingerprint(backend)
    n_layers, n_heads = ref["weights"].shape
    if (n_layers, n_heads) != (backend.n_layers, backend.n_heads):
        raise EstimatorFileError(
            f"{path}: the reference estimator has {n_layers} layers x {n_heads} heads = {n_layers * n_heads} head "
            f"weights, but this model has {backend.n_layers} layers x {backend.n_heads} heads; it was trained for "
            "another model"
        )
    model_type = ref["model_type"]
    arch = str(fingerprint.get("architecture", ""))
    if model_type is not None and arch and model_type not in arch.lower():
        raise EstimatorFileError(
            f"{path}: the reference estimator was made for model_type {model_type!r}, but this model's "
            f"architecture is {arch!r}"
        )
    notes = []
    if model_type == "gemma3" or "gemma3" in arch.lower():
        notes.append(GEMMA3_NOTE)
        warnings.warn(f"{path}: {GEMMA3_NOTE}", UserWarning, stacklevel=2)
    training = {
        "converted_from": REFERENCE_PACKAGE,
        "reference_file": path.name,
        "reference_file_sha256": ref["sha256"],
        "reference_class": REFERENCE_ESTIMATOR_CLASS,
        "reference_features": REFERENCE_FEATURE_CLASS,
        "reference_model_type": model_type,
        "reference_training_options": ref["training_kwargs"],
        "reference_bias": ref["bias"],
        "reference_extras": ref["extras"],
        "head_order": "reference feature index = layer * n_heads + head",
        "assumed": {
            "ablation_mode": "mask", "output_type": "logit_prob", "granularity": UNRECORDED_GRANULARITY,
            "why": "the reference file does not record them; mask and logit_prob are the AT2 trainer's defaults",
        },
        "notes": notes,
    }
    try:
        return LinearEstimator(
            weights=ref["weights"],
            ablation_mode="mask",
            output_type="logit_prob",
            granularity=UNRECORDED_GRANULARITY,
            model_fingerprint=fingerprint,
            training=training,
            feature_layout=DEFAULT_LAYOUT,
        )
    except InputError as exc:  # e.g. provenance that is not JSON after all
        raise EstimatorFileError(f"{path}: cannot convert: {exc}") from None


__all__ = [
    "GEMMA3_NOTE",
    "REFERENCE_KEYS",
    "REFERENCE_MODEL_TYPES",
    "convert_reference_estimator",
    "read_reference_estimator",
]
