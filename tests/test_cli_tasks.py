"""``--tasks`` of ``collect`` and ``evaluate``: the shipped SQuAD subset by ``squad:``, hub names, HotpotQA files, and
clear errors before any model is loaded."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from at2_lens.cli import build_parser, main
from at2_lens.cli._args import parse_tasks_spec
from at2_lens.cli.collect import load_tasks
from at2_lens.cli.evaluate import load_eval_tasks
from at2_lens.data import SQUAD_V2_DEV_SUBSET
from at2_lens.errors import InputError
from at2_lens.evaluation.squad import is_held_out, squad_split
from at2_lens.models.tiny import save_tiny
from at2_lens.tasks.loaders import squad_tasks
from tests.hotpot_format_fixture import EXAMPLES


@pytest.fixture
def hotpot_file(tmp_path: Path) -> Path:
    path = tmp_path / "hotpot.json"
    path.write_text(json.dumps(EXAMPLES), encoding="utf-8")
    return path


@pytest.mark.line_independent
def test_tasks_specs_are_parsed() -> None:
    assert parse_tasks_spec("squad:") == ("squad", SQUAD_V2_DEV_SUBSET)
    assert parse_tasks_spec("squad:dev_subset") == ("squad", SQUAD_V2_DEV_SUBSET)
    assert parse_tasks_spec("squad:runs/squad.json") == ("squad", Path("runs/squad.json"))
    assert parse_tasks_spec("squad:rajpurkar/squad_v2") == ("squad", "rajpurkar/squad_v2")
    assert parse_tasks_spec("squad:rajpurkar/squad_v2:train") == ("squad", "rajpurkar/squad_v2:train")
    assert parse_tasks_spec("hotpot:hotpotqa/hotpot_qa") == ("hotpot", "hotpotqa/hotpot_qa")
    assert parse_tasks_spec("hotpot:dev.json") == ("hotpot", Path("dev.json"))
    assert parse_tasks_spec("tasks.jsonl") == ("jsonl", Path("tasks.jsonl"))
    with pytest.raises(InputError, match=r"--tasks: 'hotpot:' needs a file or hub name"):
        parse_tasks_spec("hotpot:")
    with pytest.raises(InputError, match=r"--tasks: 'stanfordnlp/sst2' is a sst2 dataset"):
        parse_tasks_spec("squad:stanfordnlp/sst2")
    with pytest.raises(InputError, match=r"--tasks: unknown prefix 'sst2:'; expected squad:, hotpot:"):
        parse_tasks_spec("sst2:stanfordnlp/sst2")


@pytest.mark.line_independent
def test_tasks_help_says_what_is_accepted() -> None:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for command in ("collect", "evaluate"):
        text = " ".join(sub.choices[command].format_help().split())
        for needle in ("'squad:' (or 'squad:dev_subset')", "squad:rajpurkar/squad_v2", "hotpot:PATH",
                       "hotpot:hotpotqa/hotpot_qa", "pip install 'at2_lens[hub]'", ".jsonl"):
            assert needle in text, (command, needle)


@pytest.mark.line_independent
def test_short_squad_spec_is_the_shipped_subset() -> None:
    tasks = load_tasks("squad:", "sentence", 4, 2)
    expected = squad_tasks(SQUAD_V2_DEV_SUBSET, limit=4, seed=2)
    assert [(t.context, t.query) for t in tasks] == [(t.context, t.query) for t in expected]
    held = load_eval_tasks("squad:dev_subset", "held_out", "sentence", None)
    assert [t.query for t in held] == [t.query for t in squad_split(SQUAD_V2_DEV_SUBSET)[1]]


@pytest.mark.line_independent
def test_hotpot_spec_loads_hotpotqa_tasks(hotpot_file: Path) -> None:
    tasks = load_tasks(f"hotpot:{hotpot_file}", "sentence", None, 0)
    assert sorted(t.query for t in tasks) == sorted(e["question"] for e in EXAMPLES)
    assert all(t.granularity == "custom" for t in tasks)  # HotpotQA's own sentences, as explicit spans
    assert [t.granularity for t in load_tasks(f"hotpot:{hotpot_file}", "document", 1, 0)] == ["document"]
    split = {name: load_eval_tasks(f"hotpot:{hotpot_file}", name, "sentence", None) for name in ("train", "held_out")}
    held_ids = [e["_id"] for e in EXAMPLES if is_held_out(e["_id"])]
    assert len(split["held_out"]) == len(held_ids) and len(split["train"]) == len(EXAMPLES) - len(held_ids)
    assert len(load_eval_tasks(f"hotpot:{hotpot_file}", "all", "sentence", None)) == len(EXAMPLES)


def test_collect_on_hotpot_and_missing_datasets(hotpot_file: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    tiny = save_tiny("llama", tmp_path / "model", n_ctx=1024)  # the tiny tokenizer spends a token per character
    store = tmp_path / "store"
    assert main(["collect", "--model", str(tiny), "--tasks", f"hotpot:{hotpot_file}", "--store", str(store),
                 "--n-masks", "2", "--max-new-tokens", "3"]) == 0
    assert len(list((store / "examples").glob("*.safetensors"))) == len(EXAMPLES)
    monkeypatch.setitem(sys.modules, "datasets", None)
    assert main(["collect", "--model", str(tiny), "--tasks", "squad:rajpurkar/squad_v2",
                 "--store", str(tmp_path / "s2")]) == 2
    err = capsys.readouterr().err
    assert "at2_lens[hub]" in err and "--tasks squad:" in err
    assert not (tmp_path / "s2").exists()  # refused before any model or store work
