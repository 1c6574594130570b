"""The backend layer: model facts, the editability probe, input validation."""

from __future__ import annotations

import pytest
import torch

from at2_lens.backends import Backend, get_backend, model_kind
from at2_lens.errors import InputError, ModelNotSupportedError
from tests.conftest import BACKENDS, HOOKED_AVAILABLE, sdpa_bert_bridge


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_decoder_facts(tiny_llama_models: dict, backend_name: str) -> None:
    b = get_backend(tiny_llama_models[backend_name])
    assert (b.n_layers, b.n_heads, b.n_kv_heads, b.d_model) == (2, 4, 2, 64)
    assert b.is_causal
    assert b.architecture == "LlamaForCausalLM"
    assert b.attention_access == "pattern"
    assert b.tokenizer.chat_template
    assert b.pattern_hook(1) == "blocks.1.attn.hook_pattern"
    assert get_backend(tiny_llama_models[backend_name]) is b  # cached per model


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_encoder_facts(tiny_bert_models: dict, backend_name: str) -> None:
    b = get_backend(tiny_bert_models[backend_name])
    assert (b.n_layers, b.n_heads, b.n_kv_heads) == (2, 4, 4)
    assert not b.is_causal
    # HookedEncoder edits hook_pattern; BERT bridges fire hook_pattern only after the output, so the z fallback
    # (pattern rebuilt from q and k) is used there.
    assert b.attention_access == ("pattern" if b.kind == "hooked_encoder" else "z")
    assert b.probe.z_route == ("pattern" if b.kind == "hooked_encoder" else "qk")


def test_bridge_with_sdpa_attention_is_refused_clearly() -> None:
    """A BERT bridge over an sdpa-attention model never fires hook_pattern on TL 3.9: nothing can work."""
    b = get_backend(sdpa_bert_bridge())
    assert not b.probe.pattern_readable
    with pytest.raises(ModelNotSupportedError, match="hook_pattern never fires"):
        _ = b.attention_access


def test_no_working_intervention_raises(tiny_llama: object, monkeypatch: pytest.MonkeyPatch) -> None:
    from at2_lens.backends.probe import AttentionProbe

    b = Backend(tiny_llama)
    b.__dict__["probe"] = AttentionProbe(True, True, False, False, None, False)
    with pytest.raises(ModelNotSupportedError, match="cannot be intervened on"):
        _ = b.attention_access


def test_native_bridge_routes_agree() -> None:
    """``boot_native`` bridges: TL 3.9 drops pattern edits silently (z route), TL 4.x takes them; both exact."""
    import warnings

    from at2_lens.backends import _tl
    from at2_lens.interventions import mask_keys

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = _tl.bridge_class().boot_native(
            {"n_layers": 2, "d_model": 32, "n_ctx": 64, "d_head": 8, "n_heads": 4, "d_vocab": 100,
             "act_fn": "gelu", "d_mlp": 64}
        )
    toks = torch.tensor([[5, 17, 33, 41, 52, 60, 71, 88]])
    keep = torch.ones(1, 8, dtype=torch.bool)
    keep[0, 2:4] = False
    auto = get_backend(m)
    if HOOKED_AVAILABLE:
        assert not auto.probe.pattern_editable and auto.attention_access == "z"
    outs = {}
    for mode in ("pattern", "z"):
        b = Backend(m, attention_access=mode)  # type: ignore[arg-type]
        try:
            outs[mode] = b.run(toks, b.all_layer_pattern_hooks(mask_keys(keep)))
        except ModelNotSupportedError:
            continue
    assert "z" in outs
    if "pattern" in outs:
        torch.testing.assert_close(outs["pattern"], outs["z"], atol=1e-5, rtol=0)
    assert not torch.allclose(outs["z"], auto.run(toks))


def test_unsupported_model_is_refused() -> None:
    with pytest.raises(ModelNotSupportedError, match="expected a TransformerLens"):
        model_kind(torch.nn.Linear(2, 2))
    with pytest.raises(ModelNotSupportedError):
        Backend(torch.nn.Linear(2, 2))


def test_forcing_an_access_mode_that_does_not_work_fails(tiny_bert_models: dict) -> None:
    b = Backend(tiny_bert_models["bridge"], attention_access="pattern")
    with pytest.raises(ModelNotSupportedError, match="cannot be intervened on"):
        _ = b.attention_access


def test_bad_access_mode_named(tiny_llama: object) -> None:
    with pytest.raises(InputError, match="attention_access"):
        Backend(tiny_llama, attention_access="q")  # type: ignore[arg-type]


def test_check_tokens_errors(tiny_llama: object) -> None:
    b = get_backend(tiny_llama)
    with pytest.raises(InputError, match=r"token ids must lie in \[0, 259\)"):
        b.check_tokens(torch.tensor([[1, 2, 10_000]]))
    with pytest.raises(InputError, match="exceed the model's context window of 512"):
        b.check_tokens(torch.ones(1, 513, dtype=torch.long))
    with pytest.raises(InputError, match="integer token ids"):
        b.check_tokens(torch.ones(1, 3))
    with pytest.raises(InputError, match="attention_mask"):
        b.check_tokens(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(InputError, match="layers"):
        b.check_layers([0, 2])


def test_greedy_generation_agrees_across_backends(tiny_llama_models: dict) -> None:
    prompt = torch.tensor([256, 72, 101, 108, 108, 111])
    outs = [get_backend(m).generate_greedy(prompt, max_new_tokens=5) for m in tiny_llama_models.values()]
    assert outs[0].shape == (5,) or len(outs[0]) <= 5
    for o in outs[1:]:
        assert torch.equal(o, outs[0])
    # The greedy tokens really are the argmax of the model's own logits.
    b = get_backend(next(iter(tiny_llama_models.values())))
    logits = b.run(prompt[None])
    assert int(logits[0, -1].argmax()) == int(outs[0][0])
