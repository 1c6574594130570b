"""``ablate_heads`` and ``knockout_sources``: hooks()-style context managers equal to the existing interventions on
every backend, composable with ``model.hooks``, ``run_with_hooks`` and ``run_with_cache``, gone after the block."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from at2_lens import ablate_heads, knockout_sources
from at2_lens.attattr.head_importance import head_mask_hooks
from at2_lens.backends import Backend, get_backend, hook_names
from at2_lens.errors import InputError, ModelNotSupportedError
from at2_lens.head_ablation import ablate_heads_hooks
from at2_lens.interventions import mask_keys
from tests.conftest import BACKENDS

TOKENS = torch.tensor([[5, 40, 41, 42, 43, 44, 45]])
REF = torch.tensor([[9, 60, 61, 62, 63, 64, 65], [7, 30, 31, 32, 33, 34, 35]])
HEADS = [(0, 1), (1, 0), (1, 3)]
SOURCES = [2, 3]
ATOL = 1e-6


@pytest.fixture(params=[(arch, b) for arch in ("llama", "bert") for b in BACKENDS], ids=lambda p: f"{p[0]}-{p[1]}")
def model(request: Any, tiny_llama_models: dict[str, Any], tiny_bert_models: dict[str, Any]) -> Any:
    arch, backend = request.param
    return (tiny_llama_models if arch == "llama" else tiny_bert_models)[backend]


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


def _hook_counts(model: Any) -> dict[str, int]:
    """Forward hooks per hook point (some bridges keep hooks of their own on a few points)."""
    return {name: len(hp.fwd_hooks) for name, hp in model.hook_dict.items()}


def _head_mask(b: Backend, heads: list[tuple[int, int]]) -> torch.Tensor:
    mask = torch.zeros(b.n_layers, b.n_heads, dtype=torch.bool)
    for layer, head in heads:
        mask[layer, head] = True
    return mask


@torch.no_grad()
def _z_cache(model: Any, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    _, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("attn.hook_z"))
    return {name: cache[name] for name in (hook_names.z(0), hook_names.z(1))}


def _write_z(values: dict[int, Any]) -> list[tuple[str, Any]]:
    """Hand-written hook_z writers: ``values[layer] = (heads, tensor broadcastable to z[:, :, heads])``."""

    def writer(heads: list[int], value: torch.Tensor) -> Any:
        def hook(z: torch.Tensor, hook: Any) -> torch.Tensor:
            z = z.clone()
            z[:, :, heads] = value.to(z.dtype)
            return z

        return hook

    return [(hook_names.z(layer), writer(hs, v)) for layer, (hs, v) in values.items()]


# --------------------------------------------------------------------------------------------- equal to the old way
@torch.no_grad()
def test_zero_ablation_equals_the_existing_hooks(model: Any) -> None:
    b = get_backend(model)
    clean = model(TOKENS)
    with ablate_heads(model, HEADS) as m:
        assert m is model
        got = model(TOKENS)
    _close(got, model.run_with_hooks(TOKENS, fwd_hooks=ablate_heads_hooks(HEADS, model)))
    _close(got, b.run(TOKENS, head_mask_hooks(b, _head_mask(b, HEADS))), atol=1e-5)  # pattern route: float error
    _close(got, model.run_with_hooks(TOKENS, fwd_hooks=ablate_heads(model, _head_mask(b, HEADS)).fwd_hooks))
    assert (got - clean).abs().max() > 1e-3
    _close(model(TOKENS), clean, atol=0)


@torch.no_grad()
def test_mean_and_resample_equal_hand_written_hooks(model: Any) -> None:
    ref_z = _z_cache(model, REF)
    by_layer = {0: [1], 1: [0, 3]}
    mean = {layer: (hs, ref_z[hook_names.z(layer)][:, :, hs].mean(dim=(0, 1))) for layer, hs in by_layer.items()}
    with ablate_heads(model, HEADS, how="mean", reference=REF):
        got_mean = model(TOKENS)
    _close(got_mean, model.run_with_hooks(TOKENS, fwd_hooks=_write_z(mean)))

    one = REF[1:]
    sample = {layer: (hs, _z_cache(model, one)[hook_names.z(layer)][:, :, hs]) for layer, hs in by_layer.items()}
    with ablate_heads(model, HEADS, how="resample", reference=one):
        got_resample = model(TOKENS)
    _close(got_resample, model.run_with_hooks(TOKENS, fwd_hooks=_write_z(sample)))
    assert (got_resample - got_mean).abs().max() > 1e-4
    # Resampling a head from the input itself changes nothing.
    clean = model(TOKENS)
    with ablate_heads(model, HEADS, how="resample", reference=TOKENS[0]):
        _close(model(TOKENS), clean)
    # The mean skips padding: a padded reference gives the mean over its real tokens only.
    padded = torch.cat([TOKENS[:, :4].expand(2, -1), REF[:, 4:5]], dim=1)  # two rows, different padding tokens
    mask = torch.tensor([[1, 1, 1, 1, 0]]).expand(2, -1)
    with ablate_heads(model, HEADS, how="mean", reference=padded, reference_mask=mask):
        masked_mean = model(TOKENS)
    with ablate_heads(model, HEADS, how="mean", reference=TOKENS[:, :4]):
        _close(masked_mean, model(TOKENS), atol=1e-5)



@torch.no_grad()
def test_knockout_equals_mask_keys(model: Any) -> None:
    b = get_backend(model)
    clean = model(TOKENS)
    keep = torch.ones(1, TOKENS.shape[1], dtype=torch.bool)
    keep[0, SOURCES] = False
    every_head = torch.ones(b.n_layers, b.n_heads, dtype=torch.bool)
    with knockout_sources(model, every_head, SOURCES):
        got_all = b.run(TOKENS)
    _close(got_all, b.run(TOKENS, b.all_layer_pattern_hooks(mask_keys(keep))))

    with knockout_sources(model, HEADS, SOURCES):
        got = b.run(TOKENS)
    assert (got - clean).abs().max() > 1e-4 and (got - got_all).abs().max() > 1e-4
    ko_mask = torch.zeros(TOKENS.shape[1], dtype=torch.bool)
    ko_mask[SOURCES] = True
    _close(got, b.run(TOKENS, knockout_sources(b, HEADS, ko_mask).fwd_hooks))  # a boolean mask, same knockout
    if b.probe.z_editable and b.attention_access != "z":  # the hook_z route gives the same result
        _close(got, Backend(model, attention_access="z").run(TOKENS, knockout_sources(
            Backend(model, attention_access="z"), HEADS, SOURCES).fwd_hooks), atol=1e-5)


@torch.no_grad()
def test_knockout_edits_only_the_chosen_heads_pattern(tiny_llama: Any) -> None:
    b = get_backend(tiny_llama)
    assert b.attention_access == "pattern"
    _, clean = tiny_llama.run_with_cache(TOKENS, names_filter=lambda n: n.endswith("hook_pattern"))
    with knockout_sources(tiny_llama, HEADS, SOURCES):
        _, cache = tiny_llama.run_with_cache(TOKENS, names_filter=lambda n: n.endswith("hook_pattern"))
    p1 = cache[hook_names.pattern(1)][0]
    assert (p1[[0, 3]][:, :, SOURCES] == 0).all()
    rows = p1[[0, 3]][:, 4:]  # rows that keep some key
    _close(rows.sum(-1), torch.ones_like(rows.sum(-1)))
    p0 = cache[hook_names.pattern(0)][0]  # layer 0: only head 1 knocked out (layer 1 sees its changed output)
    assert (p0[1][:, SOURCES] == 0).all()
    _close(p0[[0, 2, 3]], clean[hook_names.pattern(0)][0, [0, 2, 3]], atol=0)


# ------------------------------------------------------------------------------------------------------ composing
@torch.no_grad()
def test_composes_with_run_with_cache_run_with_hooks_and_hooks(model: Any) -> None:
    clean, before = model(TOKENS), _hook_counts(model)
    ablation = ablate_heads(model, HEADS)
    knockout = knockout_sources(model, [(1, 2)], SOURCES)
    ablated = model.run_with_hooks(TOKENS, fwd_hooks=ablation.fwd_hooks)
    both = model.run_with_hooks(TOKENS, fwd_hooks=knockout.fwd_hooks + ablation.fwd_hooks)
    seen: dict[str, torch.Tensor] = {}
    with ablation:
        logits, cache = model.run_with_cache(TOKENS)
        _close(logits, ablated)
        assert (cache[hook_names.z(0)][:, :, 1] == 0).all()
        _close(model(TOKENS), ablated)  # run_with_cache left our hooks in place
        out = model.run_with_hooks(TOKENS, fwd_hooks=[(hook_names.z(1), lambda z, hook: seen.setdefault("z", z))])
        _close(out, ablated)
        assert (seen["z"][:, :, [0, 3]] == 0).all()
        _close(model(TOKENS), ablated)  # and so did run_with_hooks
        with model.hooks(fwd_hooks=knockout.fwd_hooks):
            _close(model(TOKENS), both)
        _close(model(TOKENS), ablated)
    with model.hooks(fwd_hooks=knockout.fwd_hooks), ablation:
        _close(model(TOKENS), both)
    _close(model(TOKENS), clean, atol=0)
    assert _hook_counts(model) == before


def test_hooks_are_removed_after_an_exception(model: Any) -> None:
    clean, before = model(TOKENS), _hook_counts(model)
    with pytest.raises(RuntimeError, match="inside"), ablate_heads(model, HEADS, how="mean", reference=REF):
        raise RuntimeError("inside the block")
    assert _hook_counts(model) == before
    # An error raised by our own hook during the forward pass (a reference of another length) also cleans up.
    with pytest.raises(InputError, match="reference"), ablate_heads(model, HEADS, how="resample", reference=REF):
        model(TOKENS)
    with pytest.raises(InputError, match="sources"), knockout_sources(model, HEADS, [10]):
        model(TOKENS)
    assert _hook_counts(model) == before
    _close(model(TOKENS), clean, atol=0)


# --------------------------------------------------------------------------------------------------- bad arguments
@pytest.fixture
def no_pass(tiny_llama: Any) -> Iterator[list[int]]:
    """Counts forward passes of the tiny decoder (the test asserts none happened)."""
    calls: list[int] = []
    handle = tiny_llama.register_forward_pre_hook(lambda *_: calls.append(1))
    yield calls
    handle.remove()


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"heads": [(2, 0)]}, "heads"),
    ({"heads": [(0, 4)]}, "heads"),
    ({"heads": [(0, -1)]}, "heads"),
    ({"heads": [(0, 1, 2)]}, "heads"),
    ({"heads": "0,1"}, "heads"),
    ({"heads": torch.zeros(2, 4)}, "heads"),
    ({"heads": [(0, 1)], "how": "noise"}, "how"),
    ({"heads": [(0, 1)], "how": "mean"}, "reference"),
    ({"heads": [(0, 1)], "how": "zero", "reference": REF}, "reference"),
    ({"heads": [(0, 1)], "how": "resample", "reference": torch.tensor([[1, 10**7]])}, "reference"),
    ({"heads": [(0, 1)], "how": "mean", "reference": REF.float()}, "reference"),
    ({"heads": [(0, 1)], "how": "mean", "reference": REF, "reference_mask": torch.ones(1, 3)}, "reference_mask"),
])
def test_bad_ablation_arguments_fail_before_any_pass(
    tiny_llama: Any, no_pass: list[int], kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(InputError, match=f"^{match}"):
        ablate_heads(tiny_llama, **kwargs)
    assert not no_pass


@pytest.mark.parametrize(("heads", "sources", "match"), [
    ([(0, 9)], SOURCES, "heads"),
    ([(0, 1)], [-1], "sources"),
    ([(0, 1)], [10**6], "sources"),
    ([(0, 1)], [1.5], "sources"),
    ([(0, 1)], "2,3", "sources"),
    ([(0, 1)], torch.tensor([0.5]), "sources"),
    ([(0, 1)], torch.zeros(1, 1, 3, dtype=torch.bool), "sources"),
    ([(0, 1)], 3, "sources"),
])
def test_bad_knockout_arguments_fail_before_any_pass(
    tiny_llama: Any, no_pass: list[int], heads: Any, sources: Any, match: str
) -> None:
    with pytest.raises(InputError, match=f"^{match}"):
        knockout_sources(tiny_llama, heads, sources)
    assert not no_pass


def test_not_a_transformerlens_model() -> None:
    with pytest.raises(ModelNotSupportedError, match="model"):
        ablate_heads(torch.nn.Linear(2, 2), [(0, 0)])


# ------------------------------------------------------------------------------------------------------ real model
@pytest.mark.real
@pytest.mark.slow
@torch.no_grad()
def test_verbs_on_smollm2(smollm2: Any) -> None:
    """On SmolLM2: the context managers reproduce the existing hooks, knock a fact's sentence out of every head's
    view (the answer's log-probability falls) and leave the model clean."""
    from at2_lens import ContextTask
    from at2_lens.tasks import prepare_task

    b = get_backend(smollm2)
    task = prepare_task(b, ContextTask(
        context="The cat is black. Paris is the capital of France. The dog is brown.",
        query="What is the capital of France?", response="Paris"))
    ids = task.input_ids[None]
    t0 = (task.target_token_range or (0, 0))[0]
    answer = int(ids[0, t0])

    def log_p(logits: torch.Tensor) -> float:
        return float(logits[0, t0 - 1].log_softmax(-1)[answer])

    clean, before = smollm2(ids), _hook_counts(smollm2)
    heads = [(3, 2), (10, 4), (20, 1)]
    with ablate_heads(smollm2, heads):
        ablated = smollm2(ids)
    _close(ablated, smollm2.run_with_hooks(ids, fwd_hooks=ablate_heads_hooks(heads, smollm2)))

    a, z = task.source_token_ranges[1]  # "Paris is the capital of France."
    keep = torch.ones(1, ids.shape[1], dtype=torch.bool)
    keep[0, a:z] = False
    every = torch.ones(b.n_layers, b.n_heads, dtype=torch.bool)
    with knockout_sources(smollm2, every, range(a, z)):
        knocked = smollm2(ids)
    _close(knocked, b.run(ids, b.all_layer_pattern_hooks(mask_keys(keep))), atol=1e-5)
    assert log_p(knocked) < log_p(clean) - 0.5
    _close(smollm2(ids), clean, atol=0)
    assert _hook_counts(smollm2) == before
