"""Captum interop: ``CaptumLM`` runs Captum's LLM attribution classes on TransformerLens models, and at2_lens
results convert to ``LLMAttributionResult`` for Captum's plots."""

from __future__ import annotations

from typing import Any

import matplotlib
import pytest
import torch
from captum.attr import (
    FeatureAblation,
    LayerIntegratedGradients,
    LLMAttribution,
    LLMAttributionResult,
    LLMGradientAttribution,
    ShapleyValueSampling,
    TextTokenInput,
)

from at2_lens.attattr import AttAttrResult
from at2_lens.backends import get_backend
from at2_lens.baselines import LeaveOneOut
from at2_lens.errors import InputError, ModelNotSupportedError
from at2_lens.interop import CaptumLM, to_llm_attribution_result
from at2_lens.results import SourceAttribution
from at2_lens.tasks import ContextTask
from tests.conftest import BACKENDS

matplotlib.use("Agg")

CONTEXT = "The cat is black. Paris is the capital of France. The dog is brown."
QUERY = "What is the capital of France?"


def _labels(ticks: list[Any]) -> list[str]:
    return [t.get_text() for t in ticks]


# ------------------------------------------------------------------------------------------------ tiny models
@pytest.mark.parametrize("backend", BACKENDS)
def test_adapter_forward_and_generate_match_the_model(tiny_llama_models: dict[str, Any], backend: str) -> None:
    model = tiny_llama_models[backend]
    lm = CaptumLM(model, add_special_tokens=False)
    ids = torch.tensor([[5, 70, 71, 72, 33, 90]])
    out = lm(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    torch.testing.assert_close(out.logits, get_backend(model).run(ids))
    assert lm.device == torch.device("cpu")
    full = lm.generate(input_ids=ids, max_new_tokens=4, do_sample=False, temperature=None, top_p=None)
    new = get_backend(model).generate_greedy(ids[0], max_new_tokens=4)
    assert torch.equal(full[0, : ids.shape[1]], ids[0]) and torch.equal(full[0, ids.shape[1] :], new)


def test_adapter_refuses_bad_input(tiny_llama: Any, tiny_bert_models: dict[str, Any]) -> None:
    with pytest.raises(ModelNotSupportedError, match="decoder"):
        CaptumLM(next(iter(tiny_bert_models.values())))
    with pytest.raises(InputError, match="add_special_tokens"):
        CaptumLM(tiny_llama, add_special_tokens="yes")  # type: ignore[arg-type]
    lm = CaptumLM(tiny_llama)
    with pytest.raises(InputError, match="do_sample"):
        lm.generate(input_ids=torch.tensor([[5, 6]]), do_sample=True)
    with pytest.raises(InputError, match="input_ids"):
        lm(input_ids=torch.tensor([[5.0, 6.0]]))
    with pytest.raises(InputError, match="unsupported keyword"):
        lm(input_ids=torch.tensor([[5, 6]]), output_attentions=True)
    # The tiny tokenizer adds <|bos|> by default, while at2_lens renders its chat prompt without it: say so.
    task = ContextTask(context=CONTEXT, query=QUERY, response="Paris")
    with pytest.raises(InputError, match="add_special_tokens=False"):
        lm.template_input(task)


@pytest.mark.parametrize("backend", BACKENDS)
def test_feature_ablation_through_llm_attribution_is_remove_mode_leave_one_out(
    tiny_llama_models: dict[str, Any], backend: str
) -> None:
    model = tiny_llama_models[backend]
    lm = CaptumLM(model, add_special_tokens=False)
    task = ContextTask(context=CONTEXT, query=QUERY, response="Paris is.")
    inp, target = lm.template_input(task)
    assert inp.values == ["The cat is black.", "Paris is the capital of France.", "The dog is brown."]
    res = LLMAttribution(FeatureAblation(lm), lm.tokenizer).attribute(inp, target=target, forward_in_tokens=False)
    loo = LeaveOneOut(model, mode="remove", output="log_prob").attribute(task)
    torch.testing.assert_close(res.seq_attr.cpu(), loo.scores, atol=1e-4, rtol=1e-3)
    assert res.token_attr is not None and res.token_attr.shape == (len(target), 3)


# ------------------------------------------------------------------------------------------------- conversion
def _source_result(per_token: bool) -> SourceAttribution:
    texts = ("Alpha one.", "Beta two.", "Gamma three.")
    context = " ".join(texts)
    spans, pos = [], 0
    for t in texts:
        spans.append((pos, pos + len(t)))
        pos += len(t) + 1
    return SourceAttribution(
        scores=torch.tensor([0.1, 0.7, -0.2]), source_texts=texts, source_spans=tuple(spans), context=context,
        target_text="Beta", response="Beta two", method="test",
        token_scores=torch.tensor([[0.1, 0.6, -0.1], [0.0, 0.8, -0.3]]) if per_token else None,
        target_tokens=("Be", "ta") if per_token else None,
    )


@pytest.mark.parametrize("per_token", [False, True])
def test_source_attribution_converts_and_plots(per_token: bool) -> None:
    import matplotlib.pyplot as plt

    result = _source_result(per_token)
    llm = to_llm_attribution_result(result)
    assert isinstance(llm, LLMAttributionResult)
    assert llm.input_tokens == list(result.source_texts)
    torch.testing.assert_close(llm.seq_attr, result.scores)
    fig, ax = llm.plot_seq_attr()
    assert _labels(ax.get_xticklabels()) == list(result.source_texts)
    heights = [p.get_height() for p in ax.patches]
    assert max(heights) == pytest.approx(0.7) and min(heights) == pytest.approx(-0.2)
    plt.close(fig)
    fig, ax = llm.plot_token_attr()
    assert _labels(ax.get_xticklabels()) == list(result.source_texts)
    assert _labels(ax.get_yticklabels()) == (["Be", "ta"] if per_token else ["Beta"])
    plt.close(fig)


def test_attattr_result_converts_over_layers_heads_and_padding() -> None:
    attributions = torch.arange(2 * 2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 2, 4, 4)
    mask = torch.tensor([[1, 1, 1, 0]])
    result = AttAttrResult(attributions=attributions, layers=(3, 5), output=torch.zeros(1), attention_mask=mask)
    tokens = ["[CLS]", "good", "[SEP]", "[PAD]"]
    llm = to_llm_attribution_result(result, tokens=tokens)
    summed = attributions[0].sum(dim=(0, 1))[:3, :3]
    assert llm.input_tokens == tokens[:3] and llm.output_tokens == tokens[:3]
    torch.testing.assert_close(llm.token_attr, summed)
    torch.testing.assert_close(llm.seq_attr, summed.sum(0))
    one = to_llm_attribution_result(result, tokens=tokens, layers=[5], rows=[0])
    torch.testing.assert_close(one.token_attr, attributions[0, 1].sum(0)[:1, :3])
    with pytest.raises(InputError, match="tokens"):
        to_llm_attribution_result(result)
    with pytest.raises(InputError, match="layers"):
        to_llm_attribution_result(result, tokens=tokens, layers=[0])
    with pytest.raises(InputError, match="example"):
        to_llm_attribution_result(result, tokens=tokens, example=1)
    with pytest.raises(InputError, match="AttAttrResult"):
        to_llm_attribution_result(_source_result(False), tokens=tokens)
    with pytest.raises(InputError, match="result"):
        to_llm_attribution_result("not a result")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------- real model
@pytest.mark.real
@pytest.mark.slow
def test_captum_feature_ablation_equals_leave_one_out_on_smollm2(smollm2: Any) -> None:
    """Captum's FeatureAblation over the sources (text deleted) gives at2_lens's remove-mode leave-one-out."""
    lm = CaptumLM(smollm2)
    task = ContextTask(context=CONTEXT, query=QUERY, response="Paris")
    inp, target = lm.template_input(task)
    llm_attr = LLMAttribution(FeatureAblation(lm), lm.tokenizer)
    by_seq = llm_attr.attribute(inp, target=target, forward_in_tokens=False)
    by_tokens = llm_attr.attribute(inp, target=target)  # Captum's default token-by-token mode
    loo = LeaveOneOut(smollm2, mode="remove", output="log_prob").attribute(task)
    torch.testing.assert_close(by_seq.seq_attr.cpu(), loo.scores, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(by_tokens.seq_attr.cpu(), loo.scores, atol=2e-3, rtol=1e-3)
    assert int(loo.scores.argmax()) == 1  # the sentence naming Paris matters most
    shapley = LLMAttribution(ShapleyValueSampling(lm), lm.tokenizer).attribute(
        inp, target=target, forward_in_tokens=False, n_samples=1)
    assert shapley.seq_attr.shape == (3,) and torch.isfinite(shapley.seq_attr).all()


@pytest.mark.real
@pytest.mark.slow
def test_layer_integrated_gradients_through_the_adapter_on_smollm2(smollm2: Any) -> None:
    """LLMGradientAttribution + LayerIntegratedGradients on the embedding equals the same LIG run by hand."""
    lm = CaptumLM(smollm2)
    inp = TextTokenInput("The capital of France is", lm.tokenizer)
    target = torch.tensor(lm.tokenizer.encode(" Paris", add_special_tokens=False))
    res = LLMGradientAttribution(LayerIntegratedGradients(lm, lm.embedding_layer), lm.tokenizer).attribute(
        inp, target=target, n_steps=8)
    ids = inp.to_model_input()  # token ids (to_tensor() is Captum's all-ones feature indicator)
    assert res.input_tokens[0] == lm.tokenizer.bos_token  # plain text gets the tokenizer's BOS, as in at2_lens

    def log_p(x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(get_backend(smollm2).run(x)[:, -1], dim=-1)[:, int(target[0])]

    direct = LayerIntegratedGradients(log_p, lm.embedding_layer).attribute(ids, n_steps=8).sum(-1)[0]
    torch.testing.assert_close(res.seq_attr.cpu(), direct, atol=1e-4, rtol=1e-4)
    assert res.token_attr is not None and res.token_attr.shape == (1, ids.shape[1])


@pytest.mark.real
@pytest.mark.slow
def test_at2_result_plots_with_captum_on_smollm2(smollm2: Any) -> None:
    import matplotlib.pyplot as plt

    from at2_lens import AT2Attribution

    task = ContextTask(context=CONTEXT, query=QUERY, response="Paris is the capital.")
    result = AT2Attribution(smollm2).attribute(task, per_token=True)
    llm = to_llm_attribution_result(result)
    assert llm.token_attr is not None and llm.token_attr.shape == (len(result.target_tokens or ()), 3)
    fig, ax = llm.plot_token_attr()
    assert _labels(ax.get_xticklabels()) == list(result.source_texts)
    assert [t.strip() for t in _labels(ax.get_yticklabels())] == [t.strip() for t in result.target_tokens or ()]
    plt.close(fig)
