"""The real data shipped with at2_lens, and where to find it.

Two small files travel inside the package (so ``pip install at2_lens`` gets them): the SQuAD 2.0 dev subset behind
the faithfulness benchmark's training / held-out split, and the 872 GLUE SST-2 validation sentences. The SST-2
training phrases (3.4 MB, used only to train the shipped classifier head and to mine triggers) live in the
repository's ``data/`` folder and are not in the wheel. Provenance, subsetting and licences: ``README.md`` beside
this file. ``$AT2_LENS_DATA`` (a directory with the same ``sst2/`` / ``squad_v2/`` layout) is searched first.
"""

from __future__ import annotations

import os
from pathlib import Path

from at2_lens.errors import DatasetNotFoundError

DATA_ENV = "AT2_LENS_DATA"
"""Environment variable naming an extra data directory, searched before the shipped files."""
PACKAGE_DATA = Path(__file__).resolve().parent
"""The data inside the installed package."""
REPOSITORY_DATA = PACKAGE_DATA.parents[1] / "data"
"""The repository's ``data/`` folder (present in a checkout, absent in a wheel install)."""

SQUAD_V2_DEV_SUBSET = PACKAGE_DATA / "squad_v2" / "dev_subset.json"
"""SQuAD 2.0 dev, its first 5 articles (173 paragraphs, 1,407 questions), official JSON format."""
SQUAD_V2_DEV_SUBSET_SHA256 = "db71d0a19c3f656b1ebefafce642b828cfab269f0d906312dfb0efdc7173b31a"
"""The file's digest: the held-out split of every committed result was drawn from exactly these bytes."""

HUB_NAMES = {"squad_v2": "rajpurkar/squad_v2", "sst2": "stanfordnlp/sst2", "hotpot_qa": "hotpotqa/hotpot_qa"}
"""The Hugging Face ``datasets`` names of the originals (and of HotpotQA, not shipped), read by
:mod:`at2_lens.tasks.hub`."""


def search_dirs() -> list[Path]:
    """Where shipped data is looked for, in order: ``$AT2_LENS_DATA``, the package, the repository's ``data/``."""
    dirs = [PACKAGE_DATA, REPOSITORY_DATA]
    env = os.environ.get(DATA_ENV)
    if env:
        dirs.insert(0, Path(env).expanduser())
    return dirs


def data_file(*parts: str) -> Path:
    """The path of a shipped data file, e.g. ``data_file("sst2", "train.tsv")``.

    Raises:
        DatasetNotFoundError: no searched directory holds it; the message lists them and the hub alternative.
    """
    tried = [d.joinpath(*parts) for d in search_dirs()]
    for path in tried:
        if path.is_file():
            return path
    hub = HUB_NAMES.get(parts[0]) if parts else None
    alt = f", or load the original with datasets.load_dataset({hub!r})" if hub else ""
    raise DatasetNotFoundError(
        f"data file {'/'.join(parts)} is absent (looked in {', '.join(str(p) for p in tried)}); "
        f"set {DATA_ENV} to a directory holding it (a clone of the repository has it under data/){alt}"
    )


__all__ = [
    "DATA_ENV",
    "HUB_NAMES",
    "PACKAGE_DATA",
    "REPOSITORY_DATA",
    "SQUAD_V2_DEV_SUBSET",
    "SQUAD_V2_DEV_SUBSET_SHA256",
    "data_file",
    "search_dirs",
]
