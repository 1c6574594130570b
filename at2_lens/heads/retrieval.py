"""Retrieval (copy-paste) heads, Wu et al. 2024 ("Retrieval Head Mechanistically Explains Long-Context Factuality").

A head *copies* a target token when, at the row that produces it, the head's most-attended key is a context token
(the needle, for a :class:`~at2_lens.tasks.needle.NeedleTask`) with the same token id. Only target tokens the model
itself would produce (its greedy next token at that row equals the token) and whose id occurs in the copy region are
counted. A head's retrieval score is its copies over the counted tokens, pooled over all tasks: ``[layer, head]`` in
``[0, 1]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from at2_lens._defaults import DEFAULT_MAX_NEW_TOKENS
from at2_lens._validate import check_int
from at2_lens.ablation.positions import query_rows
from at2_lens.errors import InputError
from at2_lens.heads._common import decoder_backend, pattern_rows_pass, prepare_all


def retrieval_scores(
    model: Any,
    tasks: Sequence[Any],
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    only_generated: bool = True,
    return_counts: bool = False,
) -> Float[Tensor, "layer head"] | tuple[Tensor, int]:
    """Each head's retrieval (copy-paste) score on ``tasks``, ``[layer, head]`` in ``[0, 1]``.

    Args:
        model: a TransformerLens decoder (or its ``Backend``).
        tasks: ``NeedleTask`` (the copy region is the needle sentence), or ``ContextTask`` / ``TokenizedTask``
            (the copy region is the whole context); the target is the task's (a needle task's: the code), a missing
            response is generated greedily.
        max_new_tokens: generation budget where a response is generated.
        only_generated: count only target tokens the model produces itself (its greedy token at the row); False
            counts every target token whose id occurs in the copy region.
        return_counts: also return the number of counted target tokens (the score's denominator).

    One forward pass per task reads only the target rows of each layer's attention. InputError when no target token
    in any task is a context token the model produces.
    """
    check_int("max_new_tokens", max_new_tokens)
    if not isinstance(only_generated, bool):
        raise InputError(f"only_generated: expected True or False, got {only_generated!r}")
    backend = decoder_backend(model)
    prepared, needles = prepare_all(backend, tasks, max_new_tokens)
    hits = torch.zeros(backend.n_layers, backend.n_heads)
    counted = 0
    for task, needle in zip(prepared, needles, strict=True):
        assert task.target_token_range is not None
        if needle is not None:
            r0, r1 = task.source_token_ranges[needle]
        else:
            r0, r1 = task.source_token_ranges[0][0], task.source_token_ranges[-1][1]
        t0, t1 = task.target_token_range
        rows = query_rows((t0, t1), True)
        ids = task.input_ids
        top, logits = pattern_rows_pass(backend, ids, rows, lambda _, p: p.argmax(dim=-1))  # [head, row] per layer
        greedy = logits[rows].argmax(dim=-1).cpu()
        region = set(ids[r0:r1].tolist())
        keep = [j for j in range(t1 - t0)
                if (not only_generated or int(greedy[j]) == int(ids[t0 + j])) and int(ids[t0 + j]) in region]
        if not keep:
            continue
        counted += len(keep)
        for layer, key in enumerate(top):  # key: [head, row]
            k = key[:, keep]
            wanted = ids[[t0 + j for j in keep]]
            copied = (k >= r0) & (k < r1) & (ids[k.clamp(max=len(ids) - 1)] == wanted[None, :])
            hits[layer] += copied.float().sum(dim=1)
    if counted == 0:
        raise InputError("tasks: no target token of any task is a context token the model produces; retrieval "
                         "scores need answers copied from the context (e.g. needle_tasks)")
    scores = hits / counted
    return (scores, counted) if return_counts else scores


__all__ = ["retrieval_scores"]
