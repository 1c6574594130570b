"""Atomic, deterministic file writing shared by the ablation store, estimator files, benchmarks and scripts.

Every file at2_lens writes goes through :func:`atomic_write_bytes`: the bytes are written to a temporary file in the
destination's directory, flushed and fsynced, then moved over the destination with ``os.replace``. A reader therefore
sees either the old file or the complete new one, never a partial one. Temporary files are named
``.<final name>.<host>.<pid>.<random>.tmp`` so that files left by a killed writer can be recognised and removed
(:func:`cleanup_temp_files`) without touching the live temporaries of other writers.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import socket
import time
from pathlib import Path
from typing import Any

TEMP_SUFFIX = ".tmp"
_TEMP_RE = re.compile(r"^\.(?P<final>.+)\.(?P<host>[A-Za-z0-9_-]*)\.(?P<pid>\d+)\.(?P<token>[0-9a-f]{12})\.tmp$")
_STALE_AFTER_S = 3600.0


def canonical_json(obj: Any) -> str:
    """Serialise ``obj`` as JSON with sorted keys and no whitespace, so equal objects give equal bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _host_tag() -> str:
    """This machine's name, reduced to characters that are safe in a file name."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:64]


def temp_path_for(path: Path) -> Path:
    """A fresh temporary path in ``path``'s directory, tagged with this host and process id."""
    return path.with_name(f".{path.name}.{_host_tag()}.{os.getpid()}.{secrets.token_hex(6)}{TEMP_SUFFIX}")


