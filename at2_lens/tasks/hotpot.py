"""HotpotQA as multi-document context-attribution tasks, with HotpotQA's own sentences as sources.

Each example's paragraphs become the documents (``"<title>\\n<paragraph>"``, the paragraph being its sentences joined
as HotpotQA stores them) and each HotpotQA sentence one source, given as an explicit character span: the library's
``"sentence"`` partitioner would split some paragraphs differently ("U.S. The band ..."), and the supporting facts
are indices into HotpotQA's own split. The gold answer and the supporting facts (as source indices) stay on the record.

Two input layouts are read: the JSON files HotpotQA publishes (a list of examples with ``_id``, ``context`` =
``[[title, [sentence, ...]], ...]`` and ``supporting_facts`` = ``[[title, sentence_index], ...]``), and the rows of the
hub dataset ``hotpotqa/hotpot_qa`` (configuration ``distractor``: ``id``, ``context`` = ``{title: [...], sentences:
[[...], ...]}``, ``supporting_facts`` = ``{title: [...], sent_id: [...]}``).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from at2_lens._validate import check_optional_int
from at2_lens.errors import InputError
from at2_lens.tasks.context import ContextTask
from at2_lens.tasks.sources import DEFAULT_SEPARATOR, Span, _is_int, join_documents

TITLE_SEPARATOR = "\n"
"""What follows a paragraph's title in its document text."""


def _pairs(value: Any, first: str, second: str, where: str) -> list[tuple[Any, Any]]:
    """``[[a, b], ...]`` (HotpotQA's JSON) or ``{first: [a, ...], second: [b, ...]}`` (the hub's rows) as pairs."""
    if isinstance(value, Mapping):
        if first not in value or second not in value or len(value[first]) != len(value[second]):
            raise InputError(f"{where}: expected {{{first!r}: [...], {second!r}: [...]}} of equal lengths")
        return list(zip(value[first], value[second], strict=True))
    if isinstance(value, Sequence) and not isinstance(value, str) and all(
        isinstance(p, Sequence) and not isinstance(p, str) and len(p) == 2 for p in value
    ):
        return [(p[0], p[1]) for p in value]
    raise InputError(f"{where}: expected a list of [{first}, {second}] pairs or a {{{first}, {second}}} mapping")


def _is_str_list(value: Any) -> bool:
    """Whether ``value`` is a list (or tuple) of strings."""
    return isinstance(value, Sequence) and not isinstance(value, str) and all(isinstance(s, str) for s in value)


def hotpot_record(example: Mapping[str, Any]) -> dict[str, Any]:
    """One HotpotQA example (either layout) as a record for :func:`hotpot_tasks`.

    Returns:
        ``id``, ``question``, ``answers`` (``[answer]``, as SQuAD records hold them), ``documents`` (titled
        paragraphs), ``titles``, ``sources`` (one ``(start, end)`` span per non-blank HotpotQA sentence, stripped of
        surrounding whitespace, in the documents joined by ``DEFAULT_SEPARATOR``), ``source_keys`` (the
        ``(title, sentence_index)`` of each source), ``supporting_facts`` (as given) and ``supporting_sources``
        (sorted source indices of the supporting facts; a fact naming a sentence that is absent or blank, which a
        few HotpotQA examples hold, has none).

    Raises:
        InputError: a field is missing or malformed; the message names the example.
    """
    if not isinstance(example, Mapping):
        raise InputError(f"example: expected a mapping (one HotpotQA example), got {type(example).__name__}")
    qid = example.get("_id", example.get("id"))
    where = f"HotpotQA example {qid!r}"
    missing = [k for k in ("question", "answer", "context", "supporting_facts") if k not in example]
    if qid is None or missing:
        raise InputError(f"{where}: missing field(s) {(['_id or id'] if qid is None else []) + missing}")
    paragraphs = _pairs(example["context"], "title", "sentences", f"{where}: context")
    if not paragraphs:
        raise InputError(f"{where}: context holds no paragraph")
    documents: list[str] = []
    local: list[tuple[int, int, int, str, int]] = []  # document, start, end (in the document), title, sentence index
    for d, (title, sentences) in enumerate(paragraphs):
        if not isinstance(title, str) or not _is_str_list(sentences):
            raise InputError(f"{where}: context[{d}] must be a title and a list of sentence strings")
        doc = title + TITLE_SEPARATOR
        for k, sentence in enumerate(sentences):
            stripped = sentence.strip()
            if stripped:
                start = len(doc) + len(sentence) - len(sentence.lstrip())
                local.append((d, start, start + len(stripped), title, k))
            doc += sentence
        documents.append(doc)
    try:
        _, doc_spans = join_documents(documents, DEFAULT_SEPARATOR)
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from None
    sources: list[Span] = [(doc_spans[d][0] + a, doc_spans[d][0] + b) for d, a, b, _, _ in local]
    keys = [(title, k) for *_, title, k in local]
    index = {key: i for i, key in enumerate(keys)}
    facts = _pairs(example["supporting_facts"], "title", "sent_id", f"{where}: supporting_facts")
    if not all(isinstance(t, str) and _is_int(k) for t, k in facts):
        raise InputError(f"{where}: supporting_facts must pair a title with an integer sentence index")
    facts = [(t, int(k)) for t, k in facts]
    supporting = sorted({index[f] for f in facts if f in index})
    return {"id": qid, "question": example["question"], "answers": [example["answer"]], "documents": documents,
            "titles": [t for t, _ in paragraphs], "sources": sources, "source_keys": keys,
            "supporting_facts": facts, "supporting_sources": supporting}


