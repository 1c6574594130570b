"""Resumable benchmark results: a per-task CSV and a JSON of the settings that produced it, both written atomically
after every task, so an interrupted run never leaves a half-written file and resumes only under the same settings."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from at2_lens._io import atomic_write_text


def meta_path(out: str | Path) -> Path:
    return Path(out).with_suffix(".json")


def load_partial(out: str | Path | None, settings: dict[str, Any]) -> tuple[pd.DataFrame | None, dict[str, Any]]:
    """``(rows, meta)`` of an earlier run written with the same settings; ``(None, {})`` when there is none. A result
    file written under other settings (or without its settings file) stops the run instead of being mixed in."""
    if not out or not Path(out).is_file():
        return None, {}
    meta = json.loads(meta_path(out).read_text()) if meta_path(out).is_file() else {}
    if meta.get("settings") != json.loads(json.dumps(settings)):
        raise SystemExit(f"{out} was written with other settings ({meta_path(out)}); use another --out")
    df = pd.read_csv(out)
    print(f"resuming: {df['task'].nunique()} finished tasks read from {out}", file=sys.stderr)
    return df, meta


def save_partial(out: str | Path, df: pd.DataFrame, settings: dict[str, Any], **extra: Any) -> None:
    """Write the rows, then their settings (plus ``extra`` fields), each atomically."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(out), df.to_csv(index=False))
    atomic_write_text(meta_path(out), json.dumps({"settings": settings, **extra}, indent=1))
