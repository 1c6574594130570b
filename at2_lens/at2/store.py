"""On-disk store of AT2 training examples (attention features + ablation results), one file per example.

Collecting AT2 training data costs one forward pass per ablation mask (≈ 33 per example), so the store is built to be
filled by long-running, possibly parallel, possibly interrupted processes:

Layout of a store directory::

    root/store.json                       manifest: the collection settings (canonical, sorted JSON)
    root/examples/00000042.safetensors    one example: tensors + its metadata (see below)

Each example file is a safetensors file holding ``features`` float32 [S, L, H], ``masks`` bool [M, S], ``outputs``
float32 [M] and ``full_output`` float32 [] (0-d), and one metadata entry ``"at2_lens_example"`` whose value is the
canonical JSON ``{"format": "at2_lens.ablation_example", "format_version": 1, "index": i, "meta": {...}}``. A single
metadata key keeps the bytes reproducible (safetensors writes several keys in a random order), so writing the same
example twice gives byte-identical files. Nothing is pickled.

Writes are atomic (temp file in the same directory, fsync, ``os.replace``); readers never see a partial file, and
temp files left by killed writers are removed by :meth:`AblationStore.cleanup_temp_files`. A file under an example's
name that is not a complete, valid example (truncated, padded, garbage, another example's or another store's data,
e.g. after a disk fault or a bad copy) is never read as valid: :meth:`AblationStore.read` raises StoreError naming the
file and the problem, :meth:`AblationStore.invalid` lists such files, and ``collect`` recomputes them (with a
warning) when it resumes. Example ``i`` belongs to
shard ``i % shard_count`` (:func:`shard_indices`); several processes may write to one store concurrently. The manifest
is created race-free (hard-link into place); a process that finds a manifest with different settings gets a
StoreError naming the differing keys.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from at2_lens._validate import check_choice, check_fraction, check_int
from at2_lens.ablation import ABLATION_MODES, OUTPUT_TYPES, FeatureOptions, random_masks
from at2_lens.at2.estimator import FEATURE_LAYOUT
from at2_lens.errors import InputError, StoreError
from at2_lens.files import (
    SafetensorsParseError,
    atomic_create_bytes,
    atomic_write_bytes,
    canonical_json,
    cleanup_temp_files,
    parse_safetensors,
    read_bytes,
    safetensors_bytes,
)

STORE_FORMAT = "at2_lens.ablation_store"
STORE_FORMAT_VERSION = 1
EXAMPLE_FORMAT = "at2_lens.ablation_example"
EXAMPLE_FORMAT_VERSION = 1
EXAMPLE_META_KEY = "at2_lens_example"
MANIFEST_NAME = "store.json"
EXAMPLES_DIR = "examples"
_EXAMPLE_RE = re.compile(r"^(\d{8,})\.safetensors$")
_TENSOR_NAMES = frozenset({"features", "masks", "outputs", "full_output"})


@dataclass(eq=False)
class AblationExample:
    """One AT2 training example: features of S sources and the target's output under M random ablation masks.

    ``features[s, l, h]`` is the attention from the target's query rows to source s's keys in layer l, head h (mean
    over target rows, sum over the source's keys); ``masks[m, s]`` is True where source s is kept in ablation m;
    ``outputs[m]`` is the target's output (e.g. logit-probability) under ablation m; ``full_output`` is the output
    with nothing ablated. Inputs are validated and normalised (CPU, float32/bool, contiguous) on construction.
    """

    index: int
    features: Float[Tensor, "s l h"]
    masks: Bool[Tensor, "m s"]
    outputs: Float[Tensor, " m"]
    full_output: float
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.index = check_int("index", self.index, minimum=0)
        feats = torch.as_tensor(self.features)
        if feats.ndim != 3 or not feats.is_floating_point():
            raise InputError(f"features must be a float tensor [S, L, H], got {feats.dtype} {tuple(feats.shape)}")
        if min(feats.shape) < 1:
            raise InputError(f"features must have S, L, H >= 1, got shape {tuple(feats.shape)}")
        feats = feats.detach().to("cpu", torch.float32).contiguous()
        if not torch.isfinite(feats).all():
            raise InputError(f"features of example {self.index} contain NaN or inf")
        masks = torch.as_tensor(self.masks).detach().cpu()
        if masks.ndim != 2 or masks.shape[1] != feats.shape[0]:
            raise InputError(f"masks must be [M, S] with S={feats.shape[0]} (from features), got {tuple(masks.shape)}")
        if masks.shape[0] < 1:
            raise InputError("masks must hold at least one ablation mask")
        if masks.dtype != torch.bool:
            if masks.is_floating_point() or masks.is_complex() or not bool(((masks == 0) | (masks == 1)).all()):
                raise InputError(f"masks must be bool (or integer 0/1), got {masks.dtype}")
            masks = masks.bool()
        outputs = torch.as_tensor(self.outputs).detach().cpu()
        if outputs.shape != (masks.shape[0],):
            raise InputError(f"outputs must be [M] with M={masks.shape[0]} (from masks), got {tuple(outputs.shape)}")
        outputs = outputs.to(torch.float32).contiguous()
        if not torch.isfinite(outputs).all():
            raise InputError(f"outputs of example {self.index} contain NaN or inf")
        full = self.full_output
        if isinstance(full, Tensor):
            if full.numel() != 1:
                raise InputError(f"full_output must be a scalar, got shape {tuple(full.shape)}")
            full = full.item()
        if isinstance(full, bool) or not isinstance(full, int | float | np.floating | np.integer):
            raise InputError(f"full_output must be a number, got {type(full).__name__}")
        full32 = float(np.float32(full))  # stored as float32; normalise so a round trip is exact
        if not math.isfinite(full32):
            raise InputError(f"full_output of example {self.index} is not finite: {full!r}")
        if not isinstance(self.meta, dict):
            raise InputError(f"meta must be a dict, got {type(self.meta).__name__}")
        try:
            canonical_json(self.meta)
        except (TypeError, ValueError) as exc:
            raise InputError(f"meta of example {self.index} is not JSON-serialisable (no NaN allowed): {exc}") from None
        self.features, self.masks, self.outputs, self.full_output = feats, masks.contiguous(), outputs, full32

    @property
    def n_sources(self) -> int:
        """Number of sources S."""
        return int(self.features.shape[0])

    @property
    def n_masks(self) -> int:
        """Number of ablation masks M."""
        return int(self.masks.shape[0])

    @property
    def n_layers(self) -> int:
        """Number of layers L in the features."""
        return int(self.features.shape[1])

    @property
    def n_heads(self) -> int:
        """Number of heads H in the features."""
        return int(self.features.shape[2])

    def equals(self, other: AblationExample) -> bool:
        """Exact equality of every field (dataclass ``==`` is disabled because tensors have no truth value)."""
        return (
            self.index == other.index
            and torch.equal(self.features, other.features)
            and torch.equal(self.masks, other.masks)
            and torch.equal(self.outputs, other.outputs)
            and self.full_output == other.full_output
            and canonical_json(self.meta) == canonical_json(other.meta)
        )


def example_to_bytes(example: AblationExample) -> bytes:
    """Serialise an example to deterministic safetensors bytes."""
    tensors = {
        "features": example.features,
        "masks": example.masks,
        "outputs": example.outputs,
        "full_output": torch.tensor(example.full_output, dtype=torch.float32),
    }
    meta = {
        "format": EXAMPLE_FORMAT,
        "format_version": EXAMPLE_FORMAT_VERSION,
        "index": example.index,
        "meta": example.meta,
    }
    return safetensors_bytes(tensors, EXAMPLE_META_KEY, meta)


def write_example(path: Path | str, example: AblationExample) -> Path:
    """Write one example to ``path`` atomically; returns the path."""
    if not isinstance(example, AblationExample):
        raise InputError(f"example must be an AblationExample, got {type(example).__name__}")
    return atomic_write_bytes(Path(path), example_to_bytes(example))


def read_example(path: Path | str) -> AblationExample:
    """Read and validate one example file; any problem is a StoreError naming the file."""
    path = Path(path)
    try:
        data = read_bytes(path)
    except FileNotFoundError:
        raise StoreError(f"example file not found: {path}") from None
    except OSError as exc:
        raise StoreError(f"cannot read example file {path}: {exc}") from None
    try:
        tensors, meta = parse_safetensors(data, EXAMPLE_META_KEY)
    except SafetensorsParseError as exc:
        raise StoreError(f"corrupted example file {path}: {exc}") from None
    if meta.get("format") != EXAMPLE_FORMAT:
        raise StoreError(f"corrupted example file {path}: not an at2_lens ablation example")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > EXAMPLE_FORMAT_VERSION:
        raise StoreError(
            f"example file {path} has format_version {version!r}; this at2_lens reads <= {EXAMPLE_FORMAT_VERSION}"
        )
    if set(tensors) != _TENSOR_NAMES:
        raise StoreError(f"corrupted example file {path}: tensors {sorted(tensors)}, expected {sorted(_TENSOR_NAMES)}")
    expected_dtypes = {
        "features": torch.float32,
        "masks": torch.bool,
        "outputs": torch.float32,
        "full_output": torch.float32,
    }
    for name, dtype in expected_dtypes.items():
        if tensors[name].dtype != dtype:
            raise StoreError(f"corrupted example file {path}: {name} has dtype {tensors[name].dtype}, expected {dtype}")
    if tensors["full_output"].ndim != 0:
        raise StoreError(f"corrupted example file {path}: full_output must be a 0-d tensor")
    try:
        return AblationExample(
            index=meta.get("index"),  # type: ignore[arg-type]
            features=tensors["features"],
            masks=tensors["masks"],
            outputs=tensors["outputs"],
            full_output=float(tensors["full_output"].item()),
            meta=meta.get("meta", {}),
        )
    except InputError as exc:
        raise StoreError(f"corrupted example file {path}: {exc}") from None


def shard_indices(n_total: int, shard_index: int, shard_count: int) -> list[int]:
    """The example indices in ``range(n_total)`` that belong to shard ``shard_index`` (``i % shard_count``)."""
    n_total = check_int("n_total", n_total, minimum=0)
    shard_count = check_int("shard_count", shard_count, minimum=1)
    shard_index = check_int("shard_index", shard_index, minimum=0, maximum=shard_count - 1)
    return list(range(shard_index, n_total, shard_count))


@dataclass(frozen=True)
class StoreSettings:
    """The collection settings recorded in ``store.json``; every writer of a store must use the same ones."""

    model_fingerprint: dict[str, Any]
    n_layers: int
    n_heads: int
    ablation_mode: str = "mask"
    output_type: str = "logit_prob"
    granularity: str = "token"
    n_masks: int = 32
    keep_prob: float = 0.5
    seed: int = 0
    feature_layout: str = FEATURE_LAYOUT
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.model_fingerprint, dict):
            raise InputError("model_fingerprint must be a dict (see at2_lens.at2.estimator.model_fingerprint)")
        check_int("n_layers", self.n_layers, minimum=1)
        check_int("n_heads", self.n_heads, minimum=1)
        check_int("n_masks", self.n_masks, minimum=1)
        check_int("seed", self.seed, minimum=0)
        check_choice("ablation_mode", self.ablation_mode, ABLATION_MODES)
        check_choice("output_type", self.output_type, OUTPUT_TYPES)
        if not isinstance(self.granularity, str) or not self.granularity:
            raise InputError(f"granularity must be a non-empty string, got {self.granularity!r}")
        check_fraction("keep_prob", self.keep_prob)
        FeatureOptions.from_layout_name(self.feature_layout)  # an unknown layout is an InputError
        try:
            canonical_json(self.to_dict())
        except (TypeError, ValueError) as exc:
            raise InputError(f"store settings are not JSON-serialisable: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        """The manifest content (JSON-able)."""
        return {
            "format": STORE_FORMAT,
            "format_version": STORE_FORMAT_VERSION,
            "model_fingerprint": self.model_fingerprint,
            "feature_layout": {"name": self.feature_layout, "n_layers": self.n_layers, "n_heads": self.n_heads},
            "ablation_mode": self.ablation_mode,
            "output_type": self.output_type,
            "granularity": self.granularity,
            "n_masks": self.n_masks,
            "keep_prob": float(self.keep_prob),
            "seed": self.seed,
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StoreSettings:
        """Rebuild settings from a manifest dict (raises InputError/KeyError/TypeError on malformed input)."""
        layout = d["feature_layout"]
        return cls(
            model_fingerprint=d["model_fingerprint"],
            n_layers=layout["n_layers"],
            n_heads=layout["n_heads"],
            ablation_mode=d["ablation_mode"],
            output_type=d["output_type"],
            granularity=d["granularity"],
            n_masks=d["n_masks"],
            keep_prob=d["keep_prob"],
            seed=d["seed"],
            feature_layout=layout["name"],
            extra=d.get("extra", {}),
        )


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts to dotted keys, so differences can be named precisely."""
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(_flatten(value, name))
        else:
            out[name] = value
    return out


def _diff_settings(existing: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Human-readable differences between two manifest dicts, by dotted key."""
    a, b = _flatten(existing), _flatten(wanted)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key not in a:
            diffs.append(f"{key}: missing in store, requested {b[key]!r}")
        elif key not in b:
            diffs.append(f"{key}: store has {a[key]!r}, not requested")
        elif canonical_json(a[key]) != canonical_json(b[key]):
            diffs.append(f"{key}: store has {a[key]!r}, requested {b[key]!r}")
    return diffs


class AblationStore:
    """A directory of AT2 training examples keyed by example index; see the module docstring for the layout.

    ``AblationStore(root, settings)`` creates the store (or joins an existing one whose manifest has exactly these
    settings, else StoreError naming the differing keys) and removes temp files left by dead writers.
    ``AblationStore(root)`` opens an existing store for reading.
    """

    def __init__(self, root: Path | str, settings: StoreSettings | None = None) -> None:
        self.root = Path(root)
        self.manifest_path = self.root / MANIFEST_NAME
        self.examples_dir = self.root / EXAMPLES_DIR
        if settings is None:
            self.settings = self._read_manifest()
            return
        if not isinstance(settings, StoreSettings):
            raise InputError(f"settings must be a StoreSettings, got {type(settings).__name__}")
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"store root {self.root} exists and is not a directory")
        self.examples_dir.mkdir(parents=True, exist_ok=True)
        wanted = settings.to_dict()
        text = json.dumps(wanted, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n"
        if not atomic_create_bytes(self.manifest_path, text.encode("utf-8")):
            existing = self._read_manifest_dict()
            diffs = _diff_settings(existing, wanted)
            if diffs:
                keys = ", ".join(d.split(":", 1)[0] for d in diffs)
                raise StoreError(f"store {self.root} was written with different settings ({keys}): " + "; ".join(diffs))
        self.settings = settings
        self.cleanup_temp_files()

    # --- manifest -----------------------------------------------------------------------------------------------

    def _read_manifest_dict(self) -> dict[str, Any]:
        """Read store.json, retrying briefly in case a concurrent creator on a link-less file system is mid-write."""
        last_error = ""
        for attempt in range(5):
            try:
                text = self.manifest_path.read_text(encoding="utf-8")
            except FileNotFoundError:
                raise StoreError(
                    f"{self.root} is not an at2_lens ablation store (no {MANIFEST_NAME}); "
                    "pass StoreSettings to create one"
                ) from None
            try:
                d = json.loads(text)
            except json.JSONDecodeError as exc:
                last_error = str(exc)
                time.sleep(0.05 * (attempt + 1))
                continue
            if not isinstance(d, dict) or d.get("format") != STORE_FORMAT:
                raise StoreError(f"{self.manifest_path} is not an at2_lens ablation store manifest")
            version = d.get("format_version")
            if not isinstance(version, int) or version > STORE_FORMAT_VERSION:
                raise StoreError(
                    f"{self.manifest_path} has format_version {version!r}; this at2_lens reads <= "
                    f"{STORE_FORMAT_VERSION}"
                )
            return d
        raise StoreError(f"corrupted store manifest {self.manifest_path}: {last_error}")

    def _read_manifest(self) -> StoreSettings:
        """Read and validate store.json into StoreSettings."""
        d = self._read_manifest_dict()
        try:
            return StoreSettings.from_dict(d)
        except (InputError, KeyError, TypeError) as exc:
            raise StoreError(f"corrupted store manifest {self.manifest_path}: {exc}") from None

    # --- paths and listing --------------------------------------------------------------------------------------

    def path_for(self, index: int) -> Path:
        """The file that holds (or will hold) example ``index``."""
        return self.examples_dir / f"{check_int('index', index, minimum=0):08d}.safetensors"

    def has(self, index: int) -> bool:
        """Whether example ``index`` has been written completely."""
        return self.path_for(index).is_file()

    def __contains__(self, index: object) -> bool:
        return isinstance(index, int) and not isinstance(index, bool) and index >= 0 and self.has(index)

    def indices(self) -> list[int]:
        """Sorted indices of all complete examples (temp files of in-progress writes are ignored)."""
        if not self.examples_dir.is_dir():
            return []
        found = []
        for entry in self.examples_dir.iterdir():
            match = _EXAMPLE_RE.match(entry.name)
            if match is not None:
                found.append(int(match.group(1)))
        return sorted(found)

    def __len__(self) -> int:
        return len(self.indices())

    def missing(self, indices: Iterable[int]) -> list[int]:
        """The given indices that are not in the store yet, in the given order (what a resumed run must do)."""
        done = set(self.indices())
        return [i for i in indices if check_int("index", i, minimum=0) not in done]

    def invalid(self, indices: Iterable[int] | None = None) -> dict[int, str]:
        """Examples whose file exists but is not a complete, valid example of this store: ``{index: reason}``.

        Every file is parsed and checked in full (header, data length, dtypes, shapes, its index, the store's
        L, H, M), so a truncated, padded, garbage or foreign file is reported rather than read as valid.
        ``indices``: the indices to check (default every file in the store); absent ones are skipped.
        """
        done = set(self.indices())
        wanted = sorted(done) if indices is None else [i for i in indices if check_int("index", i, minimum=0) in done]
        bad: dict[int, str] = {}
        for i in wanted:
            try:
                self.read(i)
            except StoreError as exc:
                bad[i] = str(exc)
        return bad

    def cleanup_temp_files(self) -> list[Path]:
        """Remove temp files left by killed writers (live writers' temp files are kept); returns those removed."""
        return cleanup_temp_files(self.examples_dir) + cleanup_temp_files(self.root)

    # --- reading and writing ------------------------------------------------------------------------------------

    def masks_for(self, index: int, n_sources: int) -> Tensor:
        """The deterministic ablation masks [n_masks, n_sources] for example ``index`` under this store's settings."""
        s = self.settings
        return random_masks(n_sources, s.n_masks, float(s.keep_prob), seed=s.seed, index=index)

    def write(self, example: AblationExample) -> Path:
        """Check ``example`` against the store settings and write it atomically; returns its path."""
        if not isinstance(example, AblationExample):
            raise InputError(f"example must be an AblationExample, got {type(example).__name__}")
        s = self.settings
        if (example.n_layers, example.n_heads) != (s.n_layers, s.n_heads):
            raise InputError(
                f"example {example.index} has features for {example.n_layers} layers x {example.n_heads} heads, "
                f"the store expects {s.n_layers} x {s.n_heads}"
            )
        if example.n_masks != s.n_masks:
            raise InputError(f"example {example.index} has {example.n_masks} masks, the store expects {s.n_masks}")
        return write_example(self.path_for(example.index), example)

    def read(self, index: int) -> AblationExample:
        """Read example ``index``; StoreError if it is missing, corrupted or inconsistent with the store."""
        path = self.path_for(index)
        if not path.is_file():
            raise StoreError(f"example {index} is not in store {self.root} (no {path.name})")
        example = read_example(path)
        s = self.settings
        if example.index != index:
            raise StoreError(f"corrupted example file {path}: it holds example {example.index}, not {index}")
        if (example.n_layers, example.n_heads, example.n_masks) != (s.n_layers, s.n_heads, s.n_masks):
            raise StoreError(
                f"example file {path} has L={example.n_layers}, H={example.n_heads}, M={example.n_masks}; "
                f"the store expects L={s.n_layers}, H={s.n_heads}, M={s.n_masks}"
            )
        return example

    def iter_examples(self, indices: Sequence[int] | None = None) -> Iterator[AblationExample]:
        """Yield examples one at a time (all complete ones in index order if ``indices`` is None)."""
        for i in self.indices() if indices is None else indices:
            yield self.read(i)

    def load(self, indices: Sequence[int] | None = None) -> list[AblationExample]:
        """Load examples into memory: all complete ones if ``indices`` is None, else exactly those (all must exist)."""
        if indices is not None:
            absent = self.missing(indices)
            if absent:
                shown = ", ".join(map(str, absent[:10])) + (" ..." if len(absent) > 10 else "")
                raise StoreError(f"{len(absent)} requested examples are not in store {self.root}: {shown}")
        return list(self.iter_examples(indices))

    def __repr__(self) -> str:
        return f"AblationStore({str(self.root)!r}, n_examples={len(self)})"