def hotpot_records(source: str | Path | Iterable[Mapping[str, Any]], *,
                   cache_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Records (see :func:`hotpot_record`) from a local HotpotQA JSON file, the hub name ``"hotpotqa/hotpot_qa"``
    (``"hotpotqa/hotpot_qa:train"`` for another split; needs ``datasets`` and the hub, or a cached copy), or examples
    already loaded (a list of dicts or a ``datasets.Dataset``). File / row order is kept.

    Raises:
        InputError: the file is absent or not a list of HotpotQA examples. HubDatasetError: the hub name could not be
            loaded (the message names the local alternative).
    """
    from at2_lens.tasks.hub import load_hub_rows, parse_hub_name

    hub = parse_hub_name(source, "hotpot", "source")
    if hub is not None:
        examples: Iterable[Mapping[str, Any]] = load_hub_rows(*hub, cache_dir=cache_dir)
    elif isinstance(source, str | Path):
        path = Path(source)
        if not path.is_file():
            raise InputError(f"source: HotpotQA file {path} does not exist (or give 'hotpotqa/hotpot_qa' for the hub)")
        try:
            examples = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise InputError(f"source: {path} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
        if not isinstance(examples, list):
            raise InputError(f"source: {path} must hold a JSON list of HotpotQA examples")
    else:
        examples = source
    records = [hotpot_record(e) for e in examples]
    if not records:
        raise InputError("source: holds no HotpotQA example")
    return records


def hotpot_task(record: Mapping[str, Any], sources: str = "sentence") -> ContextTask:
    """The task of one record: its documents as context, its question as query, no response. ``sources="sentence"``
    means HotpotQA's own sentences (the record's spans); another granularity name is applied to the documents."""
    spans = record["sources"] if sources == "sentence" else sources
    return ContextTask(context=record["documents"], query=record["question"], sources=spans)


def hotpot_tasks(
    source: str | Path | Iterable[Mapping[str, Any]],
    *,
    limit: int | None = None,
    seed: int = 0,
    sources: str = "sentence",
    cache_dir: str | Path | None = None,
) -> list[ContextTask]:
    """Context-attribution tasks from HotpotQA (a file, the hub name or examples, as :func:`hotpot_records` takes
    them), shuffled deterministically by ``seed``, the first ``limit`` kept (None: all). The model's own answer becomes
    the target; the gold stays on the records."""
    limit = check_optional_int("limit", limit)
    records = hotpot_records(source, cache_dir=cache_dir)
    random.Random(seed).shuffle(records)
    return [hotpot_task(r, sources) for r in records[:limit]]


__all__ = ["TITLE_SEPARATOR", "hotpot_record", "hotpot_records", "hotpot_task", "hotpot_tasks"]
