"""Result files: one safetensors file per result, tensors in the data section, everything else as canonical JSON.

Shared by ``SourceAttribution.save``/``load`` and ``AttAttrResult.save``/``load``. The metadata (one entry,
``"at2_lens_result"``) names the kind of result (``format``) and its ``format_version``; loading checks both before
building anything, refuses pickle-based files by their magic bytes and never executes code. Files are written with
:func:`at2_lens.files.atomic_write_bytes`, after the whole file was serialised in memory, so an error leaves no
partial file behind.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor

from at2_lens.errors import InputError, ResultFileError
from at2_lens.files import (
    SafetensorsParseError,
    atomic_write_bytes,
    canonical_json,
    parse_safetensors,
    read_bytes,
    safetensors_bytes,
)

RESULT_META_KEY = "at2_lens_result"

# format name -> what loads it, for messages about a file of another kind
RESULT_KINDS: dict[str, str] = {
    "at2_lens.source_attribution": "SourceAttribution.load",
    "at2_lens.attattr_result": "AttAttrResult.load",
}
_OTHER_FILES: dict[str, str] = {  # metadata keys of other at2_lens files
    "at2_lens_estimator": "an AT2 estimator file (load it with at2_lens.load_estimator)",
    "at2_lens_example": "an ablation-store example (read it with at2_lens.at2.store)",
    "at2_lens.classifier_head": "a classifier head file (load it with at2_lens.models.classifier)",
}


def json_extra(extra: dict[str, Any], name: str = "extra") -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Split ``extra`` into JSON values and tensors; anything else is an InputError naming ``extra[key]``."""
    values: dict[str, Any] = {}
    tensors: dict[str, Tensor] = {}
    for key, value in extra.items():
        if not isinstance(key, str):
            raise InputError(f"{name}: keys must be strings to be saved, got {key!r}")
        if isinstance(value, Tensor):
            tensors[key] = value
            continue
        try:
            canonical_json(value)
        except (TypeError, ValueError) as exc:
            raise InputError(f"{name}[{key!r}]: cannot be saved as JSON ({exc}); give a number, string, list, dict "
                             "or tensor") from None
        values[key] = value
    return values, tensors


def write_result(path: Path | str, kind: str, version: int, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Path:
    """Serialise ``tensors`` and ``meta`` (plus ``format``/``format_version``) and write them atomically."""
    data = safetensors_bytes(tensors, RESULT_META_KEY, {"format": kind, "format_version": version, **meta})
    return atomic_write_bytes(path, data)


def _other_kind(data: bytes) -> str | None:
    """What an at2_lens file without a result entry is, from its safetensors metadata keys, else None."""
    try:
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len].decode("utf-8"))
        keys = set((header.get("__metadata__") or {}).keys())
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None
    return next((what for key, what in _OTHER_FILES.items() if key in keys), None)


def read_result(path: Path | str, kind: str, version: int) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Tensors and metadata of a result file of ``kind``; ResultFileError for anything else or any other version."""
    path = Path(path)
    if not path.is_file():
        raise ResultFileError(f"{path}: no such result file" if not path.exists() else f"{path}: not a file")
    try:
        data = read_bytes(path)
    except OSError as exc:
        raise ResultFileError(f"{path}: cannot read the result file ({exc})") from None
    try:
        tensors, meta = parse_safetensors(data, RESULT_META_KEY)
    except SafetensorsParseError as exc:
        if exc.is_pickle:
            raise ResultFileError(f"{path}: refusing to load a pickle-based file: {exc}") from None
        other = _other_kind(data)
        if other is not None:
            raise ResultFileError(f"{path}: this is {other}, not a saved result") from None
        raise ResultFileError(f"{path}: not an at2_lens result file: {exc}") from None
    found = meta.get("format")
    if found != kind:
        how = RESULT_KINDS.get(found) if isinstance(found, str) else None
        hint = f"; load it with {how}" if how else ""
        raise ResultFileError(f"{path}: holds a result of format {found!r}, expected {kind!r}{hint}")
    got = meta.get("format_version")
    if not isinstance(got, int) or isinstance(got, bool) or got < 1:
        raise ResultFileError(f"{path}: invalid format_version {got!r}")
    if got != version:
        newer = " (written by a newer at2_lens)" if got > version else ""
        raise ResultFileError(f"{path}: {kind} format_version {got}{newer}; this at2_lens reads version {version}")
    return tensors, meta


__all__ = ["RESULT_KINDS", "RESULT_META_KEY", "json_extra", "read_result", "write_result"]
