"""AttAttr on the real models: the MiniLM SST-2 classifier (encoder) and SmolLM2 (decoder)."""

from __future__ import annotations

import pytest
import torch

from at2_lens.attattr import AttentionAttribution, PooledOutput
from at2_lens.backends import get_backend

pytestmark = pytest.mark.real


def test_minilm_sst2_completeness_within_a_tenth_of_a_percent(minilm: object) -> None:
    from at2_lens.models.classifier import load_minilm_sst2

    clf = load_minilm_sst2(model=minilm)
    head = clf.head

    def probs(pooled: torch.Tensor) -> torch.Tensor:
        return torch.softmax(pooled @ head.weight.T + head.bias, dim=-1)

    tokens, mask = clf.tokenize(["a gorgeous, witty, seductive movie."])
    attr = AttentionAttribution(minilm, PooledOutput(probs))
    res = attr.attribute(tokens, attention_mask=mask, layers=[0, 5], n_steps=20, return_convergence_delta=True)
    assert res.attributions.shape == (2, 12, tokens.shape[1], tokens.shape[1])
    # F is the predicted class's probability; the classifier itself agrees on F(A).
    p = clf.forward(tokens, mask)[0]
    torch.testing.assert_close(res.output.reshape(-1)[0], p.max(), atol=1e-5, rtol=0)
    rel = res.relative_convergence_delta().abs()
    assert (rel <= 1e-3).all(), f"completeness error {rel.tolist()} exceeds 0.1 %"
    imp = res.head_importance()
    assert imp.shape == (2, 12) and torch.isfinite(imp).all()


def test_smollm2_next_token_attribution(smollm2: object) -> None:
    b = get_backend(smollm2)
    ids = torch.tensor(b.tokenizer("The capital of France is")["input_ids"])
    paris = b.tokenizer(" Paris", add_special_tokens=False)["input_ids"][0]
    log_p = torch.log_softmax(b.run(ids[None])[0, -1], -1).detach()
    assert int(log_p.argmax()) == paris
    res = AttentionAttribution(smollm2).attribute(ids, target=paris, layers=[29], n_steps=20,
                                                  return_convergence_delta=True)
    assert res.attributions.shape == (1, 9, len(ids), len(ids))
    assert abs(float(res.output.reshape(-1)[0]) - float(log_p[paris])) < 1e-4  # F(A) = log p(" Paris")
    assert float(res.relative_convergence_delta().abs().max()) < 1e-2
    assert list(res.by_hook_name()) == ["blocks.29.attn.hook_pattern"]


@pytest.mark.slow
def test_smollm2_auto_steps_meet_the_tolerance_on_layer_0(smollm2: object) -> None:
    """SmolLM2's first layer is where a fixed step count fails; n_steps="auto" picks enough points to meet rtol."""
    b = get_backend(smollm2)
    ids = torch.tensor(b.tokenizer("The capital of France is")["input_ids"])
    attr = AttentionAttribution(smollm2)
    res = attr.attribute(ids, layers=[0], n_steps="auto", rtol=1e-3)  # target: the predicted next token
    assert res.n_steps == "auto" and res.steps is not None and res.converged is not None
    assert bool(res.converged[0]) and 5 <= int(res.steps[0]) <= 257
    print(f"SmolLM2 layer 0, auto: {int(res.steps[0])} points, error {float(res.relative_convergence_delta()[0]):.1e}")
    assert res.convergence_delta is not None and res.baseline_output is not None
    change = float((res.output - res.baseline_output[0]).abs())
    assert abs(float(res.convergence_delta[0])) <= 1e-3 * change + 1e-5
    # the completeness target is the integer path's own: F with layer 0's attention zeroed, from its extra forward
    fixed = attr.attribute(ids, layers=[0], n_steps=2, return_convergence_delta=True)
    assert fixed.baseline_output is not None
    assert abs(float(fixed.baseline_output[0] - res.baseline_output[0])) < 1e-4 * max(1.0, abs(change))
