"""Hub dataset names as task sources, without a hub: the row mappings on local ``datasets.Dataset`` objects built from
the shipped files give exactly the local loaders' records, offline and missing-``datasets`` runs give a clear error
that names the local alternative, and the HotpotQA loader reads both layouts of a format fixture."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path
from typing import Any

import pytest

from at2_lens.data import SQUAD_V2_DEV_SUBSET, data_file
from at2_lens.errors import DatasetNotFoundError, HubDatasetError, InputError
from at2_lens.evaluation.squad import squad_split
from at2_lens.models.classifier import load_sst2
from at2_lens.tasks.hotpot import hotpot_record, hotpot_records, hotpot_task, hotpot_tasks
from at2_lens.tasks.hub import HUB_DATASETS, parse_hub_name, squad_rows_to_records, sst2_rows_to_examples
from at2_lens.tasks.loaders import squad_records, squad_tasks
from at2_lens.tasks.sources import join_documents, partition, split_sentences
from tests.hotpot_format_fixture import EXAMPLES, to_hub_layout

pytestmark = pytest.mark.line_independent  # no TransformerLens model or backend code runs here

datasets = pytest.importorskip("datasets")


def _squad_hub_rows() -> list[dict[str, Any]]:
    """The shipped SQuAD 2.0 subset reshaped to the hub's ``rajpurkar/squad_v2`` schema, every question kept (the hub
    gives unanswerable questions an empty ``answers``)."""
    data = json.loads(SQUAD_V2_DEV_SUBSET.read_text(encoding="utf-8"))
    return [
        {"id": qa["id"], "title": article["title"], "context": para["context"], "question": qa["question"],
         "answers": {"text": [a["text"] for a in qa["answers"]],
                     "answer_start": [a["answer_start"] for a in qa["answers"]]}}
        for article in data["data"] for para in article["paragraphs"] for qa in para["qas"]
    ]


def _sst2_hub_rows() -> list[dict[str, Any]]:
    """The shipped SST-2 validation file as the hub's ``stanfordnlp/sst2`` rows (raw sentences, trailing space kept)."""
    lines = data_file("sst2", "validation.tsv").read_text(encoding="utf-8").splitlines()[1:]
    rows = []
    for idx, line in enumerate(lines):
        sentence, _, label = line.rpartition("\t")
        rows.append({"idx": idx, "sentence": sentence, "label": int(label)})
    return rows


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """``datasets.load_dataset`` answering the three supported names with local Datasets; records each call."""
    tables = {
        ("rajpurkar/squad_v2", None): datasets.Dataset.from_list(_squad_hub_rows()),
        ("stanfordnlp/sst2", None): datasets.Dataset.from_list(_sst2_hub_rows()),
        ("hotpotqa/hotpot_qa", "distractor"): datasets.Dataset.from_list([to_hub_layout(e) for e in EXAMPLES]),
    }
    calls: list[tuple[Any, ...]] = []

    def load_dataset(name: str, config: str | None = None, *, split: str, cache_dir: str | None = None) -> Any:
        calls.append((name, config, split))
        return tables[name, config]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


