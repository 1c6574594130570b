"""Issue #18 (items 1 and 2): attribution from the user's own ``ActivationCache`` (no forward pass) and from the
user's own token sequence (``TokenizedTask.from_tokens``), on every backend; bad caches and bad ranges are refused
before any work."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from at2_lens import AT2Attribution, CachedPatterns, ContextTask, TargetSpan, TokenizedTask, cache_filter
from at2_lens.ablation import FeatureOptions, extract_features
from at2_lens.at2.estimator import LinearEstimator, model_fingerprint
from at2_lens.backends import get_backend, hook_names
from at2_lens.baselines import AverageAttention, LastLayerAttention
from at2_lens.errors import InputError
from tests.conftest import BACKENDS
from tests.test_bad_input_catalogue import count_forwards, fails_before_work, primed

pytestmark = pytest.mark.usefixtures("one_thread")

CONTEXT = ["The cat sat on the mat. Dogs bark loudly.", "Paris is the capital of France."]
QUERY = "Where is Paris?"
RESPONSE = "Paris is in France, I think."


def _task(**kwargs: Any) -> ContextTask:
    return ContextTask(CONTEXT, QUERY, response=RESPONSE, sources="sentence", **kwargs)


def _tokenized(model: Any) -> TokenizedTask:
    b = get_backend(model)
    return _task().tokenize(b.tokenizer, max_length=b.n_ctx)


def _cache(model: Any, ids: torch.Tensor, **kwargs: Any) -> Any:
    _, cache = model.run_with_cache(ids[None] if ids.dim() == 1 else ids, names_filter=cache_filter(model), **kwargs)
    return cache


def _random_estimator(model: Any, options: FeatureOptions | None = None) -> LinearEstimator:
    b = get_backend(model)
    weights = torch.randn(b.n_layers, b.n_heads, generator=torch.Generator().manual_seed(0))
    layout = (options or FeatureOptions()).layout_name
    return LinearEstimator(weights, model_fingerprint=model_fingerprint(b), feature_layout=layout)


@pytest.fixture(scope="module", params=BACKENDS)
def model(request: pytest.FixtureRequest, tiny_llama_models: dict[str, Any]) -> Any:
    return primed(tiny_llama_models[request.param])


# ------------------------------------------------------------------------------------------------ cache_filter
def test_cache_filter_names_every_layer_pattern(model: Any) -> None:
    b = get_backend(model)
    assert cache_filter(model) == [hook_names.pattern(layer) for layer in range(b.n_layers)]
    both = cache_filter(model, FeatureOptions(value_weighted=True))
    assert both[b.n_layers:] == [hook_names.v(layer) for layer in range(b.n_layers)]
    cache = _cache(model, _tokenized(model).input_ids)
    assert sorted(cache.keys()) == sorted(cache_filter(model))  # the smallest sufficient cache


# ------------------------------------------------------------------------------------- scores equal, no passes
@pytest.mark.parametrize("weights", ["uniform", "random", "value_weighted"])
def test_at2_from_cache_equals_a_fresh_run_with_no_forward_pass(model: Any, weights: str) -> None:
    options = FeatureOptions(value_weighted=True, drop_sink=True) if weights == "value_weighted" else None
    at2 = AT2Attribution(model, None if weights == "uniform" else _random_estimator(model, options))
    task = _task()
    fresh = at2.attribute(task, per_token=True)
    _, cache = model.run_with_cache(_tokenized(model).input_ids[None],
                                    names_filter=cache_filter(model, at2.estimator.feature_options))
    passes = at2.forward_passes
    with count_forwards() as calls:
        got = at2.attribute(task, cache=cache, per_token=True)
        sub = at2.attribute(task, target=(0, 5), cache=cache)
    assert calls == [] and at2.forward_passes == passes
    assert got.extra["forward_passes"] == 0 and sub.extra["forward_passes"] == 0
    torch.testing.assert_close(got.scores, fresh.scores, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.token_scores, fresh.token_scores, atol=1e-6, rtol=0)
    assert got.target_tokens == fresh.target_tokens and got.source_texts == fresh.source_texts
    torch.testing.assert_close(sub.scores, at2.attribute(task, target=(0, 5)).scores, atol=1e-6, rtol=0)


@pytest.mark.parametrize("cls", [AverageAttention, LastLayerAttention])
def test_attention_baselines_from_cache_equal_a_fresh_run(model: Any, cls: type[AverageAttention]) -> None:
    method = cls(model)
    fresh = method.attribute(_task(), per_token=True)
    cache = _cache(model, _tokenized(model).input_ids)
    with count_forwards() as calls:
        got = method.attribute(_task(), cache=cache, per_token=True)
    assert calls == [] and got.extra["forward_passes"] == 0 and fresh.extra["forward_passes"] == 1
    torch.testing.assert_close(got.scores, fresh.scores, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.token_scores, fresh.token_scores, atol=1e-6, rtol=0)


def test_batched_sliced_and_batchless_caches_give_the_same_scores(model: Any) -> None:
    at2 = AT2Attribution(model)
    tt = _tokenized(model)
    fresh = at2.attribute(tt)
    # A batch of two sequences of the task's length: another (row 0) and the task's own (row 1).
    batch = torch.stack([torch.roll(tt.input_ids, 3), tt.input_ids])
    cache = _cache(model, batch)
    t0, t1 = tt.target_token_range
    sliced = _cache(model, tt.input_ids, pos_slice=(t0 - 1, t1 - 1))
    batchless = _cache(model, tt.input_ids, remove_batch_dim=True)
    assert sliced[hook_names.pattern(0)].shape[-2] == t1 - t0  # only the target's query rows were kept
    with count_forwards() as calls:
        results = [
            at2.attribute(tt, cache=CachedPatterns(cache, batch_index=1)),
            at2.attribute(tt, cache=CachedPatterns(cache, tokens=batch, batch_index=1)),
            at2.attribute(tt, cache=CachedPatterns(sliced, pos_slice=(t0 - 1, t1 - 1), tokens=tt.input_ids)),
            at2.attribute(tt, cache=CachedPatterns(sliced, pos_slice=slice(t0 - 1, t1 - 1))),
            at2.attribute(tt, cache=batchless),
        ]
    assert calls == []
    for result in results:
        torch.testing.assert_close(result.scores, fresh.scores, atol=1e-6, rtol=0)
    # The same cache row for another target needs rows the slice dropped: refused.
    fails_before_work(InputError, ("cache", "pos_slice"), at2.attribute, tt, target=(0, 3),
                      cache=CachedPatterns(sliced, pos_slice=(t1 - 2, t1 - 1)))


# ----------------------------------------------------------------------------------------- bad caches refused
def test_bad_caches_are_refused_before_any_work(model: Any) -> None:
    at2 = AT2Attribution(model)
    tt = _tokenized(model)
    cache = _cache(model, tt.input_ids)
    shorter = _cache(model, tt.input_ids[:-1])
    other_ids = tt.input_ids.clone()
    other_ids[2] = (other_ids[2] + 1) % 200
    batch = _cache(model, torch.stack([tt.input_ids, other_ids]))
    missing = {k: v for k, v in cache.items() if k != hook_names.pattern(1)}
    cases: list[tuple[tuple[str, ...], Any, Any]] = [
        (("cache", "other tokens"), shorter, tt),  # a cache for other tokens (another length)
        (("cache", "other tokens"), CachedPatterns(cache, tokens=other_ids), tt),  # same length, other ids
        (("cache", hook_names.pattern(1)), missing, tt),  # a missing layer
        (("cache", "batch_index"), batch, tt),  # a batch without a batch index
        (("cache", "batch_index"), CachedPatterns(batch, batch_index=2), tt),  # outside the batch
        (("cache", "batch_index"), CachedPatterns(cache, tokens=torch.stack([tt.input_ids] * 2)), tt),
        (("cache", "response"), cache, ContextTask(CONTEXT, QUERY)),  # needs generation: a cache cannot generate
        (("cache", "ActivationCache"), [1, 2, 3], tt),  # not a cache
        (("cache", "pos_slice"), CachedPatterns(cache, pos_slice=3), tt),  # an int slice drops the query axis
    ]
    for names, bad, task in cases:
        fails_before_work(InputError, names, at2.attribute, task, cache=bad)
    fails_before_work(InputError, "cache", AverageAttention(model).attribute, tt, cache=shorter)
    fails_before_work(InputError, "cache", CachedPatterns, cache, batch_index="0")
    surprisal = AT2Attribution(model, _random_estimator(model, FeatureOptions(target_weighting="surprisal")))
    fails_before_work(InputError, ("cache", "logits"), surprisal.attribute, tt, cache=cache)
    value_weighted = AT2Attribution(model, _random_estimator(model, FeatureOptions(value_weighted=True)))
    fails_before_work(InputError, ("cache", "hook_v"), value_weighted.attribute, tt, cache=cache)
    # extract_features itself validates the same way
    src, tgt = list(tt.source_token_ranges), tt.target_token_range
    fails_before_work(InputError, "cache", extract_features, model, tt.input_ids, src, tgt, cache=shorter)


# ---------------------------------------------------------------------------------------- the user's own tokens
def test_from_tokens_equals_the_context_task_path(model: Any) -> None:
    tok = get_backend(model).tokenizer
    at2 = AT2Attribution(model)
    tt = _tokenized(model)
    src, tgt = list(tt.source_token_ranges), tt.target_token_range
    own = TokenizedTask.from_tokens(tt.input_ids, src, tgt, tokenizer=tok)
    assert torch.equal(own.input_ids, tt.input_ids) and own.source_token_ranges == tt.source_token_ranges
    assert own.target_token_range == tgt and own.source_texts == tt.source_texts and own.target_text == RESPONSE
    via_task = at2.attribute(_task(), per_token=True)
    mine = at2.attribute(own, per_token=True)
    torch.testing.assert_close(mine.scores, via_task.scores, atol=1e-6, rtol=0)
    torch.testing.assert_close(mine.token_scores, via_task.token_scores, atol=1e-6, rtol=0)
    # With the cache too, and with the response starting earlier than the target (a sub-span of it).
    cache = _cache(model, tt.input_ids)
    t0, t1 = tgt
    part = TokenizedTask.from_tokens(tt.input_ids.tolist(), src, (t0 + 2, t1), tokenizer=tok, response_start=t0)
    with count_forwards() as calls:
        from_cache = at2.attribute(own, cache=cache)
        part_cached = at2.attribute(part, cache=cache)
        baseline = AverageAttention(model).attribute(own, cache=cache)
    assert calls == []
    torch.testing.assert_close(from_cache.scores, via_task.scores, atol=1e-6, rtol=0)
    sub_span = at2.attribute(_task(), target=TargetSpan(2, t1 - t0, "token"))
    torch.testing.assert_close(part_cached.scores, sub_span.scores, atol=1e-6, rtol=0)
    torch.testing.assert_close(baseline.scores, AverageAttention(model).attribute(_task()).scores, atol=1e-6, rtol=0)


def test_from_tokens_refuses_bad_ranges_before_any_pass(model: Any) -> None:
    tok = get_backend(model).tokenizer
    tt = _tokenized(model)
    ids, n = tt.input_ids, tt.seq_len
    (a0, b0), (a1, b1) = tt.source_token_ranges[:2]
    t0, t1 = tt.target_token_range
    cases: list[tuple[str, dict[str, Any]]] = [
        ("sources", {"sources": []}),
        ("sources[0]", {"sources": [(b0, a0)]}),  # reversed
        ("sources[0]", {"sources": [(a0, a0)]}),  # empty
        ("sources[1]", {"sources": [(a0, b0), (a1, n + 1)]}),  # outside the sequence
        ("sources[1]", {"sources": [(a0, b0), (a0 + 1, b1)]}),  # overlapping
        ("sources[1]", {"sources": [(a1, b1), (a0, b0)]}),  # out of order
        ("sources[0]", {"sources": ["ab"]}),
        ("target", {"target": (t1, t0)}),
        ("target", {"target": (t0, n + 1)}),
        ("target", {"target": (a1, b1)}),  # not after the sources
        ("response_start", {"response_start": t0 + 1}),  # after the target's start
        ("response_start", {"response_start": a0}),  # inside the sources
        ("tokens", {"tokens": []}),
        ("tokens", {"tokens": "abc"}),
        ("tokens", {"tokens": torch.tensor([[1, 2], [3, 4]])}),
        ("tokens", {"tokens": [-1, *ids.tolist()[1:]]}),
        ("max_length", {"max_length": n - 1}),
    ]
    at2 = AT2Attribution(model)
    for name, change in cases:
        kwargs: dict[str, Any] = {"tokens": ids, "sources": list(tt.source_token_ranges), "target": (t0, t1),
                                  "tokenizer": tok, **change}
        fails_before_work(InputError, name, lambda kw=kwargs: at2.attribute(TokenizedTask.from_tokens(**kw)))


# ------------------------------------------------------------------------------------------------------ real
@pytest.mark.real
def test_smollm2_own_tokens_from_a_cache(smollm2: Any) -> None:
    """SmolLM2 with a prompt format of the user's own (no chat template): from_tokens + run_with_cache give the
    scores of the ContextTask path for the same tokens, with no forward pass."""
    tok = get_backend(smollm2).tokenizer
    at2 = AT2Attribution.for_model(smollm2)
    task = ContextTask(CONTEXT, QUERY, response=" Paris is in France.", sources="sentence", prompt_format="plain")
    tt = task.tokenize(tok)
    own = TokenizedTask.from_tokens(tt.input_ids, list(tt.source_token_ranges), tt.target_token_range, tokenizer=tok)
    _, cache = smollm2.run_with_cache(own.input_ids[None], names_filter=cache_filter(smollm2))
    via_task = at2.attribute(task)
    with count_forwards() as calls:
        mine = at2.attribute(own, cache=cache)
    assert calls == [] and mine.extra["forward_passes"] == 0
    torch.testing.assert_close(mine.scores, via_task.scores, atol=1e-6, rtol=0)
    assert mine.source_texts == via_task.source_texts
    fails_before_work(InputError, "cache", at2.attribute, own, cache=CachedPatterns(cache, tokens=own.input_ids[:-1]))
