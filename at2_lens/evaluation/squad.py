"""The SQuAD context-attribution tasks of the faithfulness benchmark and their deterministic train / held-out split.

Two suites share the split. ``squad_split``: one task per paragraph; ``multi_document_split``: the same questions
with their paragraph among distractor snippets from other articles of the same split (tasks the project generates).
One task per paragraph: the paragraph is the context (split into sentences), its first answerable question (in file
order) is the query, and the model's own greedy answer becomes the target (the task has no response, so it is
generated when the task is prepared). A paragraph is held out when ``int(sha256(question id), 16) % 5 == 0``
(about one in five), independent of file order, model and seed; the rest is the training split (for estimator
training: ``at2-lens collect`` on those tasks). Both splits keep file order.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from at2_lens.tasks import ContextTask
from at2_lens.tasks.loaders import multi_document_tasks, squad_records

HELD_OUT_MODULUS = 5


def is_held_out(question_id: str, modulus: int = HELD_OUT_MODULUS) -> bool:
    """Whether a task belongs to the held-out split: ``int(sha256(id), 16) % modulus == 0``."""
    return int(hashlib.sha256(question_id.encode("utf-8")).hexdigest(), 16) % modulus == 0


def squad_split_records(
    path: str | Path, *, modulus: int = HELD_OUT_MODULUS
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(train, held_out)`` SQuAD records (``id, title, context, question, answers``), one per paragraph: its first
    answerable question. The records behind ``squad_split``'s tasks, with the gold answers."""
    seen: set[str] = set()
    train: list[dict[str, Any]] = []
    held: list[dict[str, Any]] = []
    for r in squad_records(path):
        if r["context"] in seen:
            continue
        seen.add(r["context"])
        (held if is_held_out(r["id"], modulus) else train).append(r)
    return train, held


def squad_split(
    path: str | Path, *, sources: str = "sentence", modulus: int = HELD_OUT_MODULUS
) -> tuple[list[ContextTask], list[ContextTask]]:
    """``(train, held_out)`` tasks from a SQuAD-format file, one per paragraph (see the module docstring)."""
    train, held = squad_split_records(path, modulus=modulus)

    def task(r: dict[str, Any]) -> ContextTask:
        return ContextTask(context=r["context"], query=r["question"], sources=sources)

    return [task(r) for r in train], [task(r) for r in held]


def multi_document_split(
    path: str | Path, *, n_distractors: int = 2, seed: int = 0, modulus: int = HELD_OUT_MODULUS
) -> tuple[list[ContextTask], list[ContextTask]]:
    """``(train, held_out)`` multi-document tasks: each paragraph's question (as in ``squad_split``, same order)
    with its paragraph among ``n_distractors`` two-sentence snippets of other articles' paragraphs. Distractors come
    from the same split, so no held-out text appears in a training task or the reverse. Deterministic in ``seed``."""
    train, held = squad_split_records(path, modulus=modulus)

    def build(records: list[dict[str, Any]]) -> list[ContextTask]:
        if not records:
            return []
        return multi_document_tasks(records, len(records), n_distractors=n_distractors, seed=seed, cycle=True)

    return build(train), build(held)
