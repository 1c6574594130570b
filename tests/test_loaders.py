"""Task loaders: SQuAD files, JSON Lines, generated multi-document tasks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from at2_lens.data import SQUAD_V2_DEV_SUBSET
from at2_lens.errors import InputError
from at2_lens.tasks.loaders import load_jsonl_tasks, multi_document_tasks, squad_records, squad_tasks

pytestmark = pytest.mark.line_independent  # no TransformerLens model or backend code runs here


def test_squad_records_and_tasks() -> None:
    path = SQUAD_V2_DEV_SUBSET
    records = squad_records(path)
    assert len(records) == 1407 - 702  # answerable questions only
    assert all(r["answers"] for r in records)
    tasks = squad_tasks(path, limit=5, seed=1)
    assert len(tasks) == 5 and len({t.context for t in tasks}) == 5  # one task per paragraph
    assert [t.query for t in tasks] == [t.query for t in squad_tasks(path, limit=5, seed=1)]


def test_multi_document_tasks_mix_relevant_and_distractors() -> None:
    records = squad_records(SQUAD_V2_DEV_SUBSET)
    tasks = multi_document_tasks(records, 20, seed=3)
    assert len(tasks) == 20
    by_question = {r["question"]: r for r in records}
    for t in tasks:
        r = by_question[t.query]
        assert r["context"] in t.context  # the relevant paragraph is one of the documents
        assert len(t.context) >= 2
        titles = {rec["title"] for rec in records if rec["context"] in t.context}
        assert len(t.context) == 1 + sum(1 for d in t.context if d != r["context"])
        assert r["title"] in titles
    again = multi_document_tasks(records, 20, seed=3)
    assert [t.context for t in tasks] == [t.context for t in again]
    with pytest.raises(InputError, match="n_distractors"):
        multi_document_tasks(records, 1, n_distractors=0)


def test_jsonl_tasks(tmp_path: Path) -> None:
    p = tmp_path / "t.jsonl"
    p.write_text(json.dumps({"context": ["A b.", "C d."], "query": "q?"}) + "\n\n", encoding="utf-8")
    (task,) = load_jsonl_tasks(p)
    assert task.context == ("A b.", "C d.") and task.response is None
    p.write_text("{not json\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"t.jsonl:1 is not valid JSON"):
        load_jsonl_tasks(p)
    p.write_text(json.dumps({"query": "q"}) + "\n", encoding="utf-8")
    with pytest.raises(InputError, match="'context' and 'query'"):
        load_jsonl_tasks(p)


def test_multi_document_split_keeps_the_split_and_covers_each_paragraph_once() -> None:
    from at2_lens.evaluation.squad import multi_document_split, squad_split_records

    path = SQUAD_V2_DEV_SUBSET
    train_r, held_r = squad_split_records(path)
    train, held = multi_document_split(path)
    assert [t.query for t in held] == [r["question"] for r in held_r]  # each held-out question once, in order
    assert [t.query for t in train] == [r["question"] for r in train_r]
    held_paragraphs = {r["context"] for r in held_r}
    for task, r in zip(held, held_r, strict=True):
        assert r["context"] in task.context and len(task.context) >= 2
        for doc in task.context:  # distractors are snippets of other held-out paragraphs only
            assert any(doc in p for p in held_paragraphs)
    for task in train:
        assert not any(doc in p for doc in task.context for p in held_paragraphs)
    assert [t.context for t in multi_document_split(path)[1]] == [t.context for t in held]
    assert [t.context for t in multi_document_split(path, seed=1)[1]] != [t.context for t in held]
