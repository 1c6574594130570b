"""Resumable benchmark results: a per-task CSV and a JSON of the settings that produced it, both written atomically
after every task, so an interrupted run never leaves a half-written file and resumes only under the same settings.

A results file can also be *re-scored*: some methods' rows recomputed for every finished task (e.g. AT2 after its
estimator was retrained) while the other methods' rows are kept. While that is under way the JSON holds a
``rescore`` entry (the methods and the tasks left), so a killed re-scoring resumes, and a plain run refuses a file
whose rows come from two settings."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from at2_lens.files import atomic_write_text


def meta_path(out: str | Path) -> Path:
    return Path(out).with_suffix(".json")


def _without(settings: dict[str, Any] | None, keys: Iterable[str]) -> dict[str, Any] | None:
    if settings is None:
        return None
    drop = set(keys)
    return {k: v for k, v in json.loads(json.dumps(settings)).items() if k not in drop}


def load_partial(
    out: str | Path | None, settings: dict[str, Any], *, may_differ: Iterable[str] = (), rescoring: bool = False
) -> tuple[pd.DataFrame | None, dict[str, Any]]:
    """``(rows, meta)`` of an earlier run written with the same settings; ``(None, {})`` when there is none. A result
    file written under other settings (or without its settings file) stops the run instead of being mixed in.

    ``may_differ`` names settings that may differ (those a re-scoring changes); ``rescoring`` says the caller is a
    re-scoring run, the only kind allowed to read a file whose re-scoring is unfinished."""
    if not out or not Path(out).is_file():
        return None, {}
    meta = json.loads(meta_path(out).read_text()) if meta_path(out).is_file() else {}
    keys = list(may_differ)
    if _without(meta.get("settings"), keys) != _without(settings, keys):
        raise SystemExit(f"{out} was written with other settings ({meta_path(out)}); use another --out")
    if meta.get("rescore") and not rescoring:
        raise SystemExit(f"{out} is being re-scored ({', '.join(meta['rescore']['methods'])}; "
                         f"{len(meta['rescore']['tasks_left'])} tasks left): finish that with the same --rescore first")
    df = pd.read_csv(out)
    print(f"resuming: {df['task'].nunique()} finished tasks read from {out}", file=sys.stderr)
    return df, meta


def save_partial(out: str | Path, df: pd.DataFrame, settings: dict[str, Any], **extra: Any) -> None:
    """Write the rows, then their settings (plus ``extra`` fields), each atomically."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(out), df.to_csv(index=False))
    atomic_write_text(meta_path(out), json.dumps({"settings": settings, **extra}, indent=1))


def replace_method_rows(
    done: pd.DataFrame, task: int, new: pd.DataFrame, methods: Iterable[str], order: Iterable[str] = ()
) -> pd.DataFrame:
    """``done`` with task ``task``'s rows of ``methods`` replaced by ``new``'s, each method's block where the old one
    was, so tables that list methods in order of first appearance keep their order. A method the task has no rows of
    yet (one a re-scoring adds) is inserted after the block of the method before it in ``order`` (the run's method
    order); without ``order`` that is an error."""
    names = list(dict.fromkeys(methods))
    order = list(order)
    pieces: list[tuple[str | None, pd.DataFrame]] = []
    placed: set[str] = set()
    for (t, method), block in done.groupby(["task", "method"], sort=False):
        if t == task and method in names:
            pieces.append((method, new[new["method"] == method]))
            placed.add(method)
        else:
            pieces.append((method if t == task else None, block))
    for method in [m for m in names if m not in placed]:
        if method not in order:
            raise SystemExit(f"--rescore: task {task} has no rows of {method!r} to replace")
        before = [m for m in order[: order.index(method)] if any(p == m for p, _ in pieces)]
        if before:
            at = max(i for i, (p, _) in enumerate(pieces) if p == before[-1]) + 1
        else:
            task_blocks = [i for i, (p, _) in enumerate(pieces) if p is not None]
            at = task_blocks[0] if task_blocks else len(pieces)
        pieces.insert(at, (method, new[new["method"] == method]))
    return pd.concat([block for _, block in pieces], ignore_index=True)
