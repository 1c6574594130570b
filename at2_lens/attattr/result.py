"""``AttAttrResult``: what one ``SelfAttentionAttribution.attribute`` call returns, with its read-outs.

``result.save(path)`` writes it as one safetensors file (the tensors, plus layers, method, steps and the model
fingerprint as canonical JSON with a format version); ``AttAttrResult.load(path)`` reads it back, executing nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from at2_lens._result_files import read_result, write_result
from at2_lens.backends import hook_names
from at2_lens.errors import InputError, ResultFileError

RESULT_FORMAT = "at2_lens.attattr_result"
RESULT_FORMAT_VERSION = 1
_OPTIONAL_TENSORS = ("convergence_delta", "baseline_output", "attention_mask", "steps", "converged")


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
        method, n_steps: the integral approximation used (``n_steps`` is ``"auto"`` when the points were chosen per
            layer; ``method`` is then the rule family, e.g. ``"clenshaw_curtis"``).
        steps: ``n_steps="auto"`` only: gradient evaluations made per layer, ``[layer]`` (the size of the rule
            that met the tolerance for a nested family); None otherwise.
        converged: ``n_steps="auto"`` only: per layer, whether every row met the tolerance within ``max_steps``
            (``[layer]`` bool); the achieved error is ``relative_convergence_delta()``. None otherwise.
        rtol, atol, max_steps: ``n_steps="auto"`` only: the tolerance asked for; None otherwise.
        model_fingerprint: the model attributed (``at2_lens.at2.estimator.model_fingerprint``), when known (set by
            ``save(path, model=...)`` and kept by ``load``).
    """

    attributions: Tensor
    layers: tuple[int, ...]
    output: Tensor
    convergence_delta: Tensor | None = None
    baseline_output: Tensor | None = None
    attention_mask: Tensor | None = None
    method: str = "gausslegendre"
    n_steps: int | str = 20
    model_fingerprint: dict[str, Any] | None = None
    steps: Tensor | None = None
    converged: Tensor | None = None
    rtol: float | None = None
    atol: float | None = None
    max_steps: int | None = None

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

    # ----------------------------------------------------------------------------------------------- files
    def save(self, path: Path | str, *, model: Any = None) -> Path:
        """Write this result to ``path`` (one safetensors file, written atomically); returns the path.

        With ``model`` (a TransformerLens model or its ``Backend``), its fingerprint is recorded.
        """
        tensors = {"attributions": self.attributions.detach().cpu(), "output": self.output.detach().cpu()}
        for name in _OPTIONAL_TENSORS:
            value = getattr(self, name)
            if value is not None:
                tensors[name] = value.detach().cpu()
        fingerprint = self.model_fingerprint
        if model is not None:
            from at2_lens.at2.estimator import model_fingerprint
            from at2_lens.backends import get_backend

            fingerprint = model_fingerprint(get_backend(model))
        meta = {"layers": list(self.layers), "method": self.method, "n_steps": self.n_steps,
                "model_fingerprint": fingerprint}
        if self.n_steps == "auto":
            meta.update(rtol=self.rtol, atol=self.atol, max_steps=self.max_steps)
        return write_result(path, RESULT_FORMAT, RESULT_FORMAT_VERSION, tensors, meta)

    @classmethod
    def load(cls, path: Path | str) -> AttAttrResult:
        """Read a result written by :meth:`save` (never executes code from the file).

        Raises ResultFileError for a missing, corrupted or pickle-based file, a file of another kind (e.g. a
        ``SourceAttribution``) or of another format version.
        """
        tensors, meta = read_result(path, RESULT_FORMAT, RESULT_FORMAT_VERSION)
        try:
            layers = tuple(meta["layers"])
            attributions = tensors["attributions"]
            if not all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
                raise TypeError(f"layers are {meta['layers']!r}")
            if attributions.dim() not in (4, 5) or attributions.shape[attributions.dim() - 4] != len(layers):
                raise ValueError(f"attributions of shape {tuple(attributions.shape)} do not fit layers {layers}")
            if not isinstance(meta["model_fingerprint"], dict | None):
                raise TypeError(f"model_fingerprint is {meta['model_fingerprint']!r}")
            n_steps = meta["n_steps"]
            auto = n_steps == "auto"
            if not auto:
                n_steps = int(n_steps)
            return cls(
                attributions=attributions, layers=layers, output=tensors["output"],
                **{name: tensors.get(name) for name in _OPTIONAL_TENSORS},
                method=str(meta["method"]), n_steps=n_steps,
                model_fingerprint=meta["model_fingerprint"],
                rtol=float(meta["rtol"]) if auto else None,
                atol=float(meta["atol"]) if auto else None,
                max_steps=int(meta["max_steps"]) if auto else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ResultFileError(f"{path}: inconsistent AttAttrResult file ({type(exc).__name__}: {exc})") from None


__all__ = ["AttAttrResult"]
