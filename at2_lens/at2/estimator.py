"""The AT2 linear estimator (one weight per attention head) and its safe, self-describing file format.

File format: a single safetensors file (suffix ``.safetensors`` recommended) holding exactly one tensor,
``weights`` float32 [L, H], and one metadata entry ``"at2_lens_estimator"`` whose value is canonical JSON::

    {"format": "at2_lens.linear_estimator", "format_version": 1,
     "feature_layout": {"name": "per_head_mean_target_sum_source", "n_layers": L, "n_heads": H},
     "ablation_mode": "mask" | "remove", "output_type": "logit_prob" | "log_prob",
     "granularity": "token" | ..., "model_fingerprint": {...}, "training": {...} | null,
     "calibration": {"scale": a, "offset": b, "units": "..."} (optional),
     "prompt_format": {"name": "chat" | "plain" | "mixed", "template_sha256": "<hex>" | null} (optional),
     "weights_sha256": "<hex>"}

The feature layout names the one-pass feature family the weights apply to (``FeatureOptions.layout_name``; AT2's
own is ``per_head_mean_target_sum_source``); loading refuses an unknown one, and attribution reads that family.
The optional calibration maps scores to output units, ``a · score + b`` (fitted on the training store, see
``at2_lens.at2.training.calibrate``); files without it give unitless scores.

``prompt_format`` says how the training prompts were rendered: the tokenizer's chat template (with the sha256 of
the template text) or the plain layout. Features of the same text differ between the two, so ``AT2Attribution``
warns once when it attributes a task rendered the other way (:func:`prompt_format_mismatch`). Files without the
entry (written before it existed) have an unknown format and never warn.

``weights_sha256`` (the sha256 of the weights as little-endian float32 bytes) lets a flipped bit in the data section
be detected; files written before it existed have no such entry and are read without that check.

One file (no sidecar) so it is written with a single atomic ``os.replace``; one metadata key so the bytes are
reproducible. :func:`load_estimator_file` validates everything (never unpickles; pickle and torch.save files are
refused by their magic bytes) before returning.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from at2_lens._typing import typechecked
from at2_lens._validate import check_choice, check_int
from at2_lens.ablation import ABLATION_MODES, DEFAULT_LAYOUT, OUTPUT_TYPES, FeatureOptions
from at2_lens.errors import EstimatorFileError, InputError
from at2_lens.files import SafetensorsParseError, atomic_write_bytes, canonical_json, parse_safetensors, read_named_file
from at2_lens.files import safetensors_bytes as _safetensors_bytes

FEATURE_LAYOUT = DEFAULT_LAYOUT
ESTIMATOR_FORMAT = "at2_lens.linear_estimator"
ESTIMATOR_FORMAT_VERSION = 1
ESTIMATOR_META_KEY = "at2_lens_estimator"
FINGERPRINT_KEYS = ("architecture", "n_layers", "n_heads", "n_kv_heads", "d_model", "d_vocab", "vocab_sha256")


def vocab_sha256(tokenizer: Any) -> str | None:
    """sha256 of the tokenizer's vocabulary (sorted (token, id) pairs as JSON); None if there is no tokenizer."""
    if tokenizer is None:
        return None
    vocab = tokenizer.get_vocab()
    return hashlib.sha256(json.dumps(sorted(vocab.items())).encode("utf-8")).hexdigest()


def weights_sha256(weights: Tensor) -> str:
    """sha256 of a weights tensor as contiguous little-endian float32 bytes (the checksum stored in the file)."""
    array = weights.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4")
    return hashlib.sha256(array.tobytes()).hexdigest()


PROMPT_FORMATS = ("chat", "plain", "mixed")


