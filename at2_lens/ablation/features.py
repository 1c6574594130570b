"""Target-row attention features, read by hooks in one forward pass: what AT2 and the attention baselines score.

For a source ``s`` and head ``(l, h)``: ``φ[s, l, h] = Σ_{k ∈ s} mean_{t ∈ target} A^{l,h}[t, k]`` — attention
from the query rows that produce the target (:func:`~at2_lens.ablation.positions.query_rows`) to the source's
keys. Each layer's hook reduces its pattern rows to ``[row, source, head]`` immediately, so a full
``[layers, heads, N, N]`` cache never exists.

:class:`FeatureOptions` names the other one-pass feature families (measured in the model card's ceiling study):
how a source's tokens are pooled (``sum``, ``mean``, ``max``), whether each key's attention is weighted by the norm
of what it writes (``‖v_k W_O‖``, Kobayashi et al. 2020), whether the attention-sink mass (keys outside every
source: BOS, template tokens) is removed before pooling, and how target rows are weighted (uniformly, or by each
target token's surprisal or next-token entropy, known from the same pass). An estimator records the options it was
trained with, and attribution reads the same family.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from einops import einsum
from jaxtyping import Float, Int
from torch import Tensor

from at2_lens._typing import typechecked
from at2_lens._validate import check_choice
from at2_lens.ablation.outputs import target_logprobs
from at2_lens.ablation.positions import check_spans, membership, query_rows
from at2_lens.ablation.user_cache import read_cached_patterns
from at2_lens.backends import Backend, get_backend
from at2_lens.errors import InputError, NumericalError
from at2_lens.tasks import Span

SourcePooling = Literal["sum", "mean", "max"]
TargetWeighting = Literal["uniform", "surprisal", "entropy"]
SOURCE_POOLINGS: tuple[str, ...] = ("sum", "mean", "max")
TARGET_WEIGHTINGS: tuple[str, ...] = ("uniform", "surprisal", "entropy")
DEFAULT_LAYOUT = "per_head_mean_target_sum_source"
_VALUE_TAG, _SINK_TAG = "+value_norm", "+sink_removed"


@dataclass(frozen=True)
class FeatureOptions:
    """Which one-pass attention feature family to read (the default is AT2's own).

    Args:
        source_pooling: ``"sum"`` (AT2), ``"mean"`` or ``"max"`` over a source's key tokens.
        target_weighting: ``"uniform"`` mean over target rows (AT2), or rows weighted by the target token's
            surprisal (``-log p``) or by the entropy of the next-token distribution.
        value_weighted: weight each key's attention by ``‖v_k W_O^h‖`` (the norm of what the head writes from it).
        drop_sink: divide each row's attention to sources by its total attention to all sources, removing the mass
            on tokens outside every source (BOS, chat template, question).
    """

    source_pooling: SourcePooling = "sum"
    target_weighting: TargetWeighting = "uniform"
    value_weighted: bool = False
    drop_sink: bool = False

    def __post_init__(self) -> None:
        check_choice("source_pooling", self.source_pooling, SOURCE_POOLINGS)
        check_choice("target_weighting", self.target_weighting, TARGET_WEIGHTINGS)
        for name in ("value_weighted", "drop_sink"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name}: expected True or False, got {getattr(self, name)!r}")

    @property
    def layout_name(self) -> str:
        """The name recorded in estimator and store files (AT2's default: ``per_head_mean_target_sum_source``)."""
        weighting = "mean" if self.target_weighting == "uniform" else f"{self.target_weighting}_weighted"
        name = f"per_head_{weighting}_target_{self.source_pooling}_source"
        return name + (_VALUE_TAG if self.value_weighted else "") + (_SINK_TAG if self.drop_sink else "")

    @classmethod
    def from_layout_name(cls, name: str) -> FeatureOptions:
        """The options a layout name stands for; an unknown name is an InputError."""
        if not isinstance(name, str):
            raise InputError(f"feature_layout: expected a layout name, got {name!r}")
        options = _options_by_layout().get(name)
        if options is None:
            raise InputError(f"feature_layout: unknown feature layout {name!r} (e.g. {DEFAULT_LAYOUT!r})")
        return options

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@functools.cache
def _options_by_layout() -> dict[str, FeatureOptions]:
    """Every combination of options by its layout name (built once; names are checked on every load)."""
    combos = itertools.product(SOURCE_POOLINGS, TARGET_WEIGHTINGS, (False, True), (False, True))
    return {o.layout_name: o for o in (FeatureOptions(*c) for c in combos)}  # type: ignore[arg-type]


def value_norms(v: Float[Tensor, "key kv_head d_head"], w_o: Float[Tensor, "head d_head model"]) -> Tensor:
    """``‖v_k W_O^h‖`` per key and head, ``[key, head]``: the norm of what head ``h`` writes from key ``k``
    (Kobayashi et al. 2020). ``v`` is one sequence's ``hook_v``; grouped-query heads share a value head."""
    v = v.float()
    if v.shape[1] != w_o.shape[0]:
        v = v.repeat_interleave(w_o.shape[0] // v.shape[1], dim=1)
    written = einsum(v, w_o.float().to(v.device), "key head d, head d model -> key head model")
    return written.norm(dim=-1)


def target_row_weights(
    weighting: TargetWeighting, token_logprobs: Tensor, entropy: Tensor | None = None
) -> Tensor | None:
    """Unnormalised weights of the target rows: None for ``uniform``, else each target token's surprisal
    (``-log p``) or its next-token entropy, plus 1e-3 so that a span of certain tokens still has weight."""
    if weighting == "uniform":
        return None
    if weighting == "surprisal":
        return (-token_logprobs).clamp_min(0) + 1e-3
    if entropy is None:
        raise InputError("entropy: the entropy weighting needs the next-token entropy of each target row")
    return entropy.clamp_min(0) + 1e-3


@dataclass(frozen=True)
class FeaturePass:
    """What one forward pass yields: per-row features and the target tokens' log-probabilities.

    ``row_features[t, s, l, h]`` is head ``(l, h)``'s attention from the row producing target token ``t`` to
    source ``s``; averaging over any subset of rows gives the AT2 features of that sub-span, with no new pass.
    ``greedy_tokens`` are the model's own next-token choices at those rows, so the same pass can check that a
    generated target is the greedy continuation (``Backend.confirm_greedy``).
    """

    row_features: Float[Tensor, "target source layer head"]
    token_logprobs: Float[Tensor, " target"] | None
    target_range: Span
    row_weights: Float[Tensor, " target"] | None = None  # None: uniform (AT2's mean over target rows)
    greedy_tokens: Int[Tensor, " target"] | None = None  # argmax of the target rows' logits (causal models)

    def features(self, sub_range: Span | None = None) -> Float[Tensor, "source layer head"]:
        """AT2 features of the whole target, or of a token sub-range ``[a, b)`` (absolute positions) of it."""
        rows = self._rows(sub_range)
        if self.row_weights is None:
            return self.row_features[rows].mean(dim=0)
        w = self.row_weights[rows]
        return einsum(w / w.sum(), self.row_features[rows], "row, row source layer head -> source layer head")

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
    options: FeatureOptions | None = None,
    cache: Any = None,
) -> FeaturePass:
    """Read AT2 features (and the target's token log-probs) in a single forward pass.

    ``options`` chooses the feature family (default: AT2's, :class:`FeatureOptions`); row weighting by surprisal
    or entropy needs a causal model (they come from the logits of the same pass).

    ``cache``: a TransformerLens ``ActivationCache`` of a pass over exactly ``input_ids`` (or a
    :class:`~at2_lens.ablation.user_cache.CachedPatterns` around one): the features are read from its
    ``hook_pattern`` entries (see :func:`~at2_lens.ablation.user_cache.cache_filter`) with no forward pass, and are
    equal to a live pass's. There are no log-probs then (``token_logprobs`` is None), so surprisal or entropy
    row weighting is refused.
    """
    options = FeatureOptions() if options is None else options
    if not isinstance(options, FeatureOptions):
        raise InputError(f"options: expected FeatureOptions or None, got {type(options).__name__}")
    backend: Backend = get_backend(model)
    ids = backend.check_tokens(input_ids, name="input_ids")
    n = ids.shape[1]
    causal = backend.is_causal
    check_spans(source_ranges, target_range, n, causal)
    _ = backend.attention_access  # raises clearly if attention cannot be read
    if options.target_weighting != "uniform" and not causal:
        raise InputError(f"options: target_weighting={options.target_weighting!r} needs a causal (decoder) model")
    member = membership(source_ranges, n).to(backend.device)
    rows = query_rows(target_range, causal)
    if cache is not None:
        return _features_from_cache(backend, ids, source_ranges, target_range, rows, member, options, cache)
    per_layer: list[Tensor | None] = [None] * backend.n_layers
    norms: dict[int, Tensor] = {}
    w_o = backend.model.W_O.detach() if options.value_weighted else None  # [layer, head, d_head, d_model]

    def value_hook(layer: int) -> Any:
        def hook(v: Tensor, hook: Any) -> None:
            assert w_o is not None
            norms[layer] = value_norms(v[0], w_o[layer])

        return hook

    def make_hook(layer: int) -> Any:
        def hook(pattern: Tensor, hook: Any) -> None:
            per_layer[layer] = _reduce_rows(layer, pattern[0, :, rows, :], norms.get(layer), member, source_ranges,
                                            options)

        return hook

    hooks = []
    for layer in range(backend.n_layers):
        if options.value_weighted:
            hooks.append((backend.v_hook(layer), value_hook(layer)))
        hooks.append((backend.pattern_hook(layer), make_hook(layer)))
    logits = backend.run(ids, hooks)
    feats = torch.stack([p for p in per_layer if p is not None], dim=2).cpu()  # [row, source, layer, head]
    logprobs = weights = greedy = None
    if causal:
        greedy = logits[0, rows].argmax(dim=-1).cpu()
    if (with_logprobs or options.target_weighting != "uniform") and causal:
        t0, t1 = target_range
        logprobs = target_logprobs(logits[0, rows], ids[0, t0:t1]).cpu()
        entropy = None
        if options.target_weighting == "entropy":
            lp = torch.log_softmax(logits[0, rows].float(), dim=-1)
            entropy = -(lp.exp() * lp).sum(dim=-1).cpu()
        weights = target_row_weights(options.target_weighting, logprobs, entropy)
    return FeaturePass(feats, logprobs if with_logprobs else None, target_range, weights, greedy)



def _reduce_rows(
    layer: int, pattern_rows: Tensor, norms: Tensor | None, member: Tensor, source_ranges: Sequence[Span],
    options: FeatureOptions,
) -> Tensor:
    """One layer's target-row attention ``[head, row, key]`` reduced to ``[row, source, head]`` (live or cached)."""
    a = pattern_rows.float()
    if options.value_weighted:
        assert norms is not None
        a = a * norms.to(a.device).T[:, None, :]
    if options.source_pooling == "max":
        pooled = [a[:, :, s0:s1].amax(dim=-1) for s0, s1 in source_ranges]
        reduced = torch.stack(pooled, dim=-1).permute(1, 2, 0)  # [row, source, head]
    else:
        member = member.to(a.device)
        reduced = einsum(a, member, "head row key, key source -> row source head")
        if options.source_pooling == "mean":
            reduced = reduced / member.sum(dim=0)[None, :, None]
    if options.drop_sink:
        total = reduced.sum(dim=1, keepdim=True)
        reduced = torch.where(total > 0, reduced / total.clamp_min(1e-12), torch.zeros_like(reduced))
    if not torch.isfinite(reduced).all():
        raise NumericalError(
            f"attention of layer {layer} holds NaN or inf (e.g. a row whose every key is masked); refusing "
            "to return non-finite features"
        )
    return reduced


def _features_from_cache(
    backend: Backend, ids: Tensor, source_ranges: Sequence[Span], target_range: Span, rows: slice, member: Tensor,
    options: FeatureOptions, cache: Any,
) -> FeaturePass:
    """The features of :func:`extract_features`, read from the user's cache instead of a forward pass."""
    if options.target_weighting != "uniform":
        raise InputError(
            f"cache: features with target_weighting={options.target_weighting!r} need the target's logits, which "
            "a cache of attention patterns does not hold; attribute without cache="
        )
    read = read_cached_patterns(backend, cache, ids[0], rows, need_values=options.value_weighted)
    w_o = backend.model.W_O.detach() if options.value_weighted else None
    per_layer = []
    for layer, pattern in enumerate(read.patterns):
        norms = None
        if read.values is not None:
            assert w_o is not None
            norms = value_norms(read.values[layer], w_o[layer])
        per_layer.append(_reduce_rows(layer, pattern, norms, member, source_ranges, options))
    feats = torch.stack(per_layer, dim=2).cpu()  # [row, source, layer, head]
    return FeaturePass(feats, None, target_range, None)


__all__ = [
    "DEFAULT_LAYOUT",
    "SOURCE_POOLINGS",
    "TARGET_WEIGHTINGS",
    "FeatureOptions",
    "FeaturePass",
    "SourcePooling",
    "TargetWeighting",
    "extract_features",
    "target_row_weights",
    "value_norms",
]
