"""Text-classifier inputs, checked and batched once for every caller (the classifier, head importance, triggers).

``check_texts_labels`` refuses bad texts or labels before any model work; ``length_batches`` groups texts of
similar length (less padding, deterministic); ``tokenize_texts`` pads and truncates a batch. Batch sizes are
checked with ``at2_lens._validate.check_int``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jaxtyping import Int
from torch import Tensor

from at2_lens.errors import InputError


def check_texts(texts: object) -> list[str]:
    """A non-empty list of strings."""
    if isinstance(texts, str) or not isinstance(texts, Sequence) or not texts:
        raise InputError(f"texts: expected a non-empty list of strings, got {type(texts).__name__}")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise InputError(f"texts: expected strings, item {bad[0]} is {type(texts[bad[0]]).__name__}")
    return list(texts)


def check_labels(labels: object, n: int) -> list[int]:
    """``n`` class indices (a sequence or a tensor)."""
    if isinstance(labels, Tensor):
        labels = labels.reshape(-1).tolist()
    if isinstance(labels, str) or not isinstance(labels, Sequence) or len(labels) != n:
        raise InputError(f"labels: expected a sequence of {n} class indices")
    return [int(y) for y in labels]


def check_texts_labels(texts: object, labels: object, *, need_labels: bool) -> tuple[list[str], list[int] | None]:
    """Texts and their gold labels (None allowed unless ``need_labels``)."""
    texts = check_texts(texts)
    if labels is None:
        if need_labels:
            raise InputError("labels: this method needs the gold labels")
        return texts, None
    return texts, check_labels(labels, len(texts))


def length_batches(texts: Sequence[str], batch_size: int) -> list[list[int]]:
    """Indices of ``texts`` in batches of similar length (less padding); deterministic (stable sort)."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def tokenize_texts(
    tokenizer: Any, texts: Sequence[str], max_length: int
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """``(tokens, attention_mask)`` for ``texts``, padded to the longest and truncated to ``max_length``."""
    enc = tokenizer(check_texts(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return enc["input_ids"].long(), enc["attention_mask"].long()


__all__ = ["check_labels", "check_texts", "check_texts_labels", "length_batches", "tokenize_texts"]
