"""Context pruning, the AT2 paper's application: keep only the highest-scoring sources of a context and re-ask.

A long context distracts a small model; an attribution that ranks the sources the model relies on lets a user drop
the rest. Two keep rules turn scores into a keep-mask: ``top_k_mask`` (the ``k`` best sources) and ``mass_mask``
(the fewest best sources holding a share of the positive score mass, so the number kept follows how concentrated
the attribution is). ``pruned_context`` cuts the other sources' characters out of the context (exactly the text
that ``remove``-mode ablation feeds the model), and ``prune`` returns a :class:`PrunedContext`: the new
``ContextTask`` over the pruned text, ready for another ``attribute`` or generation, with what was kept and removed.
"""

from __future__ import annotations

import dataclasses

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from at2_lens._validate import check_fraction, check_int
from at2_lens.errors import InputError
from at2_lens.ranking import rank, top_k
from at2_lens.results import SourceAttribution
from at2_lens.tasks import ContextTask, TokenizedTask
from at2_lens.tasks.spans import cut_spans

__all__ = ["PrunedContext", "mass_mask", "prune", "prune_context", "pruned_context", "top_k_mask"]


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
