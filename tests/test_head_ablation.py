"""Head ablation with plain TransformerLens hooks: ``top_heads`` and ``ablate_heads_hooks`` (``hook_z``)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from at2_lens.attattr.head_importance import head_mask_hooks
from at2_lens.backends import get_backend
from at2_lens.errors import InputError
from at2_lens.head_ablation import ablate_heads_hooks, heads_from_mask, top_heads
from tests.conftest import BACKENDS


def test_top_heads_orders_by_score_and_breaks_ties_by_position() -> None:
    scores = torch.tensor([[0.1, 0.9, 0.3], [0.9, -1.0, 0.2]])
    assert top_heads(scores, 3) == [(0, 1), (1, 0), (0, 2)]
    assert top_heads(scores, 2, largest=False) == [(1, 1), (0, 0)]
    assert heads_from_mask(scores > 0.25) == [(0, 1), (0, 2), (1, 0)]
    with pytest.raises(InputError, match="k"):
        top_heads(scores, 0)
    with pytest.raises(InputError, match="k"):
        top_heads(scores, 7)
    with pytest.raises(InputError, match="NaN"):
        top_heads(torch.tensor([[float("nan"), 1.0]]), 1)


def test_hooks_group_heads_by_layer_and_refuse_bad_heads(tiny_llama: Any) -> None:
    hooks = ablate_heads_hooks([(1, 0), (0, 1), (1, 1), (1, 0)], tiny_llama)
    assert [name for name, _ in hooks] == ["blocks.0.attn.hook_z", "blocks.1.attn.hook_z"]
    assert ablate_heads_hooks([]) == []
    cfg = tiny_llama.cfg
    with pytest.raises(InputError, match="outside"):
        ablate_heads_hooks([(cfg.n_layers, 0)], tiny_llama)
    with pytest.raises(InputError, match="outside"):
        ablate_heads_hooks([(0, cfg.n_heads)], tiny_llama)
    with pytest.raises(InputError, match="pairs"):
        ablate_heads_hooks([(0, -1)])
    with pytest.raises(InputError, match="pairs"):
        ablate_heads_hooks([(0, 1, 2)])  # type: ignore[list-item]
    with pytest.raises(InputError, match="boolean"):
        ablate_heads_hooks(torch.zeros(2, 2))


@pytest.mark.parametrize("arch", ["llama", "bert"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_zeroing_hook_z_equals_masking_the_heads_pattern(
    tiny_llama_models: dict[str, Any], tiny_bert_models: dict[str, Any], arch: str, backend: str
) -> None:
    """``z = A · V``: zeroing a head's z is zeroing its pattern, which at2_lens's pruning does via the backend."""
    model = (tiny_llama_models if arch == "llama" else tiny_bert_models)[backend]
    b = get_backend(model)
    mask = torch.zeros(b.n_layers, b.n_heads, dtype=torch.bool)
    mask[0, 1] = mask[b.n_layers - 1, 0] = True
    tokens = torch.tensor([[5, 40, 41, 42, 43, 44, 45]])
    clean = b.run(tokens)
    by_z = model.run_with_hooks(tokens, fwd_hooks=ablate_heads_hooks(mask, model))
    by_pattern = b.run(tokens, head_mask_hooks(b, mask))
    torch.testing.assert_close(by_z, by_pattern, atol=1e-5, rtol=1e-4)
    assert (by_z - clean).abs().max() > 1e-3  # the ablation did something


def test_attattr_head_importance_feeds_an_ablation(tiny_llama: Any) -> None:
    """AttAttr's ``[layer, head]`` importance goes straight into ``top_heads`` and ``run_with_hooks``."""
    from at2_lens import AttentionAttribution

    tokens = torch.tensor([5, 40, 41, 42, 43, 44])
    res = AttentionAttribution(tiny_llama).attribute(tokens, n_steps=4)
    importance = res.head_importance()
    b = get_backend(tiny_llama)
    assert importance.shape == (b.n_layers, b.n_heads)
    assert set(res.by_hook_name()) == {f"blocks.{layer}.attn.hook_pattern" for layer in range(b.n_layers)}
    ablated = tiny_llama.run_with_hooks(tokens[None], fwd_hooks=ablate_heads_hooks(top_heads(importance, 2)))
    assert (ablated - b.run(tokens[None])).abs().max() > 1e-4


@pytest.mark.real
@pytest.mark.slow
def test_top_at2_heads_ablation_on_smollm2(smollm2: Any) -> None:
    """The shipped estimator's top heads, ablated at hook_z, change the answer's log-probability, exactly as
    masking their attention patterns does."""
    import at2_lens
    from at2_lens import AT2Attribution, ContextTask
    from at2_lens.ablation import span_output
    from at2_lens.tasks import prepare_task

    at2 = AT2Attribution(smollm2, estimator=at2_lens.load_estimator())
    weights = at2.head_weights
    assert weights.shape == (30, 9)
    heads = top_heads(weights, 5)
    assert float(weights[heads[0]]) == float(weights.max())
    task = prepare_task(at2.backend, ContextTask(
        context="The cat is black. Paris is the capital of France. The dog is brown.",
        query="What is the capital of France?", response="Paris"))
    ids = task.input_ids[None]
    t0, t1 = task.target_token_range or (0, 0)

    def log_p(logits: torch.Tensor) -> float:
        return float(span_output(logits[:, t0 - 1 : t1 - 1], ids[:, t0:t1], "log_prob"))

    mask = torch.zeros(30, 9, dtype=torch.bool)
    for layer, head in heads:
        mask[layer, head] = True
    with torch.no_grad():
        clean = log_p(smollm2(ids))
        by_z = log_p(smollm2.run_with_hooks(ids, fwd_hooks=ablate_heads_hooks(heads, smollm2)))
        by_pattern = log_p(at2.backend.run(ids, head_mask_hooks(at2.backend, mask)))
    assert abs(by_z - clean) > 0.05
    assert by_z == pytest.approx(by_pattern, abs=2e-3)
