"""Answer quality as SQuAD scores it: exact match and token F1 against every gold answer, after SQuAD's normalisation.

The normalisation is the one of the official SQuAD evaluation script (lower case; punctuation, the articles
"a", "an", "the" and extra whitespace removed). A prediction is scored against each gold answer and keeps its best
score. An empty gold list is an unanswerable question: only an empty (normalised) prediction scores 1.
``contains_answer`` is the looser check earlier benchmarks used (a normalised gold answer appears inside the
normalised prediction), kept because a chat model's full-sentence answers never match exactly.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Sequence

from at2_lens.errors import InputError

__all__ = ["answer_scores", "contains_answer", "exact_match", "normalize_answer", "token_f1"]

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _check(prediction: str, golds: Sequence[str]) -> list[str]:
    if not isinstance(prediction, str):
        raise InputError(f"prediction: expected a str, got {type(prediction).__name__}")
    if isinstance(golds, str) or not isinstance(golds, Sequence) or not all(isinstance(g, str) for g in golds):
        raise InputError(f"golds: expected a list of str (every gold answer), got {type(golds).__name__}")
    return list(golds)


def _f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals a normalised gold answer, else 0.0."""
    golds = _check(prediction, golds)
    if not golds:
        return float(normalize_answer(prediction) == "")
    return float(any(normalize_answer(prediction) == normalize_answer(g) for g in golds))


def token_f1(prediction: str, golds: Sequence[str]) -> float:
    """The best token-overlap F1 (bag of normalised words) of the prediction against any gold answer."""
    golds = _check(prediction, golds)
    if not golds:
        return float(normalize_answer(prediction) == "")
    return max(_f1(prediction, g) for g in golds)


def contains_answer(prediction: str, golds: Sequence[str]) -> bool:
    """Whether some non-empty normalised gold answer appears inside the normalised prediction."""
    golds = _check(prediction, golds)
    pred = normalize_answer(prediction)
    return any(normalize_answer(g) and normalize_answer(g) in pred for g in golds)


def answer_scores(prediction: str, golds: Sequence[str]) -> dict[str, float]:
    """``{"exact_match", "f1", "contains"}`` of one prediction."""
    return {"exact_match": exact_match(prediction, golds), "f1": token_f1(prediction, golds),
            "contains": float(contains_answer(prediction, golds))}
