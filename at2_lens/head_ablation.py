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
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from at2_lens._typing import typechecked
from at2_lens._validate import check_int
from at2_lens.backends import Backend, hook_names
from at2_lens.errors import InputError
from at2_lens.ranking import top_k

__all__ = ["ablate_heads_hooks", "heads_from_mask", "top_heads"]

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
    if isinstance(heads, Tensor):
        if heads.dtype != torch.bool or heads.dim() != 2:
            raise InputError(f"heads: expected a boolean [layer, head] mask, got {heads.dtype} {tuple(heads.shape)}")
        pairs = heads_from_mask(heads)
    else:
        try:
            pairs = [tuple(p) for p in heads]
        except TypeError:
            raise InputError(f"heads: expected (layer, head) pairs or a [layer, head] mask, got {heads!r}") from None
    for p in pairs:
        if len(p) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in p):
            raise InputError(f"heads: expected (layer, head) pairs of non-negative ints, got {p!r}")
    if model is not None:
        cfg = getattr(model.model if isinstance(model, Backend) else model, "cfg", None)
        if cfg is None:
            raise InputError(f"model: expected a TransformerLens model with a cfg, got {type(model).__name__}")
        bad = [p for p in pairs if p[0] >= cfg.n_layers or p[1] >= cfg.n_heads]
        if bad:
            raise InputError(f"heads: {bad} lie outside the model's {cfg.n_layers} layers x {cfg.n_heads} heads")
    by_layer: dict[int, list[int]] = {}
    for layer, head in pairs:
        by_layer.setdefault(layer, []).append(head)
    return [(hook_names.z(layer), _zero_heads(sorted(set(hs)))) for layer, hs in sorted(by_layer.items())]


def _zero_heads(heads: list[int]) -> HookFn:
    index = torch.tensor(heads, dtype=torch.long)

    def hook(z: Tensor, hook: Any) -> Tensor:
        if int(index.max()) >= z.shape[2]:
            raise InputError(f"heads: head {int(index.max())} does not exist in {hook.name} ({z.shape[2]} heads)")
        z = z.clone()
        z[:, :, index.to(z.device)] = 0.0
        return z

    return hook
