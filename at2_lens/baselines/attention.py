"""Attention baselines: attention averaged over heads (all layers, or the last layer only).

Averaging over every layer and head is exactly AT2 with its initial uniform weights ``w = 1/(L·H)``; it is what
AT2 learns to improve on. Averaging only the last layer is the other common heuristic. Both cost one forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from captum.attr import Attribution

from at2_lens._validate import check_int
from at2_lens.ablation import extract_features
from at2_lens.ablation.user_cache import check_cache_inputs
from at2_lens.backends import get_backend
from at2_lens.errors import InputError
from at2_lens.results import SourceAttribution
from at2_lens.tasks import DEFAULT_MAX_NEW_TOKENS, ContextTask, TargetSpan, TokenizedTask, prepare_task


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
            n = backend.n_layers  # negative indices count from the end
            layers = [check_int(f"layers[{i}]", x, minimum=-n, maximum=n - 1) % n for i, x in enumerate(layers)]
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
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        cache: Any = None,
    ) -> SourceAttribution:
        """Score every source of ``inputs`` for the target (one forward pass over prompt + response).

        With ``cache`` (a TransformerLens ``ActivationCache`` of a pass over exactly the task's tokens, e.g.
        ``run_with_cache(..., names_filter=at2_lens.cache_filter(model))``, or a ``CachedPatterns``) the attention is
        read from it and no forward pass runs; the task must then have a response.
        """
        if cache is not None:
            check_cache_inputs(inputs, cache)
        task = prepare_task(self.backend, inputs, max_new_tokens, target)
        t_range = task.target_token_range
        assert t_range is not None
        fpass = extract_features(self.backend.model, task.input_ids, list(task.source_token_ranges), t_range,
                                 with_logprobs=False, cache=cache)
        rows = fpass.row_features[:, :, self.layers]  # [target, source, layer, head]
        scores = rows.mean(dim=0).mean(dim=(-2, -1))
        token_scores = target_tokens = None
        if per_token:
            token_scores = rows.mean(dim=(-2, -1))
            target_tokens = task.target_tokens(self.backend.tokenizer)
        return SourceAttribution.from_task(
            task, scores, method=self.name, units="attention mass (mean over heads)", forward_passes=int(cache is None),
            token_scores=token_scores, target_tokens=target_tokens, layers=list(self.layers),
        )


class LastLayerAttention(AverageAttention):
    """Attention averaged over the heads of the last layer only (one forward pass)."""

    def __init__(self, forward_func: Any) -> None:
        super().__init__(forward_func, layers=[-1])
