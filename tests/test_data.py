"""The shipped data: present, the bytes the committed results were drawn from, found without any folder beside the
checkout, and a clear error when a file is absent."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from at2_lens.data import (
    DATA_ENV,
    PACKAGE_DATA,
    SQUAD_V2_DEV_SUBSET,
    SQUAD_V2_DEV_SUBSET_SHA256,
    data_file,
)
from at2_lens.errors import DatasetNotFoundError
from at2_lens.evaluation.squad import squad_split_records
from at2_lens.models.classifier import load_sst2

pytestmark = pytest.mark.line_independent  # no TransformerLens model or backend code runs here

ROOT = Path(__file__).resolve().parents[1]

# Recorded from the SQuAD 2.0 subset the committed results were computed on (before the data moved into the repo):
# sha256 over the newline-joined question ids of each split, in file order.
HELD_OUT_IDS_SHA256 = "5f4e147c4d3a7f02fb69e3a76d5c68d038c896f254f515b9ce15b58c43a914db"
TRAIN_IDS_SHA256 = "b9a8efaf6f5ffa877a6bde245d35244b1101266ef7c7af04f12eddb5d1cc8f3c"


def _ids_digest(records: list[dict]) -> str:
    return hashlib.sha256("\n".join(r["id"] for r in records).encode("utf-8")).hexdigest()


def test_squad_subset_is_the_recorded_file_and_split() -> None:
    assert SQUAD_V2_DEV_SUBSET.is_relative_to(PACKAGE_DATA)
    assert hashlib.sha256(SQUAD_V2_DEV_SUBSET.read_bytes()).hexdigest() == SQUAD_V2_DEV_SUBSET_SHA256
    train, held = squad_split_records(SQUAD_V2_DEV_SUBSET)
    assert (len(train), len(held)) == (142, 31)
    assert _ids_digest(held) == HELD_OUT_IDS_SHA256
    assert _ids_digest(train) == TRAIN_IDS_SHA256


def test_sst2_files_load_from_the_shipped_data() -> None:
    texts, labels = load_sst2("validation")
    assert len(texts) == 872 and sum(labels) == 444  # the GLUE SST-2 dev set: 444 positive, 428 negative
    train, train_labels = load_sst2("train")
    assert len(train) == 60614 and set(train_labels) == {0, 1}
    assert data_file("sst2", "train.tsv") == ROOT / "data" / "sst2" / "train.tsv"


def test_nothing_refers_to_a_folder_beside_the_checkout() -> None:
    """The project stands alone: no tracked text file points at a data folder beside the checkout."""
    import subprocess

    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    needles = ("../" + "shared", '"shared" / ' + '"data"')
    offenders = []
    for name in files:
        if not name.endswith((".py", ".md", ".ipynb", ".toml", ".yml", ".cfg", ".txt")) and name != "Makefile":
            continue
        text = (ROOT / name).read_text(encoding="utf-8", errors="replace")
        if any(n in text for n in needles):
            offenders.append(name)
    assert offenders == []


def test_data_env_is_searched_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "sst2").mkdir()
    (tmp_path / "sst2" / "validation.tsv").write_text("sentence\tlabel\nfine\t1\nawful\t0\n", encoding="utf-8")
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    assert load_sst2("validation") == (["fine", "awful"], [1, 0])


def test_absent_file_names_where_it_looked_and_the_hub_name(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DatasetNotFoundError, match=r"sst2/absent\.tsv.*stanfordnlp/sst2"):
        data_file("sst2", "absent.tsv")
    with pytest.raises(DatasetNotFoundError, match="data_dir"):
        load_sst2("validation", data_dir="/nonexistent")
