"""Attention baselines: attention averaged over heads (all layers, or the last layer only).

Averaging over every layer and head is exactly AT2 with its initial uniform weights ``w = 1/(L·H)``; it is what
AT2 learns to improve on. Averaging only the last layer is the other common heuristic. Both cost one forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from captum.attr import Attribution

from at2_lens.at2.features import extract_features
from at2_lens.backends import get_backend
from at2_lens.baselines._common import make_result, resolve_task
from at2_lens.errors import InputError
from at2_lens.results import SourceAttribution
from at2_lens.tasks import ContextTask, TargetSpan, TokenizedTask


class AverageAttention(Attribution):
    r"""Score each source by the attention the target's rows pay to it, averaged over heads.

    ``score[s] = mean_{(l, h) ∈ layers × heads} Σ_{k ∈ s} mean_{t ∈ target} A^{l,h}[t, k]``: the AT2 feature
    averaged with equal weights. With ``layers=None`` (all layers) this equals ``AT2Attribution(model)`` with
    uniform weights; ``layers=[-1]`` is the last layer only.

    Args:
        forward_func: a TransformerLens decoder (``HookedTransformer`` or ``TransformerBridge``).
        layers: which layers to average (negative indices count from the end); None = all.
    """

    def __init__(self, forward_func: Any, layers: Sequence[int] | None = None) -> None:
        backend = get_backend(forward_func)
        super().__init__(forward_func)
        if not backend.is_causal:
            raise InputError("forward_func: attention baselines attribute generated responses; need a decoder")
        self.backend = backend
        if layers is not None:
            if isinstance(layers, str | bytes) or not isinstance(layers, Sequence):
                raise InputError(f"layers: expected None or a sequence of layer indices, got {layers!r}")
            bad = [x for x in layers if isinstance(x, bool) or not isinstance(x, int)]
            if bad:
                raise InputError(f"layers: expected integer layer indices, got {bad[0]!r}")
            n = backend.n_layers
            if any(not -n <= x < n for x in layers):
                raise InputError(f"layers: expected indices in [-{n}, {n}) (negative count from the end), got {layers}")
            layers = [x + n if x < 0 else x for x in layers]
        self.layers: list[int] = backend.check_layers(layers)
        _ = backend.attention_access  # fails now, with the reason, if attention cannot be read

    def has_convergence_delta(self) -> bool:
        return False

    @property
    def name(self) -> str:
        if self.layers == list(range(self.backend.n_layers)):
            return "average attention (all layers and heads)"
        if self.layers == [self.backend.n_layers - 1]:
            return "average attention (last layer)"
        return f"average attention (layers {self.layers})"

    def attribute(  # type: ignore[override]
        self,
        inputs: ContextTask | TokenizedTask,
        target: TargetSpan | Sequence[int] | None = None,
        *,
        per_token: bool = False,
        max_new_tokens: int = 64,
    ) -> SourceAttribution:
        """Score every source of ``inputs`` for the target (one forward pass over prompt + response)."""
        task = resolve_task(self.backend, inputs, target, max_new_tokens)
        t_range = task.target_token_range
        assert t_range is not None
        fpass = extract_features(self.backend.model, task.input_ids, list(task.source_token_ranges), t_range,
                                 with_logprobs=False)
        rows = fpass.row_features[:, :, self.layers]  # [target, source, layer, head]
        scores = rows.mean(dim=0).mean(dim=(-2, -1))
        token_scores = target_tokens = None
        if per_token:
            token_scores = rows.mean(dim=(-2, -1))
            tok = self.backend.tokenizer
            target_tokens = tuple(tok.decode([int(i)]) for i in task.input_ids[t_range[0] : t_range[1]])
        return make_result(task, scores, method=self.name, units="attention mass (mean over heads)",
                           forward_passes=1, token_scores=token_scores, target_tokens=target_tokens,
                           layers=list(self.layers))


class LastLayerAttention(AverageAttention):
    """Attention averaged over the heads of the last layer only (one forward pass)."""

    def __init__(self, forward_func: Any) -> None:
        super().__init__(forward_func, layers=[-1])
