"""Needle-in-a-haystack tasks: a fact hidden among real sentences, and a question that asks for it.

The haystack is ``n_sentences`` sentences drawn from the shipped SQuAD paragraphs of one split of
:mod:`at2_lens.evaluation.squad` (``split="train"`` for finding heads, ``"held_out"`` for checking them, so the two
share no text); the needle ``"The secret code of {key} is {code}."`` (a first name, a four-digit number) is inserted
as a sentence of its own at a depth that cycles through ``depths``, and the query is ``"What is the secret code of
{key}? Answer with the code only."``. Every sentence is one source (explicit character spans, so the needle is exactly
source ``needle_index``). The response is the gold answer ``"The secret code of {key} is {code}."`` (SmolLM2's own
phrasing of it) and the target is the code, so a task's answer log-probability is that of the gold code given the
prompt and the response's first words. Deterministic in ``seed``.

SmolLM2-135M-Instruct answers these (greedy answer holding the code) in about 9 of 10 tasks with 10 haystack
sentences; the format was chosen on training-split tasks (a question without "Answer with the code only." or a word as
the code fared far worse). :func:`needle_success_rate` measures it for any model.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from at2_lens._validate import check_choice, check_int
from at2_lens.data import SQUAD_V2_DEV_SUBSET
from at2_lens.errors import InputError
from at2_lens.tasks.context import ContextTask

Split = Literal["train", "held_out"]
NEEDLE_TEMPLATE = "The secret code of {key} is {code}."
QUERY_TEMPLATE = "What is the secret code of {key}? Answer with the code only."
KEYS: tuple[str, ...] = (
    "Alice", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ingrid", "Jonas", "Kamala", "Lars",
    "Mirela", "Nadia", "Oskar", "Priya", "Quentin", "Rosa", "Stefan", "Tomas", "Ursula", "Viktor", "Wanda", "Yusuf",
)
"""First names used as the needle's key."""
DEFAULT_DEPTHS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class NeedleTask:
    """One needle task: the ``ContextTask`` and where its needle is.

    Attributes:
        task: context (haystack with the needle), query, gold response and the code as target.
        key, code: the needle's key (a first name) and the code (four digits, the answer).
        needle_index: the needle's source index (every sentence is a source).
        depth: the depth asked for (0 = first sentence, 1 = last); ``needle_index = round(depth * n_sentences)``.
        needle_span: the needle's ``(start, end)`` characters in the context.
    """

    task: ContextTask
    key: str
    code: str
    needle_index: int
    depth: float
    needle_span: tuple[int, int]

    @property
    def n_sources(self) -> int:
        return len(self.task.sources)


def haystack_sentences(split: Split = "train", path: str | Path = SQUAD_V2_DEV_SUBSET) -> list[str]:
    """The sentences of the split's SQuAD paragraphs (one paragraph per question, as the SQuAD suites), in file
    order, without duplicates or sentences that mention a secret code."""
    from at2_lens.evaluation.squad import squad_split_records
    from at2_lens.tasks.sources import split_sentences

    check_choice("split", split, ("train", "held_out"))
    train, held = squad_split_records(path)
    out: list[str] = []
    for r in train if split == "train" else held:
        for a, b in split_sentences(r["context"]):
            s = r["context"][a:b]
            if 20 <= len(s) <= 400 and "secret" not in s.lower():
                out.append(s)
    return list(dict.fromkeys(out))


def needle_tasks(
    n: int,
    *,
    seed: int = 0,
    split: Split = "train",
    n_sentences: int = 10,
    depths: Sequence[float] = DEFAULT_DEPTHS,
    path: str | Path = SQUAD_V2_DEV_SUBSET,
) -> list[NeedleTask]:
    """``n`` needle tasks (see the module docstring), deterministic in ``seed``.

    Args:
        n: number of tasks.
        seed: seeds the haystack sentences, keys and codes.
        split: the SQuAD split whose paragraphs give the haystack (``"train"`` or ``"held_out"``).
        n_sentences: haystack sentences per task (the needle makes one more source).
        depths: fractions in [0, 1] cycled over the tasks: task ``i``'s needle becomes source
            ``round(depths[i % len(depths)] * n_sentences)``.
        path: the SQuAD file (default: the shipped subset).
    """
    n = check_int("n", n)
    n_sentences = check_int("n_sentences", n_sentences)
    if isinstance(depths, str) or not isinstance(depths, Sequence) or not depths:
        raise InputError(f"depths: expected a non-empty sequence of fractions in [0, 1], got {depths!r}")
    if not all(isinstance(d, int | float) and not isinstance(d, bool) and 0.0 <= d <= 1.0 for d in depths):
        raise InputError(f"depths: expected fractions in [0, 1], got {list(depths)!r}")
    pool = haystack_sentences(split, path)
    if len(pool) < n_sentences:
        raise InputError(f"n_sentences: the {split} split has {len(pool)} usable sentences, got {n_sentences}")
    rng = random.Random(f"needle:{seed}:{split}")
    out = []
    for i in range(n):
        hay = rng.sample(pool, n_sentences)
        key = rng.choice(KEYS)
        code = str(rng.randrange(1000, 10000))
        depth = float(depths[i % len(depths)])
        at = round(depth * n_sentences)
        needle = NEEDLE_TEMPLATE.format(key=key, code=code)
        sentences = [*hay[:at], needle, *hay[at:]]
        spans, pos = [], 0
        for s in sentences:
            spans.append((pos, pos + len(s)))
            pos += len(s) + 1
        answer = NEEDLE_TEMPLATE.format(key=key, code=code)
        c0 = answer.rindex(code)
        task = ContextTask(context=" ".join(sentences), query=QUERY_TEMPLATE.format(key=key), response=answer,
                           sources=spans, target=(c0, c0 + len(code)))
        out.append(NeedleTask(task, key, code, at, depth, spans[at]))
    return out


def needle_success_rate(model: Any, tasks: Sequence[NeedleTask], *, max_new_tokens: int = 16) -> float:
    """The share of ``tasks`` whose greedy answer (generated without the gold response) holds the code."""
    from at2_lens.backends import get_backend
    from at2_lens.tasks.prepare import prepare_task

    if not tasks or not all(isinstance(t, NeedleTask) for t in tasks):
        raise InputError("tasks: expected a non-empty sequence of NeedleTask")
    backend = get_backend(model)
    hits = 0
    for t in tasks:
        bare = ContextTask(context=t.task.context, query=t.task.query, sources=t.task.sources)
        answer = prepare_task(backend, bare, max_new_tokens=max_new_tokens).response or ""
        hits += t.code in answer
    return hits / len(tasks)


__all__ = ["DEFAULT_DEPTHS", "KEYS", "NEEDLE_TEMPLATE", "QUERY_TEMPLATE", "NeedleTask", "haystack_sentences",
           "needle_success_rate", "needle_tasks"]