@pytest.fixture
def hotpot_file(tmp_path: Path) -> Path:
    path = tmp_path / "hotpot_dev_fixture.json"
    path.write_text(json.dumps(EXAMPLES), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------- SQuAD, SST-2
def test_squad_hub_rows_give_the_local_records() -> None:
    rows = datasets.Dataset.from_list(_squad_hub_rows())
    assert squad_rows_to_records(rows) == squad_records(SQUAD_V2_DEV_SUBSET)
    everything = squad_rows_to_records(rows, answerable_only=False)
    assert everything == squad_records(SQUAD_V2_DEV_SUBSET, answerable_only=False)
    assert len(everything) == 1407
    assert squad_rows_to_records(iter(_squad_hub_rows())) == squad_records(SQUAD_V2_DEV_SUBSET)  # a one-pass iterable
    with pytest.raises(InputError, match=r"SQuAD rows need the columns .*missing \['answers'\]"):
        squad_rows_to_records([{"id": "a", "title": "t", "context": "c", "question": "q"}])


def test_squad_by_hub_name_equals_the_shipped_file(fake_hub: list[tuple[Any, ...]]) -> None:
    assert squad_records("rajpurkar/squad_v2") == squad_records()  # default: the shipped subset
    assert fake_hub == [("rajpurkar/squad_v2", None, "validation")]
    hub, local = squad_tasks("rajpurkar/squad_v2", limit=5, seed=1), squad_tasks(SQUAD_V2_DEV_SUBSET, limit=5, seed=1)
    assert [(t.context, t.query, t.sources) for t in hub] == [(t.context, t.query, t.sources) for t in local]
    held_hub, held_local = squad_split("rajpurkar/squad_v2")[1], squad_split(SQUAD_V2_DEV_SUBSET)[1]
    assert [t.query for t in held_hub] == [t.query for t in held_local]
    squad_records("rajpurkar/squad_v2:train")
    assert fake_hub[-1] == ("rajpurkar/squad_v2", None, "train")


def test_sst2_hub_rows_give_load_sst2(fake_hub: list[tuple[Any, ...]]) -> None:
    rows = datasets.Dataset.from_list(_sst2_hub_rows())
    assert rows[0]["sentence"].endswith(" ")  # the raw text is not already stripped
    assert sst2_rows_to_examples(rows) == load_sst2("validation")
    assert sst2_rows_to_examples(rows, limit=7) == load_sst2("validation", limit=7)
    assert load_sst2("validation", limit=40, data_dir="stanfordnlp/sst2") == load_sst2("validation", limit=40)
    assert fake_hub == [("stanfordnlp/sst2", None, "validation")]
    with pytest.raises(InputError, match="label must be 0 or 1"):  # the hub's test split is unlabelled (-1)
        sst2_rows_to_examples([{"idx": 0, "sentence": "fine", "label": -1}])
    with pytest.raises(InputError, match=r"missing \['label'\]"):
        sst2_rows_to_examples(datasets.Dataset.from_list([{"idx": 0, "sentence": "fine"}]))


def test_hub_names_are_checked_for_their_kind() -> None:
    assert parse_hub_name(Path("rajpurkar/squad_v2")) is None  # a Path is always a local file
    assert parse_hub_name("data/squad.json", "squad") is None
    assert parse_hub_name("hotpotqa/hotpot_qa") == (HUB_DATASETS["hotpotqa/hotpot_qa"], "validation")
    with pytest.raises(InputError, match=r"path: 'stanfordnlp/sst2' is a sst2 dataset; expected rajpurkar/squad_v2"):
        squad_records("stanfordnlp/sst2")
    with pytest.raises(InputError, match="data_dir: "):
        load_sst2(data_dir="rajpurkar/squad_v2")
    with pytest.raises(InputError, match="split="):
        load_sst2(data_dir="stanfordnlp/sst2:train")
    with pytest.raises(InputError, match=r"path: expected rajpurkar/squad_v2 or rajpurkar/squad_v2:SPLIT"):
        squad_records("rajpurkar/squad_v2:")


# ---------------------------------------------------------------------------------------- offline, no `datasets`
@pytest.mark.parametrize(("load", "alternative"), [
    (lambda c: squad_records("rajpurkar/squad_v2", cache_dir=c), "at2_lens.data.SQUAD_V2_DEV_SUBSET"),
    (lambda c: load_sst2("validation", data_dir="stanfordnlp/sst2", cache_dir=c), "load_sst2()"),
    (lambda c: hotpot_records("hotpotqa/hotpot_qa", cache_dir=c), "local HotpotQA JSON file"),
])
def test_offline_hub_names_fail_clearly_without_touching_the_network(
    load: Any, alternative: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_network(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a network connection was attempted")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(HubDatasetError, match="HF_HUB_OFFLINE is set") as info:
        load(tmp_path / "empty_cache")  # an empty cache: nothing to fall back on
    assert alternative in str(info.value)
    assert "network connection was attempted" not in str(info.value)
    assert isinstance(info.value, DatasetNotFoundError)


def test_missing_datasets_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    with pytest.raises(HubDatasetError, match=r"pip install 'at2_lens\[hub\]'.*SQUAD_V2_DEV_SUBSET"):
        squad_records("rajpurkar/squad_v2")
    with pytest.raises(HubDatasetError, match=r"at2_lens\[hub\].*load_sst2\(\)"):
        load_sst2(data_dir="stanfordnlp/sst2")
    assert len(squad_records()) == 705  # local files need no `datasets`


# --------------------------------------------------------------------------------------------------------- HotpotQA
def test_hotpot_sources_are_hotpotqa_sentences(hotpot_file: Path) -> None:
    records = hotpot_records(hotpot_file)
    assert [r["id"] for r in records] == ["fixture-bridge-1", "fixture-comparison-2"]
    r = records[0]
    text, doc_spans = join_documents(r["documents"])
    assert r["documents"][1].startswith("The Quiet Harbour\nThe Quiet Harbour is a folk band")  # titled paragraphs
    expected = [(title, k, s.strip()) for title, sents in EXAMPLES[0]["context"] for k, s in enumerate(sents)
                if s.strip()]  # every non-blank sentence, exactly as HotpotQA splits it
    assert [(t, k, text[a:b]) for (t, k), (a, b) in zip(r["source_keys"], r["sources"], strict=True)] == expected
    for (a, b), (title, _) in zip(r["sources"], r["source_keys"], strict=True):  # each inside its own document
        d = r["titles"].index(title)
        assert doc_spans[d][0] + len(title) < a < b <= doc_spans[d][1]
    # The library's splitter would cut this paragraph elsewhere: the explicit spans are what keeps HotpotQA's split.
    paragraph = "".join(EXAMPLES[0]["context"][1][1])
    assert [paragraph[a:b] for a, b in split_sentences(paragraph)] != [s.strip() for s in EXAMPLES[0]["context"][1][1]
                                                                        if s.strip()]
    # Gold: the answer, and the facts as source indices (the fact naming sentence 7 of a 4-sentence paragraph has none).
    assert r["answers"] == ["1994"]
    assert [text[slice(*r["sources"][i])] for i in r["supporting_sources"]] == [
        "Lantern Roads is the third studio album by the folk group The Quiet Harbour.",
        "The group was formed in 1994 by two sisters from Maine.",
    ]
    assert r["supporting_facts"] == [("Lantern Roads", 0), ("The Quiet Harbour", 1), ("The Quiet Harbour", 7)]
    assert records[1]["answers"] == ["yes"] and records[1]["supporting_sources"] == [0, 2]


def test_hotpot_hub_layout_gives_the_same_records(hotpot_file: Path, fake_hub: list[tuple[Any, ...]]) -> None:
    local = hotpot_records(hotpot_file)
    rows = datasets.Dataset.from_list([to_hub_layout(e) for e in EXAMPLES])
    assert hotpot_records(rows) == local
    assert [hotpot_record(to_hub_layout(e)) for e in EXAMPLES] == local
    assert hotpot_records("hotpotqa/hotpot_qa") == local
    assert fake_hub == [("hotpotqa/hotpot_qa", "distractor", "validation")]


def test_hotpot_tasks(hotpot_file: Path) -> None:
    records = hotpot_records(hotpot_file)
    task = hotpot_task(records[0])
    assert task.query == EXAMPLES[0]["question"] and task.response is None and len(task.context) == 3
    assert list(task.sources) == records[0]["sources"]
    assert partition(task.context, task.sources) == records[0]["sources"]
    assert len(partition(task.context, hotpot_task(records[0], "document").sources)) == 3
    tasks = hotpot_tasks(hotpot_file, seed=3)
    assert sorted(t.query for t in tasks) == sorted(e["question"] for e in EXAMPLES)
    assert [t.query for t in hotpot_tasks(hotpot_file, seed=3)] == [t.query for t in tasks]
    assert len(hotpot_tasks(hotpot_file, limit=1)) == 1
    with pytest.raises(InputError, match="limit"):
        hotpot_tasks(hotpot_file, limit=0)


def test_hotpot_bad_input_names_the_example(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        hotpot_records(tmp_path / "absent.json")
    (tmp_path / "obj.json").write_text("{}", encoding="utf-8")
    with pytest.raises(InputError, match="JSON list"):
        hotpot_records(tmp_path / "obj.json")
    broken = {k: v for k, v in EXAMPLES[0].items() if k != "supporting_facts"}
    with pytest.raises(InputError, match=r"'fixture-bridge-1'.*supporting_facts"):
        hotpot_record(broken)
    with pytest.raises(InputError, match=r"'fixture-bridge-1': context\[0\]"):
        hotpot_record({**EXAMPLES[0], "context": [["T", "not a list"]]})
    with pytest.raises(InputError, match="integer sentence index"):
        hotpot_record({**EXAMPLES[0], "supporting_facts": [["Lantern Roads", "zero"]]})
    twice = [EXAMPLES[0]["context"][0], EXAMPLES[0]["context"][0]]
    with pytest.raises(InputError, match=r"'fixture-bridge-1'.*duplicate"):
        hotpot_record({**EXAMPLES[0], "context": twice})
