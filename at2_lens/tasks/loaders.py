"""Task loaders: JSON Lines files of tasks, SQuAD (a local file or the hub), and the built-in demo task.

A SQuAD source is a local file in the official ``squad_v2`` JSON format (by default the shipped subset,
:data:`at2_lens.data.SQUAD_V2_DEV_SUBSET`) or the hub name ``"rajpurkar/squad_v2"`` (read by
:mod:`at2_lens.tasks.hub`), which give the same record fields. HotpotQA is in :mod:`at2_lens.tasks.hotpot`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from at2_lens._validate import check_int, check_optional_int
from at2_lens.data import SQUAD_V2_DEV_SUBSET
from at2_lens.errors import InputError
from at2_lens.tasks import ContextTask

DEMO_CONTEXT = [
    "The Eiffel Tower is a wrought-iron lattice tower in Paris, France. It was designed by the company of "
    "Gustave Eiffel and completed in 1889 for the World's Fair. It is 330 metres tall.",
    "Mount Everest is the highest mountain on Earth above sea level. It lies in the Himalayas on the border "
    "between Nepal and China. Its height is 8,849 metres.",
    "The Great Wall of China is a series of fortifications built across northern China. Construction began "
    "in the 7th century BC. The wall is more than 21,000 kilometres long.",
]
DEMO_QUESTION = "What is the height of Mount Everest?"


def demo_task(sources: str = "sentence") -> ContextTask:
    """The built-in multi-paragraph question used by ``at2-lens demo``."""
    return ContextTask(context=DEMO_CONTEXT, query=DEMO_QUESTION, sources=sources)


def load_jsonl_tasks(path: str | Path, sources: str = "sentence") -> list[ContextTask]:
    """Tasks from a JSON Lines file: one object per line with ``context`` (str or list of documents),
    ``query`` and optionally ``response``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"tasks: file {path} does not exist")
    tasks = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"tasks: {path}:{n} is not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict) or "context" not in obj or "query" not in obj:
            raise InputError(f"tasks: {path}:{n} must be an object with 'context' and 'query'")
        tasks.append(
            ContextTask(
                context=obj["context"],
                query=obj["query"],
                response=obj.get("response"),
                sources=obj.get("sources", sources),
            )
        )
    if not tasks:
        raise InputError(f"tasks: {path} holds no tasks")
    return tasks


def squad_records(
    path: str | Path = SQUAD_V2_DEV_SUBSET, answerable_only: bool = True, *, cache_dir: str | Path | None = None
) -> list[dict[str, Any]]:
    """Flat ``{id, title, context, question, answers}`` records from a SQuAD (1.1 or 2.0) JSON file, in file order.

    ``path`` defaults to the shipped SQuAD 2.0 subset; the str ``"rajpurkar/squad_v2"`` (or
    ``"rajpurkar/squad_v2:train"``) reads the hub's split instead (``datasets`` needed; ``cache_dir`` is its cache),
    raising :class:`~at2_lens.errors.HubDatasetError` when that is not possible. ``answers`` are the answer texts;
    unanswerable questions are dropped with ``answerable_only``.
    """
    from at2_lens.tasks.hub import load_hub_rows, parse_hub_name, squad_rows_to_records

    hub = parse_hub_name(path, "squad")
    if hub is not None:
        return squad_rows_to_records(load_hub_rows(*hub, cache_dir=cache_dir), answerable_only)
    path = Path(path)
    if not path.is_file():
        raise InputError(f"path: SQuAD file {path} does not exist")
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or "data" not in data:
        raise InputError(f"path: {path} is not in SQuAD format (no 'data' key)")
    out = []
    for article in data["data"]:
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                answers = [a["text"] for a in qa.get("answers", [])]
                if answerable_only and (qa.get("is_impossible") or not answers):
                    continue
                out.append(
                    {
                        "id": qa["id"],
                        "title": article.get("title", ""),
                        "context": para["context"],
                        "question": qa["question"],
                        "answers": answers,
                    }
                )
    return out


def squad_tasks(
    path: str | Path = SQUAD_V2_DEV_SUBSET,
    *,
    limit: int | None = None,
    seed: int = 0,
    sources: str = "sentence",
    one_per_paragraph: bool = True,
    cache_dir: str | Path | None = None,
) -> list[ContextTask]:
    """Context-attribution tasks from SQuAD (a file or the hub name, as :func:`squad_records` takes it): paragraph as
    context, question as query, no response (the model's own answer becomes the target). Shuffled deterministically
    by ``seed``."""
    limit = check_optional_int("limit", limit)
    records = squad_records(path, cache_dir=cache_dir)
    if one_per_paragraph:
        seen: set[str] = set()
        records = [r for r in records if not (r["context"] in seen or seen.add(r["context"]))]
    random.Random(seed).shuffle(records)
    if limit is not None:
        records = records[:limit]
    return [ContextTask(context=r["context"], query=r["question"], sources=sources) for r in records]


def multi_document_tasks(
    records: list[dict[str, Any]],
    n: int,
    *,
    n_distractors: int = 2,
    distractor_sentences: int = 2,
    seed: int = 0,
    cycle: bool = False,
) -> list[ContextTask]:
    """Multi-document tasks: a question's own paragraph among distractor snippets from other articles.

    Each task's documents are the relevant paragraph and ``n_distractors`` snippets (the first
    ``distractor_sentences`` sentences of paragraphs from other articles), in a seeded random order; sources are
    sentences, so only some sources are relevant. The i-th task's question is a random record, or with
    ``cycle=True`` record ``i % len(records)`` (every record once before any repeats: an evaluation set).
    Deterministic in ``seed``.
    """
    from at2_lens.tasks.sources import split_sentences

    check_int("n_distractors", n_distractors)
    rng = random.Random(seed)
    by_title: dict[str, list[str]] = {}
    for r in records:
        paras = by_title.setdefault(r["title"], [])
        if r["context"] not in paras:
            paras.append(r["context"])
    if len(by_title) < 2:
        raise InputError("records: multi-document tasks need paragraphs from at least two articles")
    tasks = []
    for i in range(n):
        r = records[i % len(records)] if cycle else records[rng.randrange(len(records))]
        others = [t for t in by_title if t != r["title"]]
        docs = [r["context"]]
        for _ in range(n_distractors):
            para = rng.choice(by_title[rng.choice(others)])
            spans = split_sentences(para)[:distractor_sentences]
            docs.append(para[spans[0][0] : spans[-1][1]])
        docs = list(dict.fromkeys(docs))  # a repeated distractor would be a duplicate document
        rng.shuffle(docs)
        tasks.append(ContextTask(context=docs, query=r["question"], sources="sentence"))
    return tasks
