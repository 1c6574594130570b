"""Hugging Face ``datasets`` sources: SQuAD 2.0, SST-2 and HotpotQA by their hub names.

The download (:func:`load_hub_rows`) is kept apart from the mapping of rows to at2_lens records
(:func:`squad_rows_to_records`, :func:`sst2_rows_to_examples`; HotpotQA rows go through
:func:`at2_lens.tasks.hotpot.hotpot_record`), so the mapping is tested on local ``datasets.Dataset`` objects without a
hub. ``datasets`` is imported only when a hub name is loaded (``pip install 'at2_lens[hub]'``). Without a network
(or with ``HF_HUB_OFFLINE=1`` and no cached copy) loading fails with :class:`~at2_lens.errors.HubDatasetError`, whose
message names the local alternative.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from at2_lens.data import HUB_NAMES
from at2_lens.errors import HubDatasetError, InputError

HUB_EXTRA = "pip install 'at2_lens[hub]'"
"""How to install the optional ``datasets`` dependency."""


@dataclass(frozen=True)
class HubDataset:
    """A supported hub dataset: its name, configuration, default split, and what to use without the hub."""

    name: str
    kind: str
    config: str | None
    default_split: str
    local_alternative: str


HUB_DATASETS: dict[str, HubDataset] = {
    d.name: d
    for d in (
        HubDataset(HUB_NAMES["squad_v2"], "squad", None, "validation",
                   "the shipped SQuAD 2.0 subset at2_lens.data.SQUAD_V2_DEV_SUBSET (CLI: --tasks squad:) or a local "
                   "SQuAD-format JSON file"),
        HubDataset(HUB_NAMES["sst2"], "sst2", None, "validation",
                   "the shipped validation split, load_sst2() with no data_dir"),
        HubDataset(HUB_NAMES["hotpot_qa"], "hotpot", "distractor", "validation",
                   "a local HotpotQA JSON file, hotpot_records(PATH) (CLI: --tasks hotpot:PATH)"),
    )
}
"""The hub datasets at2_lens reads, by name."""


def parse_hub_name(value: object, kind: str | None = None, name: str = "path") -> tuple[HubDataset, str] | None:
    """``(dataset, split)`` when ``value`` is a str naming a supported hub dataset (``NAME`` or ``NAME:SPLIT``), else
    None (a local path). A ``pathlib.Path`` is always local.

    With ``kind`` (``"squad"``, ``"sst2"``, ``"hotpot"``), a supported name of another kind raises InputError naming
    the argument ``name``.
    """
    if not isinstance(value, str):
        return None
    hub_name, sep, split = value.partition(":")
    dataset = HUB_DATASETS.get(hub_name)
    if dataset is None:
        return None
    if kind is not None and dataset.kind != kind:
        wanted = [d.name for d in HUB_DATASETS.values() if d.kind == kind]
        raise InputError(f"{name}: {value!r} is a {dataset.kind} dataset; expected {' or '.join(wanted)} or a local "
                         "file")
    if sep and not split:
        raise InputError(f"{name}: expected {hub_name} or {hub_name}:SPLIT, got {value!r}")
    return dataset, split or dataset.default_split


def _offline() -> bool:
    """Whether Hugging Face offline mode is switched on in the environment."""
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("HF_DATASETS_OFFLINE", ""))
    return any(f.strip().upper() in {"1", "ON", "YES", "TRUE"} for f in flags)


def load_hub_rows(dataset: HubDataset, split: str, *, cache_dir: str | Path | None = None) -> Any:
    """One split of a hub dataset as a ``datasets.Dataset`` (from the local ``datasets`` cache when it holds it).

    Raises:
        HubDatasetError: ``datasets`` is not installed (the message gives the pip extra), or the dataset could not be
            loaded (offline, no network, unknown split...); the message names the local alternative.
    """
    try:
        import datasets
    except ImportError:
        raise HubDatasetError(
            f"{dataset.name}: loading a Hugging Face dataset needs the 'datasets' package ({HUB_EXTRA}); "
            f"without it use {dataset.local_alternative}"
        ) from None
    try:
        return datasets.load_dataset(dataset.name, dataset.config, split=split,
                                     cache_dir=None if cache_dir is None else str(cache_dir))
    except Exception as exc:  # network, offline mode, unknown split, hub errors: all mean "not available here"
        why = "HF_HUB_OFFLINE is set and no cached copy was found; " if _offline() else ""
        raise HubDatasetError(
            f"{dataset.name} (split {split!r}) could not be loaded from the Hugging Face Hub ({why}"
            f"{type(exc).__name__}: {exc}); use {dataset.local_alternative}"
        ) from exc


Rows = Iterable[Mapping[str, Any]]
"""Dataset rows: a ``datasets.Dataset`` or any iterable of mappings."""


def _with_columns(rows: Rows, columns: tuple[str, ...], what: str) -> Rows:
    """``rows`` (a ``datasets.Dataset``, or any iterable of mappings, then read into a list) after checking that they
    have ``columns``; InputError names the missing ones."""
    names = getattr(rows, "column_names", None)
    if names is None:
        rows = list(rows)
        names = list(rows[0]) if rows and isinstance(rows[0], Mapping) else []
    missing = [c for c in columns if c not in names]
    if missing:
        raise InputError(f"rows: {what} rows need the columns {list(columns)}; missing {missing}")
    return rows


def squad_rows_to_records(rows: Rows, answerable_only: bool = True) -> list[dict[str, Any]]:
    """SQuAD records (as :func:`at2_lens.tasks.loaders.squad_records` gives them) from rows in the hub's
    ``squad_v2`` schema: ``id, title, context, question, answers={text: [...], answer_start: [...]}``.

    Unanswerable questions (no answer text) are dropped with ``answerable_only``. Row order is kept.
    """
    out = []
    for row in _with_columns(rows, ("id", "title", "context", "question", "answers"), "SQuAD"):
        answers = list(row["answers"]["text"])
        if answerable_only and not answers:
            continue
        out.append({"id": row["id"], "title": row["title"], "context": row["context"], "question": row["question"],
                    "answers": answers})
    return out


def sst2_rows_to_examples(rows: Rows, limit: int | None = None) -> tuple[list[str], list[int]]:
    """``(texts, labels)`` as :func:`at2_lens.models.classifier.load_sst2` gives them, from rows in the hub's
    ``sst2`` schema (``idx, sentence, label``): texts stripped, at most ``limit`` rows (None: all)."""
    texts: list[str] = []
    labels: list[int] = []
    for row in _with_columns(rows, ("sentence", "label"), "SST-2"):
        if limit is not None and len(texts) >= limit:
            break
        label = int(row["label"])
        if label not in (0, 1):
            raise InputError(f"rows: SST-2 label must be 0 or 1, got {row['label']!r} for {row['sentence'][:60]!r}")
        texts.append(row["sentence"].strip())
        labels.append(label)
    return texts, labels


__all__ = [
    "HUB_DATASETS",
    "HUB_EXTRA",
    "HubDataset",
    "load_hub_rows",
    "parse_hub_name",
    "squad_rows_to_records",
    "sst2_rows_to_examples",
]