def chat_template_sha256(tokenizer: Any) -> str | None:
    """sha256 of the tokenizer's chat template text (canonical JSON for a dict of templates); None without one."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return None
    text = template if isinstance(template, str) else canonical_json(template)
    return hashlib.sha256(str(text).encode("utf-8")).hexdigest()


def prompt_format_record(chat: bool, tokenizer: Any) -> dict[str, Any]:
    """The ``prompt_format`` entry for prompts rendered with the chat template (``chat``) or the plain layout."""
    return {"name": "chat", "template_sha256": chat_template_sha256(tokenizer)} if chat else \
        {"name": "plain", "template_sha256": None}


def check_prompt_format(value: Any) -> dict[str, Any] | None:
    """None, or ``{"name": "chat" | "plain" | "mixed", "template_sha256": <64 hex> | None}``."""
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("name") not in PROMPT_FORMATS:
        raise InputError(f"prompt_format: expected {{'name': one of {PROMPT_FORMATS}, 'template_sha256': ...}}, "
                         f"got {value!r}")
    digest = value.get("template_sha256")
    if digest is not None and not (isinstance(digest, str) and len(digest) == 64
                                   and all(c in "0123456789abcdef" for c in digest)):
        raise InputError(f"prompt_format: 'template_sha256' must be a sha256 hex digest or None, got {digest!r}")
    return {"name": value["name"], "template_sha256": digest}


def prompt_format_mismatch(trained: dict[str, Any] | None, used: dict[str, Any]) -> str | None:
    """Why prompts rendered as ``used`` differ from the estimator's training prompts (``trained``), or None.

    Unknown (None) training formats never differ; two chat formats differ when both template hashes are known and
    unequal.
    """
    if trained is None:
        return None
    if trained["name"] != used["name"]:
        return (f"the estimator was trained on {trained['name']!r} prompts but this task's prompt is "
                f"{used['name']!r} (prompt_format); scores may rank sources wrongly")
    a, b = trained.get("template_sha256"), used.get("template_sha256")
    if trained["name"] == "chat" and a is not None and b is not None and a != b:
        return (f"the estimator was trained on prompts of chat template sha256 {a[:12]}…, this tokenizer's chat "
                f"template is {b[:12]}…; scores may rank sources wrongly")
    return None


def model_fingerprint(backend: Any) -> dict[str, Any]:
    """Identify a model for estimator compatibility checks.

    ``backend`` is any object with ``architecture``, ``n_layers``, ``n_heads``, ``n_kv_heads``, ``d_model``,
    ``d_vocab`` and ``tokenizer`` (a Hugging Face tokenizer, or None) attributes.
    """
    missing = [a for a in (*FINGERPRINT_KEYS[:-1], "tokenizer") if not hasattr(backend, a)]
    if missing:
        raise InputError(f"backend lacks attribute(s) {missing} needed for a model fingerprint")
    fp: dict[str, Any] = {"architecture": str(backend.architecture)}
    for key in ("n_layers", "n_heads", "n_kv_heads", "d_model", "d_vocab"):
        fp[key] = int(getattr(backend, key))
    fp["vocab_sha256"] = vocab_sha256(backend.tokenizer)
    return fp


def _show(value: Any) -> str:
    """Short display of a fingerprint value (long hashes abbreviated)."""
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12] + "…"
    return str(value)


def compare_fingerprints(
    a: dict[str, Any],
    b: dict[str, Any],
    *,
    a_label: str = "estimator was trained for",
    b_label: str = "this model has",
) -> list[str]:
    """Human-readable differences between fingerprints ``a`` and ``b`` (empty list if they match).

    Each entry reads like ``"estimator was trained for n_layers=30, this model has n_layers=2"``. A field that is
    missing or None on either side is unknown, not different (so a model without a tokenizer, or a fingerprint
    field added in a later version, does not block loading).
    """
    diffs = []
    order = {k: i for i, k in enumerate(FINGERPRINT_KEYS)}
    for key in sorted(set(a) & set(b), key=lambda k: (order.get(k, len(order)), str(k))):
        if a[key] is None or b[key] is None:
            continue
        if canonical_json(a[key]) != canonical_json(b[key]):
            diffs.append(f"{a_label} {key}={_show(a[key])}, {b_label} {key}={_show(b[key])}")
    return diffs


def fingerprint_problem(fingerprint: dict[str, Any]) -> str | None:
    """Why a non-empty fingerprint cannot identify a model (None if it can, or if it is empty: unchecked).

    Unknown keys are tolerated next to known ones (a later version may add fields), but a fingerprint holding no
    known key with a value would let every model pass silently, so it is refused.
    """
    if fingerprint and not any(fingerprint.get(k) is not None for k in FINGERPRINT_KEYS):
        return (
            f"holds none of the known keys {list(FINGERPRINT_KEYS)} (got {sorted(map(str, fingerprint))}), so it "
            "identifies no model; build it with model_fingerprint(backend), or pass {} for an unchecked estimator"
        )
    return None


def check_calibration(calibration: Any) -> dict[str, Any] | None:
    """None, or ``{"scale": a > 0, "offset": b, "units": str, ...}`` with finite numbers (other keys: provenance)."""
    if calibration is None:
        return None
    if not isinstance(calibration, dict):
        raise InputError(f"calibration: expected a dict or None, got {type(calibration).__name__}")
    for key in ("scale", "offset"):
        value = calibration.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise InputError(f"calibration: {key!r} must be a finite number, got {value!r}")
    if calibration["scale"] <= 0:
        raise InputError(f"calibration: 'scale' must be > 0 (scores keep their order), got {calibration['scale']!r}")
    if not isinstance(calibration.get("units"), str) or not calibration["units"]:
        raise InputError("calibration: 'units' must name what a calibrated score means")
    return dict(calibration)


@dataclass(eq=False)
class LinearEstimator:
    """AT2's learned head weighting: ``score(s) = Σ_{l,h} w[l, h] · φ[s][l, h]``.

    ``weights`` is float32 [L, H]. The rest is provenance checked when the estimator is loaded or used: the feature
    layout, how the training ablations were done (``ablation_mode``), what output they measured (``output_type``),
    the source granularity trained on, the model fingerprint, a training summary (a JSON-able dict or None) and
    the prompt format of the training prompts (``prompt_format``, None when unknown).
    """

    weights: Float[Tensor, "l h"]
    ablation_mode: str = "mask"
    output_type: str = "logit_prob"
    granularity: str = "token"
    model_fingerprint: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] | None = None
    feature_layout: str = FEATURE_LAYOUT
    calibration: dict[str, Any] | None = None
    prompt_format: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        w = torch.as_tensor(self.weights)
        if w.ndim != 2 or min(w.shape) < 1 or not w.is_floating_point():
            raise InputError(f"weights must be a float tensor [n_layers, n_heads], got {w.dtype} {tuple(w.shape)}")
        w = w.detach().to("cpu", torch.float32).contiguous()
        if not torch.isfinite(w).all():
            raise InputError("weights contain NaN or inf")
        check_choice("ablation_mode", self.ablation_mode, ABLATION_MODES)
        check_choice("output_type", self.output_type, OUTPUT_TYPES)
        if not isinstance(self.granularity, str) or not self.granularity:
            raise InputError(f"granularity must be a non-empty string, got {self.granularity!r}")
        FeatureOptions.from_layout_name(self.feature_layout)  # an unknown layout is an InputError
        self.calibration = check_calibration(self.calibration)
        self.prompt_format = check_prompt_format(self.prompt_format)
        if not isinstance(self.model_fingerprint, dict):
            raise InputError("model_fingerprint must be a dict")
        problem = fingerprint_problem(self.model_fingerprint)
        if problem:
            raise InputError(f"model_fingerprint: {problem}")
        if self.training is not None and not isinstance(self.training, dict):
            raise InputError("training must be a dict or None")
        self.weights = w

    @classmethod
    def uniform(cls, n_layers: int, n_heads: int, **kwargs: Any) -> LinearEstimator:
        """The "average attention" estimator, w = 1/(L·H): AT2's initialisation and its natural baseline."""
        check_int("n_layers", n_layers)
        check_int("n_heads", n_heads)
        return cls(torch.full((n_layers, n_heads), 1.0 / (n_layers * n_heads)), **kwargs)

    @property
    def feature_options(self) -> FeatureOptions:
        """The feature family these weights apply to (read it with ``extract_features(..., options=...)``)."""
        return FeatureOptions.from_layout_name(self.feature_layout)

    def calibrated(self, scores: Tensor) -> Tensor:
        """``scale · scores + offset`` when the estimator is calibrated, else the scores unchanged."""
        if self.calibration is None:
            return scores
        return scores * float(self.calibration["scale"]) + float(self.calibration["offset"])

    @property
    def units(self) -> str:
        """What a (calibrated) score means."""
        if self.calibration is None:
            return "unitless (L1-normalised head weights x attention)"
        return str(self.calibration["units"])

    @property
    def n_layers(self) -> int:
        """Number of layers L."""
        return int(self.weights.shape[0])

    @property
    def n_heads(self) -> int:
        """Number of heads per layer H."""
        return int(self.weights.shape[1])

    @typechecked
    def score(self, features: Float[Tensor, "*batch s l h"]) -> Float[Tensor, "*batch s"]:
        """Score each source: Σ_{l,h} w[l,h] · features[..., s, l, h] (computed in the features' dtype/device)."""
        if tuple(features.shape[-2:]) != (self.n_layers, self.n_heads):
            raise InputError(
                f"features have {tuple(features.shape[-2:])} (layers, heads); this estimator was trained for "
                f"({self.n_layers}, {self.n_heads})"
            )
        w = self.weights.to(device=features.device, dtype=features.dtype)
        return torch.einsum("...lh,lh->...", features, w)

    def metadata(self) -> dict[str, Any]:
        """The JSON metadata stored alongside the weights."""
        return {
            "format": ESTIMATOR_FORMAT,
            "format_version": ESTIMATOR_FORMAT_VERSION,
            "feature_layout": {"name": self.feature_layout, "n_layers": self.n_layers, "n_heads": self.n_heads},
            "ablation_mode": self.ablation_mode,
            "output_type": self.output_type,
            "granularity": self.granularity,
            "model_fingerprint": self.model_fingerprint,
            "training": self.training,
            **({} if self.calibration is None else {"calibration": self.calibration}),
            **({} if self.prompt_format is None else {"prompt_format": self.prompt_format}),
            "weights_sha256": weights_sha256(self.weights),
        }

    def to_bytes(self) -> bytes:
        """The estimator file's bytes (deterministic)."""
        try:
            return _safetensors_bytes({"weights": self.weights}, ESTIMATOR_META_KEY, self.metadata())
        except (TypeError, ValueError) as exc:
            raise InputError(f"estimator metadata is not JSON-serialisable (no NaN allowed): {exc}") from None

    def save(self, path: Path | str) -> Path:
        """Write the estimator to ``path`` atomically (see the module docstring for the format); returns the path."""
        return atomic_write_bytes(Path(path), self.to_bytes())

    @classmethod
    def load(cls, path: Path | str, expected_fingerprint: dict[str, Any] | None = None) -> LinearEstimator:
        """Same as :func:`load_estimator_file`."""
        return load_estimator_file(path, expected_fingerprint)

    def check_fingerprint(self, fingerprint: dict[str, Any], *, what: str = "estimator") -> None:
        """Raise EstimatorFileError if this estimator was trained for a model with a different fingerprint."""
        diffs = compare_fingerprints(self.model_fingerprint, fingerprint)
        if diffs:
            raise EstimatorFileError(f"{what} does not match this model: " + "; ".join(diffs))

    def __repr__(self) -> str:
        arch = self.model_fingerprint.get("architecture", "?")
        return (
            f"LinearEstimator(n_layers={self.n_layers}, n_heads={self.n_heads}, architecture={arch!r}, "
            f"ablation_mode={self.ablation_mode!r}, output_type={self.output_type!r}, "
            f"granularity={self.granularity!r})"
        )


