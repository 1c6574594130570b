"""AT2Refined: the shrunk surrogate's algebra, its limits, the Captum contract and its cost; a real SmolLM2 run."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from captum.attr import PerturbationAttribution

from at2_lens.ablation import random_masks
from at2_lens.at2.estimator import LinearEstimator
from at2_lens.at2.refined import AT2Refined, fit_shrunk_surrogate
from at2_lens.backends import get_backend
from at2_lens.errors import InputError
from at2_lens.evaluation.methods import build_method
from at2_lens.results import SourceAttribution
from at2_lens.tasks import ContextTask

CONTEXT = [
    "The cat sat on the mat. Dogs bark loudly at night.",
    "Paris is the capital of France. The sky is blue today.",
]


def _task() -> ContextTask:
    return ContextTask(context=CONTEXT, query="Which city?", response="Paris is the city.", sources="sentence")


def _linear_problem(n_masks: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    true = torch.tensor([3.0, -1.0, 0.5, 0.0, 2.0])
    masks = torch.rand(n_masks, 5, generator=g) < 0.5
    return masks, 1.0 + masks.float() @ true, true


@pytest.mark.line_independent
def test_with_many_masks_the_fit_recovers_the_linear_truth_whatever_the_prior() -> None:
    masks, y, true = _linear_problem(400)
    wrong_prior = torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0])
    w, intercept, _ = fit_shrunk_surrogate(masks, y, wrong_prior, shrinkage=0.5)
    assert torch.allclose(w, true, atol=0.05)
    assert intercept == pytest.approx(1.0, abs=0.05)


@pytest.mark.line_independent
def test_a_prior_proportional_to_the_truth_is_rescaled_and_kept() -> None:
    masks, y, true = _linear_problem(6)
    w, _, scale = fit_shrunk_surrogate(masks, y, true / 10.0, shrinkage=0.5)
    assert scale == pytest.approx(10.0, rel=1e-4)
    assert torch.allclose(w, true, atol=1e-4)  # nothing left to correct: the residual is zero


@pytest.mark.line_independent
def test_stronger_shrinkage_stays_closer_to_the_scaled_prior() -> None:
    masks, y, _ = _linear_problem(8, seed=1)
    prior = torch.tensor([1.0, 0.0, 0.0, 0.5, 0.5])
    dist = []
    for shrinkage in (0.1, 10.0, 1000.0):
        w, _, scale = fit_shrunk_surrogate(masks, y, prior, shrinkage=shrinkage)
        dist.append(float((w - scale * prior).norm()))
    assert dist[0] > dist[1] > dist[2]
    assert dist[2] < 0.05 * dist[0]


@pytest.mark.line_independent
def test_prior_scale_pulls_the_fitted_scale() -> None:
    masks, y, true = _linear_problem(4, seed=2)
    prior = true / 10.0
    free = fit_shrunk_surrogate(masks, y, prior, shrinkage=0.5)[2]
    pulled = fit_shrunk_surrogate(masks, y, prior, shrinkage=1e6, prior_scale=1.0)[2]
    assert free == pytest.approx(10.0, rel=1e-3)
    assert pulled == pytest.approx(1.0, abs=0.01)


@pytest.mark.line_independent
def test_fit_refuses_bad_input() -> None:
    masks, y, true = _linear_problem(4)
    with pytest.raises(InputError, match="prior: expected 5 scores"):
        fit_shrunk_surrogate(masks, y, true[:3])
    with pytest.raises(InputError, match="shrinkage"):
        fit_shrunk_surrogate(masks, y, true, shrinkage=0.0)
    with pytest.raises(InputError, match="at least 2 ablations"):
        fit_shrunk_surrogate(masks[:1], y[:1], true)


def test_refined_keeps_the_captum_contract_and_reports_its_passes(tiny_llama: Any) -> None:
    refined = AT2Refined(tiny_llama, LinearEstimator.uniform(2, 4), n_ablations=4)
    assert isinstance(refined, PerturbationAttribution) and not refined.has_convergence_delta()
    first = refined.attribute(_task())
    assert isinstance(first, SourceAttribution) and first.task is not None
    assert first.extra["forward_passes"] == 1 + 4  # AT2's pass + the ablations
    assert first.extra["n_ablations"] == 4 and "surrogate" in first.units
    again = refined.attribute(first.task)
    assert again.extra["forward_passes"] == 4  # AT2's pass is cached for the same response
    assert torch.allclose(first.scores, again.scores)


def test_refined_equals_the_surrogate_fitted_by_hand(tiny_llama: Any) -> None:
    est = LinearEstimator.uniform(2, 4)
    outputs: dict[str, torch.Tensor] = {}

    def ablate(task: Any, keep: torch.Tensor) -> torch.Tensor:  # a known linear truth instead of the model
        out = 0.3 + keep.float() @ torch.arange(1.0, keep.shape[1] + 1)
        outputs["y"] = out
        return out

    refined = AT2Refined(tiny_llama, est, n_ablations=6, ablate=ablate)
    result = refined.attribute(_task())
    prior = refined.at2.attribute(result.task).scores
    masks = random_masks(result.task.n_sources, 6, 0.5, seed=0, index=result.task.n_sources)
    expected, _, _ = fit_shrunk_surrogate(masks, outputs["y"], prior, 0.5)
    assert torch.allclose(result.scores, expected, atol=1e-6)


def test_refined_checks_arguments_before_any_pass(tiny_llama: Any) -> None:
    backend = get_backend(tiny_llama)
    _ = backend.attention_access
    for kwargs, name in (({"n_ablations": 1}, "n_ablations"), ({"shrinkage": -1.0}, "shrinkage"),
                         ({"keep_prob": 1.5}, "keep_prob"), ({"mode": "drop"}, "mode")):
        with pytest.raises(InputError, match=name):
            AT2Refined(tiny_llama, LinearEstimator.uniform(2, 4), **kwargs)


def test_evaluate_knows_at2_refined_names(tiny_llama: Any) -> None:
    label, method = build_method(tiny_llama, "at2_refined4", estimator=LinearEstimator.uniform(2, 4))
    assert label == "at2_refined4" and isinstance(method, AT2Refined) and method.n_ablations == 4
    label, method = build_method(tiny_llama, "at2_refined", estimator=LinearEstimator.uniform(2, 4))
    assert label == "at2_refined8" and method.n_ablations == 8
    label, method = build_method(tiny_llama, "at2_refined8_remove", estimator=LinearEstimator.uniform(2, 4))
    assert label == "at2_refined8_remove" and method.mode == "remove"


@pytest.mark.real
@pytest.mark.slow
def test_refined_on_smollm2_ranks_the_answer_sentence_first(smollm2: Any) -> None:
    task = ContextTask(
        context="The museum opened in 1901. Its height is 8,849 metres. The river is long.",
        query="How high is Mount Everest?", response="8,849 metres.", sources="sentence",
    )
    result = AT2Refined(smollm2, n_ablations=8).attribute(task)
    assert result.extra["forward_passes"] == 9
    assert int(result.scores.argmax()) == 1
    assert "logit-probability" in result.units
