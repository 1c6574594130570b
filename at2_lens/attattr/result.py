"""``AttAttrResult``: what one ``SelfAttentionAttribution.attribute`` call returns, with its read-outs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from at2_lens.backends import hook_names
from at2_lens.errors import InputError


@dataclass(frozen=True)
class AttAttrResult:
    """Attention attributions of one ``SelfAttentionAttribution.attribute`` call.

    Attributes:
        attributions: ``[layer, head, query, key]`` for a single example (1-D inputs or one row), else
            ``[batch, layer, head, query, key]``; the layer axis follows ``layers``.
        layers: the attributed layer indices, in order.
        output: F with the model's own attention, per example (``[]`` or ``[batch]``).
        convergence_delta: completeness error per layer, ``Σ attributions − (F(A) − F(A_l = 0))``: ``[layer]`` or
            ``[batch, layer]``; None unless ``return_convergence_delta=True``.
        baseline_output: F with layer ``l``'s attention zeroed, same shape as ``convergence_delta``, or None.
        attention_mask: the padding mask ``[batch, pos]`` used, or None.
        method, n_steps: the integral approximation used.
    """

    attributions: Tensor
    layers: tuple[int, ...]
    output: Tensor
    convergence_delta: Tensor | None = None
    baseline_output: Tensor | None = None
    attention_mask: Tensor | None = None
    method: str = "gausslegendre"
    n_steps: int = 20

    @property
    def batched(self) -> bool:
        """Whether ``attributions`` has a leading batch axis."""
        return self.attributions.dim() == 5

    @property
    def hook_names(self) -> list[str]:
        """``blocks.{l}.attn.hook_pattern`` for each attributed layer, in order."""
        return [hook_names.pattern(layer) for layer in self.layers]

    def by_hook_name(self) -> dict[str, Tensor]:
        """``{"blocks.{l}.attn.hook_pattern": attributions of layer l}``: ``[head, q, k]`` (``[batch, head, q, k]``)."""
        axis = 1 if self.batched else 0
        return {name: self.attributions.select(axis, i) for i, name in enumerate(self.hook_names)}

    def head_importance(self) -> Tensor:
        """Max over (query, key) of each head's attribution, ``[layer, head]`` (``[batch, layer, head]``).

        Padding positions are excluded. Summing the batched result over examples gives the paper's head
        importance ``I_{l,h} = Σ_x max_{i,j} Attr_{l,h}(x)[i, j]``.
        """
        attr = self.attributions if self.batched else self.attributions[None]
        if self.attention_mask is not None:
            real = self.attention_mask.to(attr.device).bool()
            pair = real[:, :, None] & real[:, None, :]
            attr = attr.masked_fill(~pair[:, None, None], float("-inf"))
        importance = attr.flatten(-2).max(dim=-1).values
        return importance if self.batched else importance[0]

    def relative_convergence_delta(self) -> Tensor:
        """``|convergence_delta| / |F(A) − F(A_l = 0)|`` per layer: completeness error as a fraction."""
        if self.convergence_delta is None or self.baseline_output is None:
            raise InputError("return_convergence_delta: call attribute(..., return_convergence_delta=True) first")
        change = (self.output[..., None] - self.baseline_output).abs()
        return self.convergence_delta.abs() / change.clamp_min(torch.finfo(change.dtype).tiny)


__all__ = ["AttAttrResult"]