def is_temp_file(path: Path) -> bool:
    """Whether ``path`` is a temporary file written by :func:`atomic_write_bytes`."""
    return _TEMP_RE.match(path.name) is not None


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (best effort: not every platform can open a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_fsync(path: Path, data: bytes, *, exclusive: bool = True) -> None:
    """Write ``data`` to a new file at ``path`` and fsync it."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags | getattr(os, "O_BINARY", 0), 0o644)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path | str, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file + fsync + ``os.replace``); returns the path.

    If anything fails part-way, the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    try:
        _write_fsync(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: Path | str, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_create_bytes(path: Path | str, data: bytes) -> bool:
    """Create ``path`` holding ``data`` only if it does not exist yet; atomic and race-safe.

    Returns True if this call created the file, False if it already existed (then it is left untouched). The
    complete file is written under a temporary name first and then hard-linked into place, so a concurrent reader
    never sees a partial file and two concurrent creators cannot both win.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    try:
        _write_fsync(tmp, data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:
            # No hard links on this file system: fall back to an exclusive create (a reader may briefly see a
            # short file, which store readers retry).
            try:
                _write_fsync(path, data, exclusive=True)
            except FileExistsError:
                return False
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    _fsync_dir(path.parent)
    return True


def _pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def cleanup_temp_files(directory: Path | str, *, stale_after_s: float = _STALE_AFTER_S) -> list[Path]:
    """Remove temporary files left in ``directory`` by writers that died; returns the paths removed.

    A temporary file is removed when it was written on this host by a process that no longer exists, or when it is
    older than ``stale_after_s`` seconds (for files written from other hosts on a shared file system). Live
    temporaries of concurrent writers are left alone.
    """
    directory = Path(directory)
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    host = _host_tag()
    now = time.time()
    for entry in directory.iterdir():
        match = _TEMP_RE.match(entry.name)
        if match is None:
            continue
        try:
            age = now - entry.stat().st_mtime
        except FileNotFoundError:
            continue
        same_host = match["host"] == host
        dead = same_host and int(match["pid"]) != os.getpid() and not _pid_alive(int(match["pid"]))
        if dead or age > stale_after_s:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
                removed.append(entry)
    return removed


# --- safetensors with one canonical-JSON metadata entry -------------------------------------------------------------
# safetensors writes its metadata map in a per-process random order, so files with several metadata keys are not
# byte-reproducible. at2_lens therefore stores all metadata as one canonical JSON string under a single key.


def safetensors_bytes(tensors: dict[str, Any], meta_key: str, meta: dict[str, Any]) -> bytes:
    """Serialise CPU tensors plus ``meta`` (stored as canonical JSON under ``meta_key``) to safetensors bytes."""
    from safetensors.torch import save

    contiguous = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    return save(contiguous, metadata={meta_key: canonical_json(meta)})


def sniff_unsafe_format(data: bytes) -> str | None:
    """Name the pickle-based format ``data`` is in (pickle, torch.save zip, legacy torch.save), else None.

    Detected from magic bytes only; nothing is ever unpickled.
    """
    if len(data) >= 2 and data[0] == 0x80 and 2 <= data[1] <= 5:
        return f"a pickle (protocol {data[1]}, e.g. from pickle.dumps or a legacy torch.save)"
    if data[:4] == b"PK\x03\x04":
        import io
        import zipfile

        try:
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                names = zf.namelist()
        except zipfile.BadZipFile:
            return None
        if any(n.endswith(".pkl") for n in names):
            return "a torch.save archive (zip holding a pickle)"
    return None


def _looks_like_safetensors(data: bytes) -> bool:
    """Whether ``data`` starts with a plausible safetensors header: a length that fits, then a JSON object."""
    if len(data) < 10:
        return False
    header_len = int.from_bytes(data[:8], "little")
    return 2 <= header_len <= len(data) - 8 and data[8:9] == b"{"


class SafetensorsParseError(Exception):
    """Raised by :func:`parse_safetensors`; the message says what is wrong, without the path.

    ``is_pickle`` is True when the data was recognised as a pickle-based format (refused, not parsed).
    """

    def __init__(self, message: str, *, is_pickle: bool = False) -> None:
        super().__init__(message)
        self.is_pickle = is_pickle


def parse_safetensors(data: bytes, meta_key: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Parse safetensors ``data`` into (tensors, metadata JSON under ``meta_key``), checking the header first.

    Raises SafetensorsParseError for anything that is not a complete, well-formed safetensors file carrying a JSON
    object under ``meta_key``. Pickle-based formats are refused without being unpickled.
    """
    # Sniff for pickle only when the bytes cannot be a safetensors header: a header length whose low bytes are
    # 0x80 0x02..0x05 (e.g. 896 = 0x0380) would otherwise look like a pickle's protocol marker.
    unsafe = None if _looks_like_safetensors(data) else sniff_unsafe_format(data)
    if unsafe is not None:
        raise SafetensorsParseError(
            f"the file is {unsafe}; pickle-based files are refused (never unpickled)", is_pickle=True
        )
    if len(data) < 8:
        raise SafetensorsParseError(f"the file is too short ({len(data)} bytes) to be a safetensors file")
    header_len = int.from_bytes(data[:8], "little")
    if header_len < 2 or 8 + header_len > len(data):
        raise SafetensorsParseError("bad or truncated safetensors header")
    try:
        header = json.loads(data[8 : 8 + header_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SafetensorsParseError(f"safetensors header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise SafetensorsParseError("safetensors header is not a JSON object")
    file_meta = header.get("__metadata__") or {}
    if not isinstance(file_meta, dict) or meta_key not in file_meta:
        raise SafetensorsParseError(f"the safetensors metadata has no {meta_key!r} entry")
    try:
        meta = json.loads(file_meta[meta_key])
    except (TypeError, json.JSONDecodeError) as exc:
        raise SafetensorsParseError(f"metadata entry {meta_key!r} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise SafetensorsParseError(f"metadata entry {meta_key!r} is not a JSON object")
    # Data section: offsets must tile the buffer exactly (catches truncation and trailing garbage).
    data_len = len(data) - 8 - header_len
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise SafetensorsParseError(f"tensor {name!r} has no valid data_offsets")
        spans.append((offsets[0], offsets[1]))
    end = max((e for _, e in spans), default=0)
    if end != data_len:
        raise SafetensorsParseError(
            f"data section is {data_len} bytes but the header describes {end} bytes (truncated or padded file)"
        )
    try:
        from safetensors.torch import load

        tensors = load(data)
    except Exception as exc:  # safetensors raises its own SafetensorError (and others) for malformed data
        raise SafetensorsParseError(f"safetensors could not decode the file ({type(exc).__name__}: {exc})") from None
    return tensors, meta


def read_bytes(path: Path) -> bytes:
    """Read a whole file into memory."""
    with open(path, "rb") as fh:
        return fh.read()


def read_named_file(path: Path, what: str, error: type[Exception]) -> bytes:
    """The bytes of the ``what`` file at ``path`` (e.g. ``"estimator"``); ``error`` with a message naming it when the
    path is missing, is not a file, or cannot be read."""
    if not path.exists():
        raise error(f"{what} file not found: {path}")
    if not path.is_file():
        raise error(f"{what} path is not a file: {path}")
    try:
        return read_bytes(path)
    except OSError as exc:
        raise error(f"cannot read {what} file {path}: {exc}") from None
