"""Attention features from the user's own TransformerLens ``ActivationCache``: attribution with no forward pass.

When you already ran the model (``model.run_with_cache``) over prompt + response, the attention patterns AT2 and the
attention baselines read are in that cache. ``attribute(task, cache=cache)`` reads them there instead of running the
model; the scores equal a fresh run's (the same tensors go through the same reduction).

:func:`cache_filter` gives the ``names_filter`` that makes the smallest sufficient cache: every layer's
``hook_pattern`` (plus ``hook_v`` for value-weighted features), named by the backend (``backends/hook_names.py``).
:class:`CachedPatterns` wraps a cache with what cannot be read off it: the token ids it was run on (checked against
the task's), which batch row to use, and the ``pos_slice`` it was made with.

Everything is validated before any work, and every error names ``cache``: a cache for other tokens (another
length, or other ids when ``tokens`` is given), a missing layer, other head counts, a batch of several sequences
without ``batch_index``, or a ``pos_slice`` that dropped a row the target needs.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from at2_lens.backends import Backend, get_backend
from at2_lens.errors import InputError, ModelNotSupportedError

if TYPE_CHECKING:
    from at2_lens.ablation.features import FeatureOptions

_HINT = "make it with model.run_with_cache(tokens, names_filter=at2_lens.cache_filter(model))"


def cache_filter(model: Any, options: FeatureOptions | None = None) -> list[str]:
    """The ``names_filter`` for ``run_with_cache`` that caches just what attribution from a cache reads.

    Every layer's ``blocks.{l}.attn.hook_pattern`` (post-softmax attention ``[batch, head, query, key]``), and every
    layer's ``hook_v`` too when ``options`` (e.g. ``at2.estimator.feature_options``) weights attention by value
    norms. The names come from the model's backend, so they are the ones the live feature pass hooks::

        logits, cache = model.run_with_cache(tokens, names_filter=at2_lens.cache_filter(model))
        result = AT2Attribution(model).attribute(task, cache=cache)

    Memory: the patterns take ``layers × heads × pos²`` numbers per sequence. Both TransformerLens lines (3.9's
    ``HookedTransformer`` and ``TransformerBridge``, 4.x's bridge) accept ``run_with_cache(..., pos_slice=...)``,
    which keeps only some query rows of ``hook_pattern`` (``layers × heads × rows × pos``). Keep the rows that
    produce the target (for a decoder, target tokens ``[t0, t1)`` are produced by rows ``[t0 - 1, t1 - 1)``) and
    pass the same slice as ``CachedPatterns(cache, pos_slice=...)``: a ``(start, stop)`` pair, a ``slice`` or a list
    of row indices. A sliced cache cannot serve value-weighted features (``pos_slice`` cuts ``hook_v``'s keys too).

    Generation: on TransformerLens 4.x, ``TransformerBridge.generate(prompt, ..., return_cache=True,
    names_filter=at2_lens.cache_filter(model))`` returns ``(tokens, cache)`` for prompt + generated tokens (checked on
    4.3); attribute them with ``TokenizedTask.from_tokens(tokens[0], sources, (prompt_len, len), tokenizer=...)``.
    TransformerLens 3.9's ``generate`` has no ``return_cache``.
    """
    backend = get_backend(model)
    names = [backend.pattern_hook(layer) for layer in range(backend.n_layers)]
    if options is not None and options.value_weighted:
        names += [backend.v_hook(layer) for layer in range(backend.n_layers)]
    return names


@dataclass(frozen=True, eq=False)  # holds tensors: compared by identity
class CachedPatterns:
    """A TransformerLens ``ActivationCache`` (or any mapping from hook names to tensors) and how to read it.

    Pass it as ``attribute(task, cache=CachedPatterns(cache, ...))``; a bare cache means ``CachedPatterns(cache)``.

    Args:
        cache: the cache of a forward pass over exactly the task's tokens (prompt + response, no padding).
        tokens: the token ids the cache was made from (``[pos]`` or ``[batch, pos]``): checked to equal the task's.
            Without them only the sequence length is checked.
        batch_index: which sequence of a batched cache to use; needed when the cache holds more than one.
        pos_slice: the ``pos_slice`` given to ``run_with_cache`` (a ``(start, stop)`` pair, a ``slice`` or a list
            of query rows), when only some query rows of ``hook_pattern`` were cached.
    """

    cache: Any
    tokens: Tensor | Sequence[int] | None = None
    batch_index: int | None = None
    pos_slice: slice | Sequence[int] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.cache, CachedPatterns):
            raise InputError("cache: got a CachedPatterns inside a CachedPatterns; pass the ActivationCache")
        if not (hasattr(self.cache, "__getitem__") and hasattr(self.cache, "keys")):
            raise InputError(
                f"cache: expected a TransformerLens ActivationCache or a mapping from hook names to tensors, got "
                f"{type(self.cache).__name__}"
            )
        if self.batch_index is not None and (isinstance(self.batch_index, bool) or not _is_int(self.batch_index)):
            raise InputError(f"cache: batch_index must be an int or None, got {self.batch_index!r}")


def as_cached_patterns(cache: Any) -> CachedPatterns:
    """``cache`` as a :class:`CachedPatterns` (a bare cache is wrapped with no tokens, batch index or slice)."""
    return cache if isinstance(cache, CachedPatterns) else CachedPatterns(cache)


def check_cache_inputs(inputs: Any, cache: Any) -> None:
    """What ``attribute(inputs, cache=cache)`` checks first, before any work: ``cache`` is a cache (or a
    ``CachedPatterns``), and the task has a response (a cache cannot generate one)."""
    from at2_lens.tasks import ContextTask

    as_cached_patterns(cache)
    if isinstance(inputs, ContextTask) and inputs.response is None:
        raise InputError(
            "cache: attributing from a cache needs a task with a response (a cache cannot generate one); give the "
            "response that the cache's tokens end with, e.g. ContextTask(..., response=...)"
        )


def _is_int(x: Any) -> bool:
    try:
        operator.index(x)
    except TypeError:
        return False
    return True


def _kept_rows(pos_slice: Any, n: int) -> list[int]:
    """The absolute query rows a ``pos_slice`` keeps out of ``n``, in cache order."""
    if pos_slice is None:
        return list(range(n))
    if isinstance(pos_slice, tuple) and all(x is None or _is_int(x) for x in pos_slice) and len(pos_slice) <= 3:
        return list(range(n))[slice(*pos_slice)]  # TransformerLens reads a tuple as slice(*tuple)
    if isinstance(pos_slice, slice):
        return list(range(n))[pos_slice]
    if isinstance(pos_slice, Tensor):
        pos_slice = pos_slice.reshape(-1).tolist()
    if isinstance(pos_slice, Sequence) and not isinstance(pos_slice, str | bytes) and all(map(_is_int, pos_slice)):
        rows = [int(r) % n if -n <= int(r) < n else -1 for r in pos_slice]
        if -1 in rows:
            raise InputError(f"cache: pos_slice {list(pos_slice)} holds rows outside the {n} positions")
        return rows
    raise InputError(
        f"cache: pos_slice must be None, a (start, stop) pair, a slice or a list of row indices, got {pos_slice!r} "
        "(an int pos_slice drops the query axis; use [i] instead)"
    )


def _as_ids(tokens: Any) -> Tensor:
    if isinstance(tokens, Tensor):
        ids = tokens.detach().cpu()
    else:
        try:
            ids = torch.tensor(tokens)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise InputError(f"cache: tokens must be token ids, got {type(tokens).__name__}") from exc
    if ids.dim() not in (1, 2) or ids.dtype not in (torch.int64, torch.int32):
        raise InputError(f"cache: tokens must be integer ids of shape [pos] or [batch, pos], got {tuple(ids.shape)}")
    return ids.long()


@dataclass(frozen=True)
class LayerPatterns:
    """What a validated cache yields for one sequence: per layer, the attention of the needed query rows
    (``[head, row, key]``, rows in the order asked for) and, when asked, ``hook_v`` (``[key, kv_head, d_head]``)."""

    patterns: list[Tensor]
    values: list[Tensor] | None


def read_cached_patterns(
    model: Any, cache: Any, input_ids: Tensor, rows: slice, *, need_values: bool = False
) -> LayerPatterns:
    """Validate ``cache`` against the task's ``input_ids`` (``[pos]``) and return its ``rows`` of every layer.

    Nothing is computed until every layer is checked: its presence, shape (batch, heads, query rows, keys), the
    sequence length and, when the cache carries ``tokens``, the ids themselves. Every error names ``cache``.
    """
    spec = as_cached_patterns(cache)
    backend: Backend = get_backend(model)
    if not backend.probe.pattern_readable:
        raise ModelNotSupportedError(
            f"cache: {backend.describe()} never fires hook_pattern, so a cache holds no attention to attribute from"
        )
    ids = input_ids.reshape(-1).cpu()
    n = int(ids.shape[0])
    store = spec.cache
    batch = _check_tokens(spec, ids)
    kept = _kept_rows(spec.pos_slice, n)
    index = {r: i for i, r in enumerate(kept)}
    wanted = list(range(n))[rows]
    missing_rows = [r for r in wanted if r not in index]
    if missing_rows:
        raise InputError(
            f"cache: the target needs query rows {wanted[0]}..{wanted[-1]}, but its pos_slice keeps rows "
            f"{_preview_rows(kept)} (missing {_preview_rows(missing_rows)})"
        )
    if need_values and spec.pos_slice is not None:
        raise InputError("cache: value-weighted features need every key's hook_v, which a pos_slice cache cuts")
    names = [backend.pattern_hook(layer) for layer in range(backend.n_layers)]
    v_names = [backend.v_hook(layer) for layer in range(backend.n_layers)] if need_values else []
    absent = [name for name in names + v_names if not _has(store, name)]
    if absent:
        more = f" (and {len(absent) - 1} more needed entries)" if len(absent) > 1 else ""
        raise InputError(
            f"cache: holds no {absent[0]}{more}; {_HINT}"
            + (" with options=at2.estimator.feature_options" if v_names else "")
        )
    selected: list[Tensor] = []
    for name in names:
        pattern = _select_batch(store[name], name, spec.batch_index, batch, 3)
        expected = (backend.n_heads, len(kept), n)
        if tuple(pattern.shape) != expected:
            raise InputError(
                f"cache: {name} has shape {tuple(pattern.shape)} (head, query, key) but the task needs "
                f"{expected}: it was made from other tokens"
                + ("" if spec.pos_slice is not None or pattern.shape[-1] == pattern.shape[-2] else
                   " or with a pos_slice (pass it as CachedPatterns(cache, pos_slice=...))")
                + f" (the task has {n} tokens)"
            )
        selected.append(pattern)
    values = None
    if need_values:
        values = []
        for name in v_names:
            v = _select_batch(store[name], name, spec.batch_index, batch, 3)
            if v.shape[0] != n or v.shape[1] != backend.n_kv_heads:
                raise InputError(f"cache: {name} has shape {tuple(v.shape)}; the task needs [{n}, "
                                 f"{backend.n_kv_heads}, d_head]")
            values.append(v)
    row_index = [index[r] for r in wanted]
    if row_index == list(range(row_index[0], row_index[0] + len(row_index))):
        patterns = [p[:, row_index[0] : row_index[0] + len(row_index), :] for p in selected]
    else:  # a pos_slice that keeps rows out of order
        patterns = [p[:, torch.tensor(row_index, device=p.device), :] for p in selected]
    return LayerPatterns(patterns, values)


def _has(store: Any, name: str) -> bool:
    try:
        return name in store
    except Exception:  # a mapping that cannot answer holds nothing we can read
        return False


def _preview_rows(rows: list[int]) -> str:
    if not rows:
        return "none"
    if rows == list(range(rows[0], rows[-1] + 1)):
        return f"{rows[0]}..{rows[-1]}"
    return str(rows[:8])[:-1] + (", ...]" if len(rows) > 8 else "]")


def _check_tokens(spec: CachedPatterns, ids: Tensor) -> int | None:
    """Check ``spec.tokens`` (if any) against the task's ids; returns the cache's batch size as the tokens tell it."""
    if spec.tokens is None:
        return None
    tokens = _as_ids(spec.tokens)
    batch = None
    if tokens.dim() == 2:
        batch = int(tokens.shape[0])
        if batch > 1 and spec.batch_index is None:
            raise InputError(f"cache: tokens hold a batch of {batch} sequences; say which one with batch_index")
        i = 0 if spec.batch_index is None else spec.batch_index
        if not -batch <= i < batch:
            raise InputError(f"cache: batch_index {i} is outside the batch of {batch}")
        tokens = tokens[i]
    if tokens.shape[0] != ids.shape[0] or not torch.equal(tokens, ids):
        raise InputError(
            f"cache: it was made from other tokens than the task's ({tokens.shape[0]} tokens vs the task's "
            f"{ids.shape[0]}{'' if tokens.shape[0] != ids.shape[0] else ', differing ids'})"
        )
    return batch


def _select_batch(x: Any, name: str, batch_index: int | None, batch: int | None, dims: int) -> Tensor:
    """One sequence's entry: ``x`` without its batch dimension (``dims`` dimensions are left)."""
    if not isinstance(x, Tensor):
        raise InputError(f"cache: {name} is a {type(x).__name__}, not a tensor")
    if x.dim() == dims:  # cached with remove_batch_dim=True
        if batch_index not in (None, 0, -1):
            raise InputError(f"cache: {name} has no batch dimension, so batch_index={batch_index} has no sequence")
        return x
    if x.dim() != dims + 1:
        raise InputError(f"cache: {name} has shape {tuple(x.shape)}; expected {dims} dimensions after the batch")
    b = int(x.shape[0])
    if batch is not None and b != batch:
        raise InputError(f"cache: {name} holds a batch of {b} but tokens hold {batch} sequences")
    if batch_index is None:
        if b != 1:
            raise InputError(f"cache: {name} holds a batch of {b} sequences; say which one with "
                             "CachedPatterns(cache, batch_index=...)")
        return x[0]
    if not -b <= batch_index < b:
        raise InputError(f"cache: batch_index {batch_index} is outside the cache's batch of {b}")
    return x[batch_index]


__all__ = ["CachedPatterns", "LayerPatterns", "as_cached_patterns", "cache_filter", "check_cache_inputs",
           "read_cached_patterns"]