def _bad(path: Path, why: str) -> EstimatorFileError:
    """The standard error for a file that cannot be an estimator."""
    return EstimatorFileError(f"{path}: corrupted or not an at2_lens estimator ({why})")


def load_estimator_file(path: Path | str, expected_fingerprint: dict[str, Any] | None = None) -> LinearEstimator:
    """Load and fully validate an estimator file; every problem is an EstimatorFileError naming the path.

    Checks, in order: the file exists; it is not a pickle / torch.save file (refused, never unpickled); it is a
    complete safetensors file with at2_lens estimator metadata of a supported version; the single ``weights``
    tensor is float32, finite and of the [n_layers, n_heads] shape the metadata states; the ablation mode and output
    type are known; and, if ``expected_fingerprint`` is given, the model fingerprint matches (the message lists the
    differing fields).
    """
    path = Path(path)
    data = read_named_file(path, "estimator", EstimatorFileError)
    try:
        tensors, meta = parse_safetensors(data, ESTIMATOR_META_KEY)
    except SafetensorsParseError as exc:
        if exc.is_pickle:
            raise EstimatorFileError(f"{path}: refusing to load a pickle-based file: {exc}") from None
        raise _bad(path, str(exc)) from None
    if meta.get("format") != ESTIMATOR_FORMAT:
        raise _bad(path, f"metadata format is {meta.get('format')!r}, expected {ESTIMATOR_FORMAT!r}")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _bad(path, f"invalid format_version {version!r}")
    if version > ESTIMATOR_FORMAT_VERSION:
        raise EstimatorFileError(
            f"{path}: estimator format_version {version} was written by a newer at2_lens; "
            f"this version reads <= {ESTIMATOR_FORMAT_VERSION}"
        )
    layout = meta.get("feature_layout")
    try:
        FeatureOptions.from_layout_name(layout.get("name") if isinstance(layout, dict) else None)  # type: ignore[arg-type]
    except InputError:
        raise _bad(path, f"unknown feature layout {layout!r}") from None
    assert isinstance(layout, dict)
    n_layers, n_heads = layout.get("n_layers"), layout.get("n_heads")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (n_layers, n_heads)):
        raise _bad(path, f"invalid n_layers/n_heads in metadata: {n_layers!r}, {n_heads!r}")
    if set(tensors) != {"weights"}:
        raise _bad(path, f"expected exactly one tensor 'weights', found {sorted(tensors)}")
    weights = tensors["weights"]
    if weights.dtype != torch.float32:
        raise _bad(path, f"weights have dtype {weights.dtype}, expected float32")
    if tuple(weights.shape) != (n_layers, n_heads):
        raise EstimatorFileError(
            f"{path}: metadata says the estimator has n_layers={n_layers}, n_heads={n_heads} but the weights "
            f"tensor has shape {tuple(weights.shape)}; the file is inconsistent"
        )
    if not torch.isfinite(weights).all():
        raise _bad(path, "weights contain NaN or inf")
    for key, allowed in (("ablation_mode", ABLATION_MODES), ("output_type", OUTPUT_TYPES)):
        if meta.get(key) not in allowed:
            raise _bad(path, f"{key} is {meta.get(key)!r}, expected one of {allowed}")
    granularity = meta.get("granularity")
    if not isinstance(granularity, str) or not granularity:
        raise _bad(path, f"invalid granularity {granularity!r}")
    fingerprint = meta.get("model_fingerprint")
    if not isinstance(fingerprint, dict):
        raise _bad(path, "model_fingerprint is missing or not an object")
    problem = fingerprint_problem(fingerprint)
    if problem:
        raise _bad(path, f"model_fingerprint {problem}")
    training = meta.get("training")
    if training is not None and not isinstance(training, dict):
        raise _bad(path, "training summary is not an object")
    for key in ("n_layers", "n_heads"):
        if key in fingerprint and fingerprint[key] != layout[key]:
            raise EstimatorFileError(
                f"{path}: model_fingerprint says {key}={fingerprint[key]!r} but the feature layout says "
                f"{key}={layout[key]!r}; the file is inconsistent"
            )
    try:
        calibration = check_calibration(meta.get("calibration"))
    except InputError as exc:
        raise _bad(path, str(exc)) from None
    try:
        prompt_format = check_prompt_format(meta.get("prompt_format"))
    except InputError as exc:
        raise _bad(path, str(exc)) from None
    checksum = meta.get("weights_sha256")
    if checksum is not None and checksum != weights_sha256(weights):
        raise _bad(path, "the weights do not match the weights_sha256 checksum in the metadata (the data is damaged)")
    estimator = LinearEstimator(
        weights=weights,
        ablation_mode=meta["ablation_mode"],
        output_type=meta["output_type"],
        granularity=granularity,
        model_fingerprint=fingerprint,
        training=training,
        feature_layout=layout["name"],
        calibration=calibration,
        prompt_format=prompt_format,
    )
    if expected_fingerprint is not None:
        diffs = compare_fingerprints(fingerprint, expected_fingerprint)
        if diffs:
            raise EstimatorFileError(f"estimator {path} was trained for a different model: " + "; ".join(diffs))
    return estimator
