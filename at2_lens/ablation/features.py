"""Target-row attention features, read by hooks in one forward pass: what AT2 and the attention baselines score.

For a source ``s`` and head ``(l, h)``: ``φ[s, l, h] = Σ_{k ∈ s} mean_{t ∈ target} A^{l,h}[t, k]`` — attention
from the query rows that produce the target (:func:`~at2_lens.ablation.positions.query_rows`) to the source's
keys. Each layer's hook reduces its pattern rows to ``[row, source, head]`` immediately, so a full
``[layers, heads, N, N]`` cache never exists.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from einops import einsum
from jaxtyping import Float, Int
from torch import Tensor

from at2_lens._typing import typechecked
from at2_lens.ablation.positions import check_spans, membership, query_rows
from at2_lens.backends import Backend, get_backend
from at2_lens.errors import InputError, NumericalError
from at2_lens.tasks import Span


@dataclass(frozen=True)
class FeaturePass:
    """What one forward pass yields: per-row features and the target tokens' log-probabilities.

    ``row_features[t, s, l, h]`` is head ``(l, h)``'s attention from the row producing target token ``t`` to
    source ``s``; averaging over any subset of rows gives the AT2 features of that sub-span, with no new pass.
    """

    row_features: Float[Tensor, "target source layer head"]
    token_logprobs: Float[Tensor, " target"] | None
    target_range: Span

    def features(self, sub_range: Span | None = None) -> Float[Tensor, "source layer head"]:
        """AT2 features of the whole target, or of a token sub-range ``[a, b)`` (absolute positions) of it."""
        return self.row_features[self._rows(sub_range)].mean(dim=0)

    def _rows(self, sub_range: Span | None) -> slice:
        t0, t1 = self.target_range
        if sub_range is None:
            return slice(0, t1 - t0)
        a, b = sub_range
        if not (t0 <= a < b <= t1):
            raise InputError(f"target: sub-range ({a}, {b}) must lie inside the attributed span ({t0}, {t1})")
        return slice(a - t0, b - t0)


@typechecked
@torch.no_grad()
def extract_features(
    model: Any,
    input_ids: Int[Tensor, " pos"],
    source_ranges: Sequence[Span],
    target_range: Span,
    *,
    with_logprobs: bool = True,
) -> FeaturePass:
    """Read AT2 features (and the target's token log-probs) in a single forward pass."""
    backend: Backend = get_backend(model)
    ids = backend.check_tokens(input_ids, name="input_ids")
    n = ids.shape[1]
    causal = backend.is_causal
    check_spans(source_ranges, target_range, n, causal)
    _ = backend.attention_access  # raises clearly if attention cannot be read
    member = membership(source_ranges, n).to(backend.device)
    rows = query_rows(target_range, causal)
    per_layer: list[Tensor | None] = [None] * backend.n_layers

    def make_hook(layer: int) -> Any:
        def hook(pattern: Tensor, hook: Any) -> None:
            reduced = einsum(
                pattern[:, :, rows, :].float(), member, "batch head row key, key source -> row source head"
            )
            if not torch.isfinite(reduced).all():
                raise NumericalError(
                    f"attention of layer {layer} holds NaN or inf (e.g. a row whose every key is masked); refusing "
                    "to return non-finite features"
                )
            per_layer[layer] = reduced

        return hook

    hooks = [(backend.pattern_hook(layer), make_hook(layer)) for layer in range(backend.n_layers)]
    logits = backend.run(ids, hooks)
    feats = torch.stack([p for p in per_layer if p is not None], dim=2).cpu()  # [row, source, layer, head]
    logprobs = None
    if with_logprobs and causal:
        t0, t1 = target_range
        lp = torch.log_softmax(logits[0, rows].float(), dim=-1)
        logprobs = lp.gather(-1, ids[0, t0:t1, None].to(lp.device))[:, 0].cpu()
    return FeaturePass(feats, logprobs, target_range)


__all__ = ["FeaturePass", "extract_features"]
