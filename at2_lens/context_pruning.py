"""Context pruning, the AT2 paper's application: keep only the highest-scoring sources of a context and re-ask.

A long context distracts a small model; an attribution that ranks the sources the model relies on lets a user drop
the rest. ``top_k_mask`` turns scores into a keep-mask, ``pruned_context`` cuts the other sources' characters out
of the context (exactly the text that ``remove``-mode ablation feeds the model), and ``prune_context`` returns a new
``ContextTask`` over the pruned text, ready for another ``attribute`` or generation.
"""

from __future__ import annotations

import dataclasses

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from at2_lens._validate import check_int
from at2_lens.errors import InputError
from at2_lens.ranking import top_k
from at2_lens.results import SourceAttribution
from at2_lens.tasks import ContextTask, TokenizedTask
from at2_lens.tasks.spans import cut_spans


def top_k_mask(scores: Float[Tensor, " n_sources"], k: int) -> Bool[Tensor, " n_sources"]:
    """Keep-mask of the ``k`` highest scores (:func:`at2_lens.ranking.rank`: ties go to the earlier source)."""
    if scores.ndim != 1 or scores.numel() == 0:
        raise InputError(f"scores: expected a non-empty 1-D tensor, got shape {tuple(scores.shape)}")
    if not torch.isfinite(scores).all():
        raise InputError("scores: contain NaN or inf; cannot rank sources")
    check_int("k", k, maximum=scores.numel())  # at most the number of sources
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    keep[top_k(scores, k)] = True
    return keep


def pruned_context(task: TokenizedTask, keep: Bool[Tensor, " n_sources"]) -> str:
    """``task.context`` with the characters of every source not in ``keep`` cut out (text between sources stays)."""
    if keep.shape != (task.n_sources,):
        raise InputError(f"keep: expected {task.n_sources} entries (one per source), got {tuple(keep.shape)}")
    return cut_spans(task.context, task.source_spans, keep.tolist())


def prune_context(task: ContextTask, result: SourceAttribution, k: int) -> ContextTask:
    """A copy of ``task`` whose context holds only the ``k`` top-scored sources of ``result`` (an attribution of
    that task), with no response, so the model answers again; sources stay at the task's granularity."""
    tokenized = result.task
    if not isinstance(tokenized, TokenizedTask):
        raise InputError("result: expected an attribution that holds its tokenized task (result.task)")
    if not isinstance(task, ContextTask):
        raise InputError(f"task: expected a ContextTask, got {type(task).__name__}")
    text = pruned_context(tokenized, top_k_mask(result.scores, k))
    sources = task.sources if isinstance(task.sources, str) else "sentence"
    return dataclasses.replace(task, context=text, response=None, target=None, sources=sources)
