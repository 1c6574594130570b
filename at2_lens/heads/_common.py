"""What the head finders share: tasks prepared once, the task's query-token range, and one forward pass that reads
only some rows of each layer's attention (never a ``[layer, head, N, N]`` cache)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from at2_lens.backends import Backend, get_backend
from at2_lens.errors import InputError, ModelNotSupportedError
from at2_lens.interventions import read_pattern_rows
from at2_lens.tasks import ContextTask, TokenizedTask, check_tasks, prepare_task
from at2_lens.tasks.needle import NeedleTask
from at2_lens.tasks.spans import char_range_to_tokens

AnyTask = ContextTask | TokenizedTask | NeedleTask


def unwrap(tasks: Sequence[Any], name: str = "tasks") -> tuple[list[ContextTask | TokenizedTask], list[int | None]]:
    """The tasks without their ``NeedleTask`` wrappers, and each task's needle source index (None for others)."""
    if isinstance(tasks, str | bytes | ContextTask | TokenizedTask | NeedleTask) or not isinstance(tasks, Sequence):
        raise InputError(f"{name}: expected a sequence of ContextTask, TokenizedTask or NeedleTask, got "
                         f"{type(tasks).__name__}")
    plain = [t.task if isinstance(t, NeedleTask) else t for t in tasks]
    needles = [t.needle_index if isinstance(t, NeedleTask) else None for t in tasks]
    return plain, needles


def decoder_backend(model: Any) -> Backend:
    """The model's backend; a head finder on a model whose attention cannot be read, or an encoder, is refused."""
    backend = model if isinstance(model, Backend) else get_backend(model)
    if not backend.is_causal:
        raise InputError("model: the decoder head finders need a causal (decoder) model")
    _ = backend.attention_access  # raises, with the reason, where attention cannot be read
    return backend


def prepare_all(backend: Backend, tasks: Sequence[Any], max_new_tokens: int, name: str = "tasks"
                ) -> tuple[list[TokenizedTask], list[int | None]]:
    """Every task checked (before any model work), then tokenized, a missing response generated greedily."""
    plain, needles = unwrap(tasks, name)
    check_tasks(backend, plain, name)
    prepared = [prepare_task(backend, t, max_new_tokens=max_new_tokens) for t in plain]
    for i, t in enumerate(prepared):
        if t.target_token_range is None or t.target_token_range[0] < 1:
            raise InputError(f"{name}[{i}]: has no target after the first token")
    return prepared, needles


def query_token_range(task: TokenizedTask) -> tuple[int, int]:
    """Token range of the query text in the prompt (its last occurrence after the context)."""
    if not task.query:
        raise InputError("tasks: a task without its query text (TokenizedTask.from_tokens) has no query tokens")
    after = task.context_start + len(task.context)
    at = task.prompt.rfind(task.query)
    if at < after:
        raise InputError(f"tasks: the query {task.query[:40]!r} is not found after the context in the prompt")
    rng = char_range_to_tokens(task.offsets[: task.prompt_len], (at, at + len(task.query)))
    if rng is None:
        raise InputError(f"tasks: the query {task.query[:40]!r} maps to no token")
    return rng


@torch.no_grad()
def pattern_rows_pass(
    backend: Backend, input_ids: Tensor, rows: Tensor | slice, reduce: Callable[[int, Tensor], Tensor],
) -> tuple[list[Tensor], Tensor]:
    """One forward pass reading each layer's attention at ``rows`` only: ``reduce(layer, pattern[head, row, key])``
    per layer, and the logits ``[pos, vocab]``."""
    out: dict[int, Tensor] = {}

    def sink_for(layer: int) -> Callable[[Tensor], None]:
        def sink(p: Tensor) -> None:
            out[layer] = reduce(layer, p[0].float()).cpu()

        return sink

    hooks = [(backend.pattern_hook(layer), read_pattern_rows(rows, sink_for(layer)))
             for layer in range(backend.n_layers)]
    logits = backend.run(input_ids[None], hooks)[0]
    if len(out) != backend.n_layers:
        raise ModelNotSupportedError(f"{backend.describe()}: hook_pattern fired on {len(out)} of {backend.n_layers} "
                                     "layers")
    return [out[layer] for layer in range(backend.n_layers)], logits
