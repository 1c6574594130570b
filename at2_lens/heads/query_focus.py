"""Query-focused heads, after QRHead (Zhang et al. 2025, "Query-Focused Retrieval Heads Improve Long-Context
Reasoning and Re-ranking").

For each task and head ``(l, h)``: the attention mass from the query's tokens to the relevant context tokens,
``m[l, h] = mean_{q ∈ query} Σ_{k ∈ relevant} A^{l,h}[q, k]`` (the relevant tokens: the needle sentence of a
:class:`~at2_lens.tasks.needle.NeedleTask`, the sources named in ``relevant``, or else the whole context). With
``calibrate=True`` the same mass under a content-free query (``null_query``, default ``"N/A"``, same context and
prompt layout) is subtracted, removing what a head gives the context whatever is asked. The score is the mean over
tasks, ``[layer, head]``. Only the prompt is read (query rows come before any response), so no response is generated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from at2_lens.errors import InputError
from at2_lens.heads._common import decoder_backend, pattern_rows_pass, query_token_range, unwrap
from at2_lens.tasks import ContextTask, TokenizedTask, check_tasks


def _relevant_range(task: TokenizedTask, sources: Sequence[int] | None, name: str) -> torch.Tensor:
    """A boolean key mask ``[pos]`` over the relevant sources' tokens (all sources when ``sources`` is None)."""
    mask = torch.zeros(task.prompt_len, dtype=torch.bool)
    picked = range(task.n_sources) if sources is None else sources
    for s in picked:
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < task.n_sources:
            raise InputError(f"{name}: expected source indices in [0, {task.n_sources}), got {s!r}")
        a, b = task.source_token_ranges[s]
        mask[a:b] = True
    return mask


def _mass(backend: Any, task: TokenizedTask, keys: torch.Tensor) -> Tensor:
    q0, q1 = query_token_range(task)
    keys = keys.to(backend.device)
    per_layer, _ = pattern_rows_pass(backend, task.input_ids[: task.prompt_len], slice(q0, q1),
                                     lambda _, p: (p * keys).sum(dim=-1).mean(dim=-1))  # [head]
    return torch.stack(per_layer)


def query_focus_scores(
    model: Any,
    tasks: Sequence[Any],
    *,
    relevant: Sequence[Sequence[int] | None] | None = None,
    calibrate: bool = True,
    null_query: str = "N/A",
) -> Float[Tensor, "layer head"]:
    """Each head's query-focused context attention on ``tasks`` (see the module docstring), ``[layer, head]``.

    Args:
        model: a TransformerLens decoder (or its ``Backend``).
        tasks: ``ContextTask``, ``NeedleTask`` or ``TokenizedTask`` (the last only with ``calibrate=False``: its
            prompt cannot be re-rendered with another query).
        relevant: per task, the relevant source indices (None for a task: its needle, or the whole context).
        calibrate: subtract the mass under the content-free ``null_query`` (QRHead's calibration); scores can then be
            negative.
        null_query: the content-free query.

    One forward pass per task over the prompt (two with ``calibrate``), reading only the query rows.
    """
    if not isinstance(calibrate, bool):
        raise InputError(f"calibrate: expected True or False, got {calibrate!r}")
    if not isinstance(null_query, str) or not null_query.strip():
        raise InputError(f"null_query: expected a non-empty string, got {null_query!r}")
    backend = decoder_backend(model)
    plain, needles = unwrap(tasks)
    if relevant is not None and (isinstance(relevant, str) or len(relevant) != len(plain)):
        raise InputError(f"relevant: expected one entry (source indices or None) per task ({len(plain)}), got "
                         f"{relevant!r}")
    for i, t in enumerate(plain):
        if isinstance(t, ContextTask):
            check_tasks(backend, [dataclasses.replace(t, response=None, target=None)], f"tasks[{i}]")
        elif isinstance(t, TokenizedTask):
            backend.check_tokens(t.input_ids, name=f"tasks[{i}].input_ids")
        else:
            raise InputError(f"tasks[{i}]: expected a ContextTask, TokenizedTask or NeedleTask, got "
                             f"{type(t).__name__}")
    if calibrate and any(isinstance(t, TokenizedTask) for t in plain):
        raise InputError("tasks: calibrate=True re-renders each prompt with the null query, which needs ContextTask "
                         "or NeedleTask inputs; pass calibrate=False for TokenizedTask")
    tok = backend.tokenizer
    total = torch.zeros(backend.n_layers, backend.n_heads)
    for i, (t, needle) in enumerate(zip(plain, needles, strict=True)):
        chosen = relevant[i] if relevant is not None else None
        if chosen is None and needle is not None:
            chosen = [needle]
        if isinstance(t, ContextTask):
            tt = dataclasses.replace(t, response=None, target=None).tokenize(tok, max_length=backend.n_ctx)
        else:
            tt = t
        keys = _relevant_range(tt, chosen, f"relevant[{i}]")
        score = _mass(backend, tt, keys)
        if calibrate:
            assert isinstance(t, ContextTask)
            null = dataclasses.replace(t, query=null_query, response=None, target=None).tokenize(
                tok, max_length=backend.n_ctx)
            score = score - _mass(backend, null, _relevant_range(null, chosen, f"relevant[{i}]"))
        total += score
    return total / len(plain)


__all__ = ["query_focus_scores"]
