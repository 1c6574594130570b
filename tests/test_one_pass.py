"""Attributing a response the model generates costs the generation plus ONE forward pass: AT2's feature pass also
checks the KV-cached greedy decoding, and a failed check still falls back to decoding without the cache."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from at2_lens.at2.attribution import AT2Attribution
from at2_lens.backends import Backend, get_backend
from at2_lens.results import SourceAttribution
from at2_lens.tasks import ContextTask, prepare_task
from tests.conftest import BACKENDS, break_cached_decoding

CONTEXT = [
    "The cat sat on the mat. Dogs bark loudly at night.",
    "Paris is the capital of France. The sky is blue today.",
]


def _task(query: str = "Where is Paris?") -> ContextTask:
    return ContextTask(context=CONTEXT, query=query, response=None, sources="sentence")


@contextlib.contextmanager
def passes_after_generation(backend: Backend) -> Iterator[list[int]]:
    """Count forward passes (runs of the model's last block) outside generation; ``[0]`` holds the count."""
    count, generating = [0], [False]
    real = backend._generate_ids

    def generate_ids(*args: Any, **kwargs: Any) -> torch.Tensor:
        generating[0] = True
        try:
            return real(*args, **kwargs)
        finally:
            generating[0] = False

    def pre(module: Any, args: Any) -> None:
        if not generating[0]:
            count[0] += 1

    handle = backend.model.blocks[-1].register_forward_pre_hook(pre)
    backend._generate_ids = generate_ids  # type: ignore[method-assign]
    try:
        yield count
    finally:
        handle.remove()
        del backend._generate_ids


def _one_pass_vs_two(model: Any, task: ContextTask, max_new_tokens: int) -> tuple[SourceAttribution, int, int]:
    """AT2 on a generated response (result, forward passes after generation), and the two-pass path's count, with
    the scores of both compared."""
    backend = get_backend(model)
    _ = backend.probe  # the one-off probe is not the call's own
    at2 = AT2Attribution(model)
    with passes_after_generation(backend) as one:
        res = at2.attribute(task, max_new_tokens=max_new_tokens, per_token=True)
    assert res.task.response is not None and res.task.seq_len - res.task.prompt_len >= 2, "too short to be checked"
    # The two-pass path: prepare_task checks the generation with its own pass, then AT2 reads the features.
    with passes_after_generation(backend) as two:
        tt = prepare_task(backend, task, max_new_tokens)
        old = AT2Attribution(model).attribute(tt, per_token=True)
    assert torch.equal(tt.input_ids, res.task.input_ids)
    torch.testing.assert_close(res.scores, old.scores, atol=1e-6, rtol=0)
    torch.testing.assert_close(res.token_scores, old.token_scores, atol=1e-6, rtol=0)
    return res, one[0], two[0]


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_generated_response_costs_one_pass_after_generation(tiny_llama_models: dict, backend_name: str) -> None:
    model = tiny_llama_models[backend_name]
    assert not get_backend(model).facts.cached_generation_broken
    res, one, two = _one_pass_vs_two(model, _task(), max_new_tokens=6)
    assert one == 1 and res.extra["forward_passes"] == 1
    assert two == 2  # what it cost before: the check's pass and the feature pass


def test_a_failed_check_regenerates_without_the_cache(tiny_llama: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """When cached decoding is wrong (TL 4.3 bridges under transformers 5.24), the feature pass catches it: the
    response is generated again without the cache, with a warning, and read in a second pass."""
    backend = Backend(tiny_llama)  # its own facts: marking the cache broken must not leak into other tests
    at2 = AT2Attribution(backend)
    calls = break_cached_decoding(monkeypatch, backend)
    with pytest.warns(RuntimeWarning, match="KV cache disagrees"):
        res = at2.attribute(_task(), max_new_tokens=6)
    assert calls == [True, False] and backend.facts.cached_generation_broken
    assert res.extra["forward_passes"] == 2  # the pass that caught the bad response, and the pass of the right one
    want = prepare_task(get_backend(tiny_llama), _task(), 6)  # the shared backend: cached decoding works here
    assert torch.equal(res.task.input_ids, want.input_ids)
    torch.testing.assert_close(res.scores, AT2Attribution(tiny_llama).attribute(want).scores, atol=1e-6, rtol=0)
    # From now on this model decodes without the cache, and there is nothing left to check.
    res = at2.attribute(_task("Where is the cat?"), max_new_tokens=6)
    assert calls == [True, False, False] and res.extra["forward_passes"] == 1


def test_generate_greedy_still_checks_on_its_own(tiny_llama: Any) -> None:
    """Other callers keep the checked generation: one pass after decoding, as before."""
    backend = get_backend(tiny_llama)
    prompt = _task().tokenize(backend.tokenizer).input_ids
    with passes_after_generation(backend) as n:
        new = backend.generate_greedy(prompt, max_new_tokens=6)
    assert n[0] == (1 if len(new) >= 2 else 0)


@pytest.mark.real
def test_smollm2_generated_response_costs_one_pass(smollm2: Any) -> None:
    task = ContextTask(context=CONTEXT, query="What is the capital of France?", response=None, sources="sentence")
    backend = get_backend(smollm2)
    backend.generate_greedy(task.tokenize(backend.tokenizer).input_ids, max_new_tokens=8)  # settles the cache's fate
    res, one, two = _one_pass_vs_two(smollm2, task, max_new_tokens=8)
    # where cached decoding is broken (TL 4.3 bridges under transformers 5.24) nothing is left to check: 1 and 1
    assert (one, two) == (1, 1 if backend.facts.cached_generation_broken else 2)
    assert res.extra["forward_passes"] == 1
    assert "Paris" in (res.task.response or "")
