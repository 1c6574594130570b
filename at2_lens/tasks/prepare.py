"""Task preparation for a model: check tasks before any model work, tokenize them, generate missing responses.

Every method's ``attribute`` and every runner (``evaluate``, ``collect``) goes through :func:`prepare_task`, so a
``target`` means the same thing everywhere and bad input is refused before the first forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from at2_lens._defaults import DEFAULT_MAX_NEW_TOKENS
from at2_lens._validate import check_int
from at2_lens.errors import InputError
from at2_lens.tasks.context import ContextTask, TargetSpan, TokenizedTask, as_target_span

if TYPE_CHECKING:
    from at2_lens.backends import Backend


def prepare_task(
    backend: Backend,
    task: ContextTask | TokenizedTask,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    target: TargetSpan | Sequence[int] | None = None,
) -> TokenizedTask:
    """Tokenize a task for ``backend``'s model, generating the response greedily when the task has none.

    ``target`` (a ``TargetSpan``, or a ``(start, end)`` character range of the response) overrides the task's own.
    Everything that can be checked without the model (the target's form, the generation budget, the prompt's
    length and token ids) is checked before any generation or forward pass.
    """
    return _prepare(backend, task, max_new_tokens, target, check=True)[0]


def prepare_task_unchecked(
    backend: Backend,
    task: ContextTask | TokenizedTask,
    max_new_tokens: int = 64,
    target: TargetSpan | Sequence[int] | None = None,
) -> tuple[TokenizedTask, bool]:
    """``prepare_task`` without the uncached checking pass after generation, for a caller whose own forward pass
    over the whole prompt + response can serve as that check (AT2's feature pass).

    Returns the task and whether its response still needs checking: True only when the response was generated here
    with the KV cache (see ``Backend.generate_greedy_unchecked``). The caller must then pass the argmax of its pass
    at the rows producing the response to ``backend.confirm_greedy``, and on failure call ``prepare_task`` again
    (which then generates without the cache).
    """
    return _prepare(backend, task, max_new_tokens, target, check=False)


def _prepare(
    backend: Backend,
    task: ContextTask | TokenizedTask,
    max_new_tokens: int,
    target: TargetSpan | Sequence[int] | None,
    *,
    check: bool,
) -> tuple[TokenizedTask, bool]:
    check_int("max_new_tokens", max_new_tokens)
    span = as_target_span(target, "char")
    if span is not None and span.unit == "token" and _needs_generation(task) and span.end > max_new_tokens:
        raise InputError(
            f"target: token span ({span.start}, {span.end}) cannot lie inside a response of at most "
            f"max_new_tokens={max_new_tokens} tokens"
        )
    tokenized, unchecked = _tokenized(backend, task, max_new_tokens, check=check)
    if span is None:
        return tokenized, unchecked
    if span.unit == "char":
        return tokenized.with_target(char_range=(span.start, span.end)), unchecked
    return tokenized.with_target(token_range=(span.start, span.end)), unchecked


def _needs_generation(task: object) -> bool:
    return isinstance(task, ContextTask) and task.response is None


def _check_task(backend: Backend, task: object, name: str) -> None:
    """The checks of a task that need neither the tokenizer nor the model: a ``TokenizedTask`` has a response and
    valid token ids; anything else must be a ``ContextTask``. Errors name ``name``."""
    if isinstance(task, TokenizedTask):
        if task.response is None:
            raise InputError(f"{name}: the TokenizedTask has no response; attach one with with_response()")
        backend.check_tokens(task.input_ids, name=f"{name}.input_ids")
    elif not isinstance(task, ContextTask):
        raise InputError(f"{name}: expected a ContextTask or TokenizedTask, got {type(task).__name__}")


def check_tasks(backend: Backend, tasks: Sequence[object], name: str = "tasks") -> None:
    """Validate every task against ``backend``'s model before any model work: each is a ``ContextTask`` whose
    prompt (and response, when given) tokenizes within the context window, or a ``TokenizedTask`` with a response
    and valid token ids. Tokenizing costs far less than one forward pass; errors name the task's index."""
    if isinstance(tasks, str | bytes | ContextTask | TokenizedTask) or not isinstance(tasks, Sequence):
        raise InputError(f"{name}: expected a sequence of ContextTask or TokenizedTask, got {type(tasks).__name__}")
    if not tasks:
        raise InputError(f"{name}: expected at least one task")
    for i, task in enumerate(tasks):
        _check_task(backend, task, f"{name}[{i}]")
        if isinstance(task, ContextTask):
            try:
                task.tokenize(backend.tokenizer, max_length=backend.n_ctx)
            except InputError as exc:
                raise InputError(f"{name}[{i}]: {exc}") from None


def _tokenized(
    backend: Backend, task: ContextTask | TokenizedTask, max_new_tokens: int, *, check: bool = True
) -> tuple[TokenizedTask, bool]:
    """The task tokenized, with its response generated greedily when it has none, and whether that response still
    needs the greedy check (only with ``check=False``)."""
    _check_task(backend, task, "inputs")
    if isinstance(task, TokenizedTask):
        return task, False
    tok = backend.tokenizer
    if task.response is not None:
        return task.tokenize(tok, max_length=backend.n_ctx), False
    prompt = task.tokenize(tok, max_length=backend.n_ctx)
    if check:
        new_ids, unchecked = backend.generate_greedy(prompt.input_ids, max_new_tokens=max_new_tokens), False
    else:
        new_ids, checked = backend.generate_greedy_unchecked(prompt.input_ids, max_new_tokens=max_new_tokens)
        unchecked = not checked
    if len(new_ids) == 0:
        raise InputError("inputs: the model produced an empty response; give a response or another prompt")
    tokenized = prompt.with_response(tok, new_ids.tolist(), target=task.target, max_length=backend.n_ctx)
    return tokenized, unchecked


__all__ = ["check_tasks", "prepare_task", "prepare_task_unchecked"]
