"""Context pruning, the AT2 paper's application: keep only the highest-scoring sources of a context and re-ask.

A long context distracts a small model; an attribution that ranks the sources the model relies on lets a user drop
the rest. Two keep rules turn scores into a keep-mask: ``top_k_mask`` (the ``k`` best sources) and ``mass_mask``
(the fewest best sources holding a share of the positive score mass, so the number kept follows how concentrated
the attribution is). ``pruned_context`` cuts the other sources' characters out of the context (exactly the text
that ``remove``-mode ablation feeds the model), and ``prune`` returns a :class:`PrunedContext`: the new
``ContextTask`` over the pruned text, ready for another ``attribute`` or generation, with what was kept and removed.
``prune_and_reanswer`` does the whole round trip (answer, attribute, prune, answer again) and returns both answers
as a :class:`Reanswer`; ``at2-lens prune`` is it on the command line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from at2_lens._defaults import DEFAULT_MASS, DEFAULT_MAX_NEW_TOKENS
from at2_lens._validate import check_fraction, check_int
from at2_lens.errors import InputError
from at2_lens.ranking import rank, top_k
from at2_lens.results import SourceAttribution
from at2_lens.tasks import ContextTask, TokenizedTask, prepare_task
from at2_lens.tasks.spans import cut_spans

__all__ = ["DEFAULT_MASS", "PrunedContext", "Reanswer", "mass_mask", "prune", "prune_and_reanswer", "prune_context",
           "pruned_context", "top_k_mask"]

# DEFAULT_MASS (the mass share kept when no rule is given) is defined in at2_lens/_defaults.py, a module light enough
# for ``at2-lens prune --help``, with the training-task measurement that chose it.


def _check_scores(scores: Tensor) -> None:
    if not isinstance(scores, Tensor) or scores.ndim != 1 or scores.numel() == 0:
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise InputError(f"scores: expected a non-empty 1-D tensor, got {shape}")
    if not torch.isfinite(scores).all():
        raise InputError("scores: contain NaN or inf; cannot rank sources")


def top_k_mask(scores: Float[Tensor, " n_sources"], k: int) -> Bool[Tensor, " n_sources"]:
    """Keep-mask of the ``k`` highest scores (:func:`at2_lens.ranking.rank`: ties go to the earlier source)."""
    _check_scores(scores)
    check_int("k", k, maximum=scores.numel())  # at most the number of sources
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    keep[top_k(scores, k)] = True
    return keep


def mass_mask(scores: Float[Tensor, " n_sources"], mass: float) -> Bool[Tensor, " n_sources"]:
    """Keep-mask of the fewest highest-scoring sources whose positive scores add up to at least ``mass`` (a share
    in (0, 1]) of all positive score mass; sources with a score <= 0 are never needed to reach it.

    At least one source is kept. When no score is positive the attribution names nothing the answer relies on, and
    every source is kept (nothing is pruned on no evidence).
    """
    _check_scores(scores)
    mass = check_fraction("mass", mass, closed=True)
    if mass == 0.0:
        raise InputError("mass: expected a share in (0, 1], got 0")
    positive = scores.detach().double().clamp(min=0.0)
    total = float(positive.sum())
    if total <= 0.0:
        return torch.ones(scores.numel(), dtype=torch.bool)
    order = rank(scores)
    cumulative = positive[order].cumsum(0) / total
    # the first rank at which the cumulative share reaches `mass` (a relative slack absorbs rounding at mass=1)
    n_keep = int((cumulative < mass - 1e-12).sum()) + 1
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    keep[order[: min(n_keep, scores.numel())]] = True
    return keep


def pruned_context(task: TokenizedTask, keep: Bool[Tensor, " n_sources"]) -> str:
    """``task.context`` with the characters of every source not in ``keep`` cut out (text between sources stays)."""
    if keep.shape != (task.n_sources,):
        raise InputError(f"keep: expected {task.n_sources} entries (one per source), got {tuple(keep.shape)}")
    return cut_spans(task.context, task.source_spans, keep.tolist())


@dataclasses.dataclass(frozen=True)
class PrunedContext:
    """A context pruned by a keep rule.

    Attributes:
        task: a copy of the original task over the pruned text, with no response (so the model answers again).
        keep: the keep-mask over the original task's sources.
        kept / removed: the original source indices kept and removed, in context order.
        kept_texts / removed_texts: their texts.
        rule: ``"top_k"`` or ``"mass"``; ``value`` its parameter (``k`` or the mass share).
    """

    task: ContextTask
    keep: Bool[Tensor, " n_sources"]
    kept: tuple[int, ...]
    removed: tuple[int, ...]
    kept_texts: tuple[str, ...]
    removed_texts: tuple[str, ...]
    rule: str
    value: float

    @property
    def context(self) -> str:
        """The pruned context text."""
        text = self.task.context
        return text if isinstance(text, str) else "".join(text)

    @property
    def kept_fraction(self) -> float:
        """Share of the original sources kept."""
        return len(self.kept) / max(1, len(self.kept) + len(self.removed))


def prune(
    task: ContextTask, result: SourceAttribution, *, k: int | None = None, mass: float | None = None
) -> PrunedContext:
    """Prune ``task``'s context to the sources ``result`` (an attribution of that task) scores highest.

    Give exactly one rule: ``k`` keeps the ``k`` best sources (``top_k_mask``); ``mass`` keeps the fewest best
    sources holding that share of the positive score mass (``mass_mask``). Sources stay at the task's granularity.
    """
    tokenized = result.task
    if not isinstance(tokenized, TokenizedTask):
        raise InputError("result: expected an attribution that holds its tokenized task (result.task)")
    if not isinstance(task, ContextTask):
        raise InputError(f"task: expected a ContextTask, got {type(task).__name__}")
    if (k is None) == (mass is None):
        raise InputError(f"k / mass: expected exactly one of them, got k={k!r}, mass={mass!r}")
    if k is not None:
        keep, rule, value = top_k_mask(result.scores, k), "top_k", float(k)
    else:
        keep, rule, value = mass_mask(result.scores, mass), "mass", float(mass)  # type: ignore[arg-type]
    text = pruned_context(tokenized, keep)
    sources = task.sources if isinstance(task.sources, str) else "sentence"
    new_task = dataclasses.replace(task, context=text, response=None, target=None, sources=sources)
    flags = keep.tolist()
    kept = tuple(i for i, f in enumerate(flags) if f)
    removed = tuple(i for i, f in enumerate(flags) if not f)
    texts = tokenized.source_texts
    return PrunedContext(task=new_task, keep=keep, kept=kept, removed=removed,
                         kept_texts=tuple(texts[i] for i in kept), removed_texts=tuple(texts[i] for i in removed),
                         rule=rule, value=value)


def prune_context(task: ContextTask, result: SourceAttribution, k: int) -> ContextTask:
    """A copy of ``task`` whose context holds only the ``k`` top-scored sources of ``result`` (an attribution of
    that task), with no response, so the model answers again: ``prune(task, result, k=k).task``."""
    return prune(task, result, k=k).task


@dataclasses.dataclass(frozen=True)
class Reanswer:
    """What :func:`prune_and_reanswer` found.

    Attributes:
        attribution: the method's scores of the original sources for the old answer.
        pruned: the pruned context (its task, what was kept and removed).
        old_answer: the answer over the full context (the task's own response when it had one, else the model's
            greedy answer).
        new_answer: the model's greedy answer over the pruned context.
    """

    attribution: SourceAttribution
    pruned: PrunedContext
    old_answer: str
    new_answer: str

    def answer_scores(self, golds: Sequence[str]) -> dict[str, dict[str, float]]:
        """``{"old": scores, "new": scores}``, each ``{"exact_match", "f1", "contains"}`` against the gold answers
        (:func:`at2_lens.evaluation.answers.answer_scores`)."""
        from at2_lens.evaluation.answers import answer_scores

        return {"old": answer_scores(self.old_answer, golds), "new": answer_scores(self.new_answer, golds)}


def _check_rule(k: int | None, mass: float | None) -> tuple[int | None, float | None]:
    """Exactly one of ``k`` / ``mass`` (neither: ``mass=DEFAULT_MASS``), checked."""
    if k is not None and mass is not None:
        raise InputError(f"k / mass: expected at most one of them, got k={k!r}, mass={mass!r}")
    if k is not None:
        return check_int("k", k), None
    mass = DEFAULT_MASS if mass is None else check_fraction("mass", mass, closed=True)
    if mass == 0.0:
        raise InputError("mass: expected a share in (0, 1], got 0")
    return None, mass


def prune_and_reanswer(
    model: Any,
    task: ContextTask,
    method: str | Any = "at2",
    *,
    k: int | None = None,
    mass: float | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    progress: Callable[[str], None] | None = None,
) -> Reanswer:
    """Answer ``task`` over its whole context, attribute the answer, prune the context, and answer again.

    Args:
        model: the decoder that answers (both times).
        task: the question and its context; with a response, that response is the old answer.
        method: an attribution object of ``model`` (``attribute(task, max_new_tokens=...)``, e.g.
            ``AT2Attribution(model, estimator=...)``) or a method name of ``at2-lens evaluate`` (``"at2"``: AT2
            with the estimator shipped for the model; ``"at2_refined8"``, ``"avg_attention"``, ``"loo"``,
            ``"contextcite32"``, ...).
        k: keep the ``k`` highest-scoring sources (give ``k`` or ``mass``, not both; see :func:`prune`).
        mass: keep the fewest highest-scoring sources holding this share of the positive score mass; with neither
            rule, ``DEFAULT_MASS``.
        max_new_tokens: the generation budget of each answer.
        progress: called with a short line before each slow step (attributing, re-answering).

    Everything is checked before the first generation, ``k`` against the task's number of sources too.
    """
    from at2_lens.backends import get_backend

    k, mass = _check_rule(k, mass)
    check_int("max_new_tokens", max_new_tokens)
    if not isinstance(task, ContextTask):
        raise InputError(f"task: expected a ContextTask, got {type(task).__name__}")
    backend = get_backend(model)
    n_sources = task.tokenize(backend.tokenizer, max_length=backend.n_ctx).n_sources
    if k is not None and k > n_sources:
        raise InputError(f"k: expected at most {n_sources} (the task's number of sources), got {k}")
    if isinstance(method, str):
        from at2_lens.evaluation.methods import build_method

        try:
            method = build_method(model, method)[1]
        except InputError as exc:
            raise InputError(f"method: {str(exc).removeprefix('methods: ')}") from None
    elif not callable(getattr(method, "attribute", None)):
        raise InputError(f"method: expected a method name or an object with attribute(task), got "
                         f"{type(method).__name__}")
    elif getattr(method, "forward_func", model) is not model:
        raise InputError("method: attributes with another model than `model`; both answers must come from one model")
    log = progress if progress is not None else (lambda line: None)
    log(f"attributing the given answer to the {n_sources} sources" if task.response is not None else
        f"answering over all {n_sources} sources and attributing the answer")
    result = method.attribute(task, max_new_tokens=max_new_tokens)
    pruned = prune(task, result, k=k, mass=mass)
    log(f"answering again over the {len(pruned.kept)} kept of {n_sources} sources")
    new_answer = prepare_task(backend, pruned.task, max_new_tokens).response
    assert new_answer is not None  # prepare_task generated it
    return Reanswer(attribution=result, pruned=pruned, old_answer=result.response, new_answer=new_answer)
