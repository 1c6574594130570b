"""Head ablation in plain TransformerLens terms: ``(hook_name, hook_fn)`` pairs for ``run_with_hooks``.

AT2's per-head weights (``AT2Attribution.head_weights``) and AttAttr's head importance
(``AttAttrResult.head_importance()``) are ``[layer, head]`` tensors; ``top_heads`` picks the largest entries and
``ablate_heads_hooks`` turns a set of heads into forward hooks that zero those heads' outputs at
``blocks.{l}.attn.hook_z`` (``[batch, pos, head, d_head]``, the per-head attention output before ``W_O``), the
hook every supported model class fires and lets edit::

    hooks = ablate_heads_hooks(top_heads(at2.head_weights, k=5))
    logits = model.run_with_hooks(tokens, fwd_hooks=hooks)

Zeroing ``z`` removes what the head writes to the residual stream (the output bias ``b_O`` stays), the same as
zeroing its attention pattern (``z = A · V``); at2_lens's pruning sweeps do the latter through the backend.

The same edits as ``model.hooks()``-style context managers, which also expose their pairs as ``.fwd_hooks``:
``ablate_heads`` (``how="zero"``, ``"mean"`` over a reference batch, or ``"resample"`` from a reference input, at
``hook_z``) and ``knockout_sources`` (chosen heads stop attending to chosen key positions; at ``hook_pattern`` or
through ``hook_z``, as the backend's probe decides)::

    with ablate_heads(model, top_heads(at2.head_weights, k=5), how="mean", reference=ref_tokens):
        logits, cache = model.run_with_cache(tokens)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import Any, Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from at2_lens._typing import typechecked
from at2_lens._validate import check_choice, check_int
from at2_lens.backends import Backend, get_backend, hook_names
from at2_lens.errors import InputError, ModelNotSupportedError
from at2_lens.interventions import FwdHook, PatternTransform, mask_keys, on_heads
from at2_lens.ranking import top_k

__all__ = [
    "ABLATION_HOWS",
    "HeadAblation",
    "HookSet",
    "SourceKnockout",
    "ablate_heads",
    "ablate_heads_hooks",
    "heads_from_mask",
    "knockout_sources",
    "top_heads",
]

Head = tuple[int, int]
HookFn = Callable[[Tensor, Any], Tensor]


@typechecked
def top_heads(scores: Float[Tensor, "layer head"], k: int, *, largest: bool = True) -> list[Head]:
    """The ``k`` heads with the largest (``largest=False``: smallest) scores, as ``(layer, head)``, best first.

    Ties are broken by ``(layer, head)`` order. ``scores`` is any ``[layer, head]`` tensor: AT2 head weights,
    AttAttr head importance, or your own.
    """
    k = check_int("k", k, minimum=1, maximum=scores.numel())
    if not torch.isfinite(scores).all():
        raise InputError("scores: contains NaN or inf")
    n_heads = scores.shape[1]
    return [(i // n_heads, i % n_heads) for i in top_k(scores.float(), k, largest=largest)]


@typechecked
def heads_from_mask(mask: Bool[Tensor, "layer head"]) -> list[Head]:
    """The ``(layer, head)`` pairs where a boolean ``[layer, head]`` mask is True, in order."""
    return [(int(a), int(b)) for a, b in mask.nonzero().tolist()]


def _as_pairs(heads: Iterable[Head] | Tensor) -> list[Head]:
    """``heads`` as a list of ``(layer, head)`` pairs of non-negative ints; raises InputError naming ``heads``."""
    if isinstance(heads, Tensor):
        if heads.dtype != torch.bool or heads.dim() != 2:
            raise InputError(f"heads: expected a boolean [layer, head] mask, got {heads.dtype} {tuple(heads.shape)}")
        return heads_from_mask(heads)
    if isinstance(heads, (str, bytes)):
        raise InputError(f"heads: expected (layer, head) pairs or a [layer, head] mask, got {heads!r}")
    try:
        pairs = [tuple(p) for p in heads]
    except TypeError:
        raise InputError(f"heads: expected (layer, head) pairs or a [layer, head] mask, got {heads!r}") from None
    for p in pairs:
        if len(p) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in p):
            raise InputError(f"heads: expected (layer, head) pairs of non-negative ints, got {p!r}")
    return pairs  # type: ignore[return-value]


def _check_in_model(pairs: list[Head], n_layers: int, n_heads: int) -> None:
    bad = [p for p in pairs if p[0] >= n_layers or p[1] >= n_heads]
    if bad:
        raise InputError(f"heads: {bad} lie outside the model's {n_layers} layers x {n_heads} heads")


def _by_layer(pairs: list[Head]) -> dict[int, list[int]]:
    """``{layer: sorted distinct heads}``, layers in order."""
    by_layer: dict[int, set[int]] = {}
    for layer, head in pairs:
        by_layer.setdefault(layer, set()).add(head)
    return {layer: sorted(hs) for layer, hs in sorted(by_layer.items())}


def ablate_heads_hooks(
    heads: Iterable[Head] | Tensor, model: Any = None
) -> list[tuple[str, HookFn]]:
    """Forward hooks zeroing the given heads' outputs, for ``model.run_with_hooks(..., fwd_hooks=...)``.

    Args:
        heads: ``(layer, head)`` pairs (e.g. from ``top_heads``), or a boolean ``[layer, head]`` mask.
        model: optional TransformerLens model (or at2_lens ``Backend``); when given, the heads are checked against
            its ``cfg.n_layers`` / ``cfg.n_heads`` before anything runs.

    Returns:
        One ``("blocks.{l}.attn.hook_z", hook_fn)`` pair per layer holding an ablated head, in layer order; an empty
        list when ``heads`` is empty. Works on ``HookedTransformer`` and ``TransformerBridge`` alike.
    """
    pairs = _as_pairs(heads)
    if model is not None:
        cfg = getattr(model.model if isinstance(model, Backend) else model, "cfg", None)
        if cfg is None:
            raise InputError(f"model: expected a TransformerLens model with a cfg, got {type(model).__name__}")
        _check_in_model(pairs, cfg.n_layers, cfg.n_heads)
    return [(hook_names.z(layer), _zero_heads(hs)) for layer, hs in _by_layer(pairs).items()]


def _zero_heads(heads: list[int]) -> HookFn:
    index = torch.tensor(heads, dtype=torch.long)

    def hook(z: Tensor, hook: Any) -> Tensor:
        if int(index.max()) >= z.shape[2]:
            raise InputError(f"heads: head {int(index.max())} does not exist in {hook.name} ({z.shape[2]} heads)")
        z = z.clone()
        z[:, :, index.to(z.device)] = 0.0
        return z

    return hook


# ------------------------------------------------------------------------------------------- context managers
AblationHow = Literal["zero", "mean", "resample"]
ABLATION_HOWS: tuple[AblationHow, ...] = ("zero", "mean", "resample")


class HookSet:
    """Forward hooks usable as a ``model.hooks()``-style context manager, or as plain ``(name, fn)`` pairs.

    ``with hook_set as model:`` adds ``fwd_hooks`` through TransformerLens's own ``model.hooks(...)``, so they nest
    with other ``model.hooks`` contexts, ``run_with_hooks`` and ``run_with_cache`` (each removes only the hooks it
    added) and are removed when the block ends, also when it raises. ``model.run_with_hooks(tokens,
    fwd_hooks=hook_set.fwd_hooks)`` applies the same edit to one call.
    """

    def __init__(self, backend: Backend, fwd_hooks: list[FwdHook]) -> None:
        self.backend = backend  # held so the backend's per-call state (padding mask) stays the same object
        self.model = backend.model
        self.fwd_hooks = fwd_hooks
        self._active: list[AbstractContextManager[Any]] = []

    def __enter__(self) -> Any:
        ctx = self.model.hooks(fwd_hooks=list(self.fwd_hooks))
        model = ctx.__enter__()
        self._active.append(ctx)
        return model

    def __exit__(self, *exc_info: Any) -> bool | None:
        return self._active.pop().__exit__(*exc_info)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(hooks={[name for name, _ in self.fwd_hooks]})"


class HeadAblation(HookSet):
    """Ablated attention heads (see :func:`ablate_heads`): ``heads``, ``how``, and for ``"mean"``/``"resample"``
    the reference activations ``values`` (``{layer: tensor}``, the chosen heads in ascending order)."""

    def __init__(
        self, backend: Backend, heads: list[Head], how: AblationHow, values: dict[int, Tensor] | None = None
    ) -> None:
        self.heads = heads
        self.how = how
        self.values = values or {}
        hooks: list[FwdHook] = []
        for layer, hs in _by_layer(heads).items():
            fn = _zero_heads(hs) if how == "zero" else _set_heads(hs, self.values[layer], how)
            hooks.append((hook_names.z(layer), fn))
        super().__init__(backend, hooks)


class SourceKnockout(HookSet):
    """Attention knockout (see :func:`knockout_sources`): ``heads`` no longer attend to the ``sources`` keys."""

    def __init__(self, backend: Backend, heads: list[Head], transform_for: Callable[[list[int]], PatternTransform],
                 ) -> None:
        self.heads = heads
        hooks: list[FwdHook] = []
        for layer, hs in _by_layer(heads).items():
            z_name = hook_names.z(layer)
            for name, fn in backend.pattern_hooks(layer, transform_for(hs)):
                # Where the backend rewrites hook_z from the edited pattern, keep the other heads' incoming z, so
                # that edits made there by other hooks (e.g. an ablation of another head) survive.
                hooks.append((name, _only_heads(fn, hs) if name == z_name else fn))
        super().__init__(backend, hooks)


def _only_heads(write_z: HookFn, heads: list[int]) -> HookFn:
    """A ``hook_z`` writer that changes only ``heads``; the other heads keep the ``z`` it received."""
    index = torch.tensor(heads, dtype=torch.long)

    def hook(z: Tensor, hook: Any) -> Tensor:
        new = write_z(z, hook)
        idx = index.to(z.device)
        out = z.clone()
        out[:, :, idx] = new[:, :, idx].to(z.dtype)
        return out

    return hook


def _set_heads(heads: list[int], value: Tensor, how: str) -> HookFn:
    """Hook for ``hook_z`` writing ``value`` into ``heads``: ``[head, d_head]`` (mean, every position) or
    ``[batch, pos, head, d_head]`` (resample, position by position)."""
    index = torch.tensor(heads, dtype=torch.long)

    def hook(z: Tensor, hook: Any) -> Tensor:
        v = value.to(z.device, z.dtype)
        if how == "resample":
            if v.shape[1] != z.shape[1] or v.shape[0] not in (1, z.shape[0]):
                raise InputError(
                    f"reference: the resample reference has batch {v.shape[0]} x {v.shape[1]} positions, the input "
                    f"has batch {z.shape[0]} x {z.shape[1]}; give a reference of the same length (batch 1 or equal)"
                )
            v = v.expand(z.shape[0], -1, -1, -1)
        z = z.clone()
        z[:, :, index.to(z.device)] = v
        return z

    return hook


def _backend_of(model: Any) -> Backend:
    return model if isinstance(model, Backend) else get_backend(model)


def _check_heads(backend: Backend, heads: Iterable[Head] | Tensor) -> list[Head]:
    pairs = _as_pairs(heads)
    _check_in_model(pairs, backend.n_layers, backend.n_heads)
    return pairs


@torch.no_grad()
def _reference_z(
    backend: Backend, heads: list[Head], reference: Tensor, reference_mask: Tensor | None, how: AblationHow
) -> dict[int, Tensor]:
    """One clean forward pass over ``reference``: each layer's chosen heads' ``z``, averaged for ``"mean"``."""
    by_layer = _by_layer(heads)
    seen: dict[int, Tensor] = {}

    def reader(layer: int, hs: list[int]) -> HookFn:
        def hook(z: Tensor, hook: Any) -> None:
            seen[layer] = z[:, :, hs].detach().float().cpu()

        return hook

    backend.run(reference, [(hook_names.z(layer), reader(layer, hs)) for layer, hs in by_layer.items()],
                attention_mask=reference_mask)
    missing = [layer for layer in by_layer if layer not in seen]
    if missing:
        raise ModelNotSupportedError(f"{backend.describe()}: hook_z of layers {missing} never fired")
    if how == "resample":
        return seen
    weight = (torch.ones(reference.shape) if reference_mask is None else reference_mask.float().cpu())
    total = weight.sum()
    return {layer: (z * weight[:, :, None, None]).sum(dim=(0, 1)) / total for layer, z in seen.items()}


def ablate_heads(
    model: Any,
    heads: Iterable[Head] | Tensor,
    how: AblationHow = "zero",
    *,
    reference: Int[Tensor, "batch pos"] | Int[Tensor, " pos"] | None = None,
    reference_mask: Int[Tensor, "batch pos"] | Int[Tensor, " pos"] | None = None,
) -> HeadAblation:
    """Ablate attention heads at ``hook_z`` for the duration of a ``with`` block (or through ``.fwd_hooks``).

    ``with at2_lens.ablate_heads(model, [(3, 1), (5, 0)], how="mean", reference=ref_tokens): logits = model(tokens)``

    Args:
        model: a TransformerLens model (``HookedTransformer``, ``HookedEncoder``, ``TransformerBridge``) or its
            at2_lens ``Backend``.
        heads: ``(layer, head)`` pairs (e.g. from ``top_heads``) or a boolean ``[layer, head]`` mask; empty ablates
            nothing.
        how: ``"zero"`` writes zeros (what the head adds to the residual stream, bar ``b_O``, is removed; the same as
            ``ablate_heads_hooks``); ``"mean"`` writes the head's mean ``z`` over the real tokens of ``reference``
            (computed once, here); ``"resample"`` writes the head's ``z`` on ``reference`` position by position (the
            input must then have as many positions; a reference of batch 1 serves every input row).
        reference: token ids of the reference input(s), for ``"mean"`` and ``"resample"`` only.
        reference_mask: optional padding mask of ``reference`` (1 = real token).

    Everything is checked, and ``hook_z`` edits are confirmed to take effect on this model (the backend's probe),
    before the reference pass. Raises InputError naming the bad argument.
    """
    backend = _backend_of(model)
    check_choice("how", how, ABLATION_HOWS)
    pairs = _check_heads(backend, heads)
    if how == "zero":
        if reference is not None or reference_mask is not None:
            raise InputError("reference: only how='mean' or how='resample' reads a reference input")
    else:
        if reference is None:
            raise InputError(f"reference: how={how!r} needs reference token ids (the input the activations come from)")
        if reference_mask is not None and not isinstance(reference_mask, Tensor):
            raise InputError(f"reference_mask: expected a tensor, got {type(reference_mask).__name__}")
        reference = backend.check_tokens(reference, name="reference")
        if reference_mask is not None:
            if reference_mask.dim() == 1:
                reference_mask = reference_mask[None]
            if reference_mask.shape != reference.shape:
                raise InputError(f"reference_mask: expected the reference's shape {tuple(reference.shape)}, got "
                                 f"{tuple(reference_mask.shape)}")
        if reference_mask is not None and not bool(reference_mask.bool().any()):
            raise InputError("reference_mask: masks every reference token")
    if not pairs:
        return HeadAblation(backend, [], how)
    if not backend.probe.z_editable:
        raise ModelNotSupportedError(f"{backend.describe()}: edits at hook_z do not take effect, so heads cannot be "
                                     "ablated there")
    values = None if how == "zero" else _reference_z(backend, pairs, reference, reference_mask, how)  # type: ignore[arg-type]
    return HeadAblation(backend, pairs, how, values)


def _as_sources(sources: Iterable[int] | Tensor, n_ctx: int) -> Tensor:
    """``sources`` as sorted distinct int64 key positions ``[n]`` or a boolean knock-out mask ``[batch, pos]``."""
    if isinstance(sources, Tensor):
        if sources.dtype == torch.bool:
            if sources.dim() not in (1, 2) or sources.shape[-1] == 0:
                raise InputError(f"sources: expected a boolean [pos] or [batch, pos] mask, got shape "
                                 f"{tuple(sources.shape)}")
            if sources.shape[-1] > n_ctx:
                raise InputError(f"sources: a mask over {sources.shape[-1]} positions exceeds the model's context "
                                 f"window of {n_ctx}")
            return sources if sources.dim() == 2 else sources[None]
        if sources.dtype not in (torch.int64, torch.int32) or sources.dim() != 1:
            raise InputError(f"sources: expected key positions (1-D integer tensor) or a boolean mask, got "
                             f"{sources.dtype} {tuple(sources.shape)}")
        positions = sources.tolist()
    elif isinstance(sources, (str, bytes)):
        raise InputError(f"sources: expected key positions (ints) or a boolean mask, got {sources!r}")
    else:
        try:
            positions = list(sources)
        except TypeError:
            raise InputError(f"sources: expected key positions (ints) or a boolean mask, got {sources!r}") from None
    bad = [p for p in positions if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p < n_ctx]
    if bad:
        raise InputError(f"sources: expected key positions in [0, {n_ctx}), got {bad[:5]!r}")
    return torch.tensor(sorted(set(positions)), dtype=torch.long)


def _knockout(sources: Tensor) -> Callable[[list[int]], PatternTransform]:
    """For a layer's heads: the pattern transform that zeroes their attention to ``sources`` and renormalises."""

    def transform_for(heads: list[int]) -> PatternTransform:
        def transform(pattern: Tensor) -> Tensor:
            n_batch, n_key = pattern.shape[0], pattern.shape[-1]
            if sources.dtype == torch.bool:
                if sources.shape[-1] != n_key or sources.shape[0] not in (1, n_batch):
                    raise InputError(f"sources: a knock-out mask of shape {tuple(sources.shape)} does not fit an "
                                     f"input of batch {n_batch} x {n_key} positions")
                keep = ~sources
            else:
                if len(sources) and int(sources[-1]) >= n_key:
                    raise InputError(f"sources: key position {int(sources[-1])} lies outside the input "
                                     f"({n_key} positions)")
                keep = torch.ones(1, n_key, dtype=torch.bool)
                keep[0, sources] = False
            return on_heads(mask_keys(keep), heads)(pattern)

        return transform

    return transform_for


def knockout_sources(
    model: Any, heads: Iterable[Head] | Tensor, sources: Iterable[int] | Tensor
) -> SourceKnockout:
    """Attention knockout: the chosen heads stop attending to the chosen key positions, for a ``with`` block.

    ``with at2_lens.knockout_sources(model, [(2, 0)], range(3, 8)): logits = model(tokens)``

    For each chosen head, attention to the ``sources`` keys is set to zero and every query row renormalised over
    the remaining keys (the same as putting those keys under that head's attention mask; a row left with no key
    becomes zeros). Applied at ``hook_pattern`` where edits there take effect, else by recomputing ``hook_z``; the
    backend's probe decides. On models where the pattern is rebuilt from ``q`` and ``k`` (TransformerLens 4.x BERT
    bridges) a padding mask is known only to passes run through ``Backend.run``.

    Args:
        model: a TransformerLens model or its at2_lens ``Backend`` (e.g. ``Backend(model, attention_access="z")``).
        heads: ``(layer, head)`` pairs or a boolean ``[layer, head]`` mask.
        sources: key positions (ints, e.g. ``range(a, b)`` for a source's token range), or a boolean ``[pos]`` /
            ``[batch, pos]`` mask, True where a key is knocked out.
    """
    backend = _backend_of(model)
    pairs = _check_heads(backend, heads)
    checked = _as_sources(sources, backend.n_ctx)
    if pairs:
        backend.attention_access  # noqa: B018 -- raises now, before any pass, where attention cannot be edited
    return SourceKnockout(backend, pairs, _knockout(checked))
