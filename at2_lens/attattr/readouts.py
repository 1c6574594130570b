"""Read-outs: what an ``output_func`` sees of a forward pass, and the ready-made ones (pooled heads, classifiers).

Without an ``output_func``, AttAttr's F is the log-probability of target tokens (``targets.py``). With one, F is
whatever it computes from a ``ForwardOutput``: the logits and the activations of the hooks it names in
``hook_names`` (``FINAL_HIDDEN`` stands for the model's final hidden state, wherever the model class keeps it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from at2_lens._validate import check_choice
from at2_lens.errors import InputError
from at2_lens.models.pooling import POOLING_MODES, Pooling, pool

if TYPE_CHECKING:
    from at2_lens.backends import Backend

FINAL_HIDDEN = "final_hidden"
"""Alias an output function may request in ``hook_names``: the model's final hidden state ``[batch, pos, d_model]``
(``blocks.{L-1}.hook_normalized_resid_post`` on a ``HookedEncoder``, ``blocks.{L-1}.hook_resid_post`` on a BERT
bridge, ``ln_final.hook_normalized`` on a decoder). It is resolved per backend (``Backend.final_hidden_hook``), so
one output function fits all."""


@dataclass(frozen=True)
class ForwardOutput:
    """What an output function sees of one (intervened) forward pass.

    Attributes:
        logits: the model's output, ``[batch, pos, d_vocab]`` (an encoder's MLM head output).
        activations: the hooks the output function asked for (``hook_names``), keyed by the requested name,
            gradients attached, e.g. ``{"final_hidden": Tensor[batch, pos, d_model]}``.
        attention_mask: ``[batch, pos]``, 1 for real tokens, or None when the inputs have no padding.
    """

    logits: Float[Tensor, "batch pos vocab"]
    activations: Mapping[str, Tensor]
    attention_mask: Int[Tensor, "batch pos"] | None


OutputFunc = Callable[..., Tensor]
"""``output_func(out: ForwardOutput, inputs: Tensor[batch, pos], *additional_forward_args)`` returning
``Tensor[batch]`` (the scalar F per row) or ``Tensor[batch, n_outputs]`` (then ``target`` picks a column)."""


def resolve_hook_names(backend: Backend, names: Sequence[str]) -> dict[str, str]:
    """Map each requested name (or the ``FINAL_HIDDEN`` alias) to a hook of the model; unknown names fail early."""
    resolved: dict[str, str] = {}
    for name in names:
        if not isinstance(name, str):
            raise InputError(f"output_hooks: expected hook names (str), got {name!r}")
        real = backend.final_hidden_hook() if name == FINAL_HIDDEN else name
        if not backend.has_hook(real):
            raise InputError(f"output_hooks: {real!r} is not a hook of this model (e.g. 'blocks.0.hook_resid_post')")
        resolved[name] = real
    return resolved


class PooledOutput:
    """An ``output_func`` that pools a hidden state over positions and applies a head (e.g. a sentiment classifier).

    ``PooledOutput(head)`` reads the final hidden state (``FINAL_HIDDEN``), mean-pools it over real tokens (the
    sentence-transformers pooling of all-MiniLM-L6-v2), and returns ``head(pooled)``: ``[batch, n_classes]``
    logits or probabilities, of which ``target`` selects a class (default the predicted one), or ``[batch]``.

    Args:
        head: maps ``[batch, d_model]`` to ``[batch, n_classes]`` or ``[batch]``; any differentiable callable.
        hook_name: which activation to pool (default ``FINAL_HIDDEN``, resolved per backend).
        pooling: ``"mean"`` over real tokens, ``"mean_l2"`` (the same, L2-normalised), ``"cls"`` (position 0) or
            ``"last"`` (last real token); see ``at2_lens.models.pooling``.
    """

    def __init__(
        self, head: Callable[[Tensor], Tensor], hook_name: str = FINAL_HIDDEN, pooling: Pooling = "mean"
    ) -> None:
        check_choice("pooling", pooling, POOLING_MODES)
        if not callable(head):
            raise InputError(f"head: expected a callable, got {type(head).__name__}")
        self.head = head
        self.pooling = pooling
        self.hook_names: tuple[str, ...] = (hook_name,)

    def __call__(self, out: ForwardOutput, inputs: Tensor, *args: Any) -> Tensor:
        return self.head(pool(out.activations[self.hook_names[0]], out.attention_mask, self.pooling))


class LinearSoftmaxHead:
    """``softmax(pooled @ weight.T + bias)``: class probabilities of a linear classifier head."""

    def __init__(self, weight: Tensor, bias: Tensor) -> None:
        self.weight, self.bias = weight, bias

    def __call__(self, pooled: Tensor) -> Tensor:
        w = self.weight.to(pooled.device, pooled.dtype)
        return torch.softmax(pooled @ w.T + self.bias.to(pooled.device, pooled.dtype), dim=-1)


def classifier_output_func(classifier: Any) -> OutputFunc:
    """F for AttAttr on a classifier: ``classifier.output_func`` if present, else the class probabilities of its
    linear ``head`` (``weight``, ``bias``, ``pooling``) on the pooled final hidden state."""
    func = getattr(classifier, "output_func", None)
    if func is not None:
        return func  # type: ignore[no-any-return]
    head = getattr(classifier, "head", None)
    if head is not None and hasattr(head, "weight") and hasattr(head, "bias"):
        pooling = str(getattr(head, "pooling", "mean"))
        return PooledOutput(LinearSoftmaxHead(head.weight, head.bias), pooling=pooling)  # type: ignore[arg-type]
    raise InputError(
        "classifier: AttAttr needs F inside the attributed pass; pass output_func=..., or give the classifier an "
        "'output_func' attribute or a linear 'head' (weight, bias, pooling) on the final hidden state"
    )


__all__ = [
    "FINAL_HIDDEN",
    "ForwardOutput",
    "LinearSoftmaxHead",
    "OutputFunc",
    "PooledOutput",
    "classifier_output_func",
    "resolve_hook_names",
]
