"""Baselines (attention averages, leave-one-out, ContextCite, gradient x input, integrated gradients) on tiny models:
the Captum contract, the recorded cost, and agreement with the same quantity computed by hand."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from captum.attr import Attribution, GradientAttribution, PerturbationAttribution

from at2_lens.ablation import mask_mode_outputs, random_masks, removal_builder, remove_mode_outputs, span_output
from at2_lens.at2.attribution import AT2Attribution
from at2_lens.backends import get_backend
from at2_lens.baselines import (
    AverageAttention,
    ContextCite,
    GradientXInput,
    IntegratedGradientsAttribution,
    LastLayerAttention,
    LeaveOneOut,
    fit_lasso_surrogate,
    sources_from_tokens,
)
from at2_lens.errors import InputError
from at2_lens.results import SourceAttribution
from at2_lens.tasks import ContextTask, TokenizedTask
from tests.conftest import BACKENDS

CONTEXT = [
    "The cat sat on the mat. Dogs bark loudly at night.",
    "Paris is the capital of France. The sky is blue today.",
]


def _task(response: str = "The answer is here.") -> ContextTask:
    return ContextTask(context=CONTEXT, query="Which city?", response=response, sources="sentence")


def _tokenized(model: Any) -> TokenizedTask:
    b = get_backend(model)
    return _task().tokenize(b.tokenizer, max_length=b.n_ctx)


def _check(result: SourceAttribution, task: TokenizedTask, forward: int, backward: int) -> None:
    assert result.scores.shape == (task.n_sources,)
    assert torch.isfinite(result.scores).all()
    assert result.extra["forward_passes"] == forward and result.extra["backward_passes"] == backward
    assert result.task is not None and result.task.source_spans == task.source_spans


@pytest.mark.parametrize(
    ("cls", "base", "kwargs"),
    [
        (AverageAttention, Attribution, {}),
        (LastLayerAttention, Attribution, {}),
        (LeaveOneOut, PerturbationAttribution, {}),
        (ContextCite, PerturbationAttribution, {"n_ablations": 8}),
        (GradientXInput, GradientAttribution, {}),
        (IntegratedGradientsAttribution, GradientAttribution, {"n_steps": 4}),
    ],
)
def test_every_baseline_keeps_the_contract(tiny_llama: Any, cls: type, base: type, kwargs: dict[str, Any]) -> None:
    method = cls(tiny_llama, **kwargs)
    assert isinstance(method, base) and not method.has_convergence_delta()
    task = _tokenized(tiny_llama)
    result = method.attribute(_task())  # a ContextTask is tokenized on the way
    s = task.n_sources
    expected = {
        AverageAttention: (1, 0), LastLayerAttention: (1, 0), LeaveOneOut: (s + 1, 0), ContextCite: (8, 0),
        GradientXInput: (1, 1), IntegratedGradientsAttribution: (5, 4),
    }[cls]
    _check(result, task, *expected)
    assert result.source_texts == task.source_texts and result.response == "The answer is here."
    # The target argument means what it means for AT2Attribution: a character range of the response.
    sub = method.attribute(task, target=(4, 10))
    assert sub.target_text == "answer" and sub.scores.shape == (s,)


def test_average_attention_is_uniform_at2_and_last_layer_is_read_by_hand(tiny_llama: Any) -> None:
    task = _tokenized(tiny_llama)
    avg = AverageAttention(tiny_llama).attribute(task)
    torch.testing.assert_close(avg.scores, AT2Attribution(tiny_llama).attribute(task).scores, atol=1e-6, rtol=1e-5)
    b = get_backend(tiny_llama)
    last = b.n_layers - 1
    _, cache = b.model.run_with_cache(task.input_ids[None], names_filter=lambda n: n.endswith("hook_pattern"))
    t0, t1 = task.target_token_range
    rows = cache[f"blocks.{last}.attn.hook_pattern"][0, :, t0 - 1 : t1 - 1]  # [head, row, key]
    expected = torch.stack([rows[:, :, a:e].sum(-1).mean() for a, e in task.source_token_ranges])
    torch.testing.assert_close(LastLayerAttention(tiny_llama).attribute(task).scores, expected, atol=1e-6, rtol=1e-5)
    per_token = AverageAttention(tiny_llama).attribute(task, per_token=True)
    assert per_token.token_scores is not None and per_token.token_scores.shape == (t1 - t0, task.n_sources)
    with pytest.raises(InputError, match="layers"):
        AverageAttention(tiny_llama, layers=[b.n_layers])


@pytest.mark.parametrize("mode", ["mask", "remove"])
def test_leave_one_out_equals_the_direct_ablation(tiny_llama: Any, mode: str) -> None:
    task = _tokenized(tiny_llama)
    n = task.n_sources
    masks = torch.cat([torch.ones(1, n, dtype=torch.bool), ~torch.eye(n, dtype=torch.bool)])
    if mode == "mask":
        out = mask_mode_outputs(tiny_llama, task.input_ids, list(task.source_token_ranges), task.target_token_range,
                                masks, output="log_prob")
    else:
        build = removal_builder(get_backend(tiny_llama).tokenizer, task)
        out = remove_mode_outputs(tiny_llama, build, masks, output="log_prob")
    result = LeaveOneOut(tiny_llama, mode=mode, output="log_prob").attribute(task)
    torch.testing.assert_close(result.scores, out[0] - out[1:], atol=1e-5, rtol=1e-4)
    assert result.extra["mode"] == mode and math.isclose(result.extra["full_output"], float(out[0]), rel_tol=1e-5)
    with pytest.raises(InputError, match="mode"):
        LeaveOneOut(tiny_llama, mode="drop")  # type: ignore[arg-type]


def test_contextcite_recovers_the_weights_of_a_linear_target(tiny_llama: Any) -> None:
    """With an injected, exactly linear ablation function the LASSO surrogate finds its weights (shrunk by about
    alpha / std(mask) = 0.02) and its intercept."""
    task = _tokenized(tiny_llama)
    n = task.n_sources
    w = torch.tensor([2.0, 0.0, -1.0, 0.5])[:n]
    calls: list[torch.Tensor] = []

    def linear(t: TokenizedTask, masks: torch.Tensor) -> torch.Tensor:
        assert t.n_sources == n
        calls.append(masks)
        return masks.float() @ w + 3.0

    cc = ContextCite(tiny_llama, 256, ablate=linear)
    result = cc.attribute(task)
    assert len(calls) == 1 and calls[0].shape == (256, n) and result.extra["forward_passes"] == 256
    assert torch.equal(calls[0], cc.masks_for(n))
    torch.testing.assert_close(result.scores, w, atol=0.05, rtol=0)
    assert abs(result.extra["intercept"] - 3.0) < 0.05
    assert "logit-probability" in result.units
    with pytest.raises(InputError, match="n_ablations"):
        ContextCite(tiny_llama, 1)


def test_lasso_surrogate_is_the_contextcite_fit() -> None:
    masks = random_masks(5, 64, seed=1)
    masks[:, 4] = True  # never ablated: no information, weight 0
    y = masks.float() @ torch.tensor([1.0, -2.0, 0.0, 0.3, 7.0]) - 1.0
    w, b = fit_lasso_surrogate(masks, y, alpha=1e-6)
    torch.testing.assert_close(w[:4], torch.tensor([1.0, -2.0, 0.0, 0.3]), atol=1e-3, rtol=0)
    assert w[4] == 0.0 and abs(b - 6.0) < 1e-3  # the constant column's effect lands in the intercept
    # The penalty shrinks weights and zeroes small ones.
    w_big, _ = fit_lasso_surrogate(masks, y, alpha=0.2)
    assert w_big[3] == 0.0 and 0 < w_big[0] < 1.0
    with pytest.raises(InputError, match="alpha"):
        fit_lasso_surrogate(masks, y, alpha=0.0)


def _output_with_embedding_edit(model: Any, task: TokenizedTask, edit: Any) -> torch.Tensor:
    """The target's logit-prob with ``edit(embeddings)`` substituted at ``hook_embed``."""
    b = get_backend(model)
    t0, t1 = task.target_token_range
    logits = b.run(task.input_ids[None], [("hook_embed", lambda x, hook: edit(x))])
    return span_output(logits[:, t0 - 1 : t1 - 1], task.input_ids[None, t0:t1], "logit_prob")[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_x_input_equals_autograd_by_hand(tiny_llama_models: dict[str, Any], backend: str) -> None:
    model = tiny_llama_models[backend]
    task = _tokenized(model)
    seen: dict[str, torch.Tensor] = {}

    def leaf(x: torch.Tensor) -> torch.Tensor:
        seen["e"] = x.detach().requires_grad_(True)
        return seen["e"]

    with torch.enable_grad():
        y = _output_with_embedding_edit(model, task, leaf)
        (grad,) = torch.autograd.grad(y, seen["e"])
    per_token = (grad * seen["e"]).sum(-1)[0].detach()
    expected = sources_from_tokens(per_token, task.source_token_ranges)
    result = GradientXInput(model).attribute(task)
    torch.testing.assert_close(result.scores, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_integrated_gradients_are_complete(tiny_llama_models: dict[str, Any], backend: str) -> None:
    """Scores sum to F(x) − F(sources' embeddings zeroed), the path's end points (Gauss–Legendre, 40 steps; 20
    leave ~0.7 % on this model, the integrand being steep near the zero end where RMSNorm divides by ~eps)."""
    model = tiny_llama_models[backend]
    task = _tokenized(model)

    def zero_sources(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        for a, e in task.source_token_ranges:
            x[:, a:e] = 0.0
        return x

    with torch.no_grad():
        full = _output_with_embedding_edit(model, task, lambda x: x)
        zeroed = _output_with_embedding_edit(model, task, zero_sources)
    result = IntegratedGradientsAttribution(model, n_steps=40, check_completeness=True).attribute(task)
    gap = float(full - zeroed)
    assert abs(float(result.scores.sum()) - gap) <= 1e-3 * abs(gap) + 1e-5
    assert math.isclose(result.extra["full_output"], float(full), rel_tol=1e-5)
    assert math.isclose(result.extra["baseline_output"], float(zeroed), rel_tol=1e-5)
    assert abs(result.extra["completeness_gap"]) <= 1e-3 * abs(gap) + 1e-5
    assert result.extra["forward_passes"] == 42 and result.extra["backward_passes"] == 40
    with pytest.raises(InputError, match="n_steps"):
        IntegratedGradientsAttribution(model, n_steps=0)
