"""Feature options (one-pass feature families): names, by-hand equality on tiny models, recording in estimator and
store files, and on SmolLM2 equality with the feature-study script that measured them."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from transformer_lens.utilities import get_act_name

from at2_lens.ablation import DEFAULT_LAYOUT, FeatureOptions, extract_features
from at2_lens.at2.attribution import AT2Attribution
from at2_lens.at2.estimator import LinearEstimator, load_estimator_file
from at2_lens.at2.store import AblationStore, StoreSettings
from at2_lens.backends import get_backend
from at2_lens.errors import EstimatorFileError, InputError
from at2_lens.tasks import ContextTask, prepare_task

OPTIONS = [
    FeatureOptions(p, w, v, s)  # type: ignore[arg-type]
    for p, w, v, s in itertools.product(("sum", "mean", "max"), ("uniform", "surprisal", "entropy"), (False, True),
                                        (False, True))
]


def _task() -> ContextTask:
    return ContextTask(
        context=["The cat sat on the mat. Dogs bark loudly at night.", "Paris is the capital of France."],
        query="Which city?", response="Paris is the city of light.", sources="sentence",
    )


def test_layout_names_round_trip_and_the_default_is_at2s() -> None:
    assert FeatureOptions().layout_name == DEFAULT_LAYOUT == "per_head_mean_target_sum_source"
    names = {o.layout_name for o in OPTIONS}
    assert len(names) == len(OPTIONS) == 36
    for o in OPTIONS:
        assert FeatureOptions.from_layout_name(o.layout_name) == o
    with pytest.raises(InputError, match="unknown feature layout 'per_head_bogus'"):
        FeatureOptions.from_layout_name("per_head_bogus")
    with pytest.raises(InputError, match="source_pooling"):
        FeatureOptions(source_pooling="median")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="value_weighted"):
        FeatureOptions(value_weighted=1)  # type: ignore[arg-type]


def _by_hand(model: Any, task: Any, options: FeatureOptions) -> torch.Tensor:
    """The features of ``options`` from a full cache (what the hooks avoid storing)."""
    backend = get_backend(model)
    ids = task.input_ids[None]
    _, cache = model.run_with_cache(ids)
    t0, t1 = task.response_token_range
    rows = slice(t0 - 1, t1 - 1)
    per_layer = []
    for layer in range(backend.n_layers):
        a = cache[get_act_name("pattern", layer)][0, :, rows, :].float()  # [head, row, key]
        if options.value_weighted:
            v = cache[get_act_name("v", layer)][0].float()
            v = v.repeat_interleave(backend.n_heads // v.shape[1], dim=1)
            norms = torch.stack([(v[:, h] @ model.W_O[layer, h].float()).norm(dim=-1) for h in range(v.shape[1])])
            a = a * norms[:, None, :]
        cols = []
        for s0, s1 in task.source_token_ranges:
            part = a[:, :, s0:s1]
            cols.append({"sum": part.sum(-1), "mean": part.mean(-1), "max": part.amax(-1)}[options.source_pooling])
        f = torch.stack(cols, dim=-1).permute(1, 2, 0)  # [row, source, head]
        if options.drop_sink:
            f = f / f.sum(dim=1, keepdim=True)
        per_layer.append(f)
    feats = torch.stack(per_layer, dim=2)  # [row, source, layer, head]
    lp = torch.log_softmax(model(ids)[0, rows].float(), dim=-1)
    if options.target_weighting == "uniform":
        w = torch.ones(feats.shape[0])
    elif options.target_weighting == "surprisal":
        w = -lp.gather(-1, ids[0, t0:t1, None])[:, 0] + 1e-3
    else:
        w = -(lp.exp() * lp).sum(-1) + 1e-3
    return torch.einsum("r,rslh->slh", w / w.sum(), feats)


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: o.layout_name)
def test_every_family_equals_its_definition_by_hand(tiny_llama: Any, options: FeatureOptions) -> None:
    backend = get_backend(tiny_llama)
    task = prepare_task(backend, _task())
    got = extract_features(tiny_llama, task.input_ids, list(task.source_token_ranges), task.response_token_range,
                           options=options).features()
    assert torch.allclose(got, _by_hand(tiny_llama, task, options), atol=1e-5, rtol=1e-4)


def test_default_options_are_the_plain_pass(tiny_llama: Any) -> None:
    backend = get_backend(tiny_llama)
    task = prepare_task(backend, _task())
    args = (tiny_llama, task.input_ids, list(task.source_token_ranges), task.response_token_range)
    assert torch.equal(extract_features(*args).row_features, extract_features(*args, options=FeatureOptions())
                       .row_features)
    with pytest.raises(InputError, match="options: expected FeatureOptions"):
        extract_features(*args, options="max")  # type: ignore[arg-type]


def test_estimator_records_and_attribution_reads_its_family(tiny_llama: Any, tmp_path: Any) -> None:
    options = FeatureOptions("max", "entropy", True, False)
    weights = torch.rand(2, 4, generator=torch.Generator().manual_seed(0))
    est = LinearEstimator(weights, feature_layout=options.layout_name)
    loaded = load_estimator_file(est.save(tmp_path / "e.safetensors"))
    assert loaded.feature_options == options and loaded.feature_layout == options.layout_name
    backend = get_backend(tiny_llama)
    task = prepare_task(backend, _task())
    result = AT2Attribution(tiny_llama, loaded).attribute(task)
    feats = extract_features(tiny_llama, task.input_ids, list(task.source_token_ranges), task.response_token_range,
                             options=options).features()
    assert torch.allclose(result.scores, loaded.score(feats), atol=1e-6)
    plain = AT2Attribution(tiny_llama, LinearEstimator(weights)).attribute(task)
    assert not torch.allclose(result.scores, plain.scores)
    with pytest.raises(InputError, match="unknown feature layout"):
        LinearEstimator(weights, feature_layout="per_head_mean_target_median_source")


def test_store_settings_record_the_family_and_refuse_a_mix(tmp_path: Any) -> None:
    base = {"model_fingerprint": {"n_layers": 2}, "n_layers": 2, "n_heads": 4}
    options = FeatureOptions("mean", "surprisal", False, True)
    AblationStore(tmp_path / "s", StoreSettings(**base, feature_layout=options.layout_name))
    reopened = AblationStore(tmp_path / "s")
    assert reopened.settings.feature_layout == options.layout_name
    with pytest.raises(Exception, match="feature_layout"):
        AblationStore(tmp_path / "s", StoreSettings(**base))
    with pytest.raises(InputError, match="unknown feature layout"):
        StoreSettings(**base, feature_layout="nonsense")


def test_a_file_with_an_unknown_layout_is_refused(tmp_path: Any) -> None:
    import json

    from at2_lens.files import safetensors_bytes

    est = LinearEstimator(torch.ones(2, 4) / 8)
    meta = est.metadata()
    meta["feature_layout"]["name"] = "per_head_mean_target_median_source"
    path = tmp_path / "bad.safetensors"
    path.write_bytes(safetensors_bytes({"weights": est.weights}, "at2_lens_estimator", json.loads(json.dumps(meta))))
    with pytest.raises(EstimatorFileError, match="unknown feature layout"):
        load_estimator_file(path)


@pytest.mark.real
def test_smollm2_families_equal_the_feature_study(smollm2: Any) -> None:
    """The ceiling study's collection script computed all families in one pass; the library options must read the
    same numbers, so the study's table describes what an estimator trained with these options would see."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from collect_feature_study import feature_families, row_weights

    backend = get_backend(smollm2)
    task = prepare_task(backend, ContextTask(
        context="Mount Everest is in Nepal. Its height is 8,849 metres. The river is long.",
        query="How high is Mount Everest?", response="It is 8,849 metres high.", sources="sentence",
    ))
    sources, target = list(task.source_token_ranges), task.response_token_range
    study = feature_families(backend, task.input_ids, sources, target)
    weights = row_weights(study["token_logprobs"], study["entropy"])
    families = {"sum": ("sum", False, False), "max": ("max", False, False), "vsum": ("sum", True, False),
                "sum_renorm": ("sum", False, True)}
    for family, (pooling, value, sink) in families.items():
        for weighting in ("uniform", "surprisal", "entropy"):
            opts = FeatureOptions(pooling, weighting, value, sink)  # type: ignore[arg-type]
            got = extract_features(smollm2, task.input_ids, sources, target, options=opts).features()
            want = torch.einsum("r,rslh->slh", weights[weighting], study["rows"][family].cpu())
            assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (family, weighting)


def test_collect_and_train_carry_the_family_to_the_estimator(tiny_llama: Any, tmp_path: Any) -> None:
    from at2_lens.at2.collect import collect
    from at2_lens.at2.training import train_from_store

    options = FeatureOptions("max", "surprisal", True, False)
    tasks = [_task(), ContextTask(context=["Rome is in Italy.", "Snow is white.", "Cats purr."], query="Where?",
                                  response="Rome is in Italy.", sources="sentence")]
    store = collect(tiny_llama, tasks, tmp_path / "store", n_masks=4, progress=False, features=options)
    assert store.settings.feature_layout == options.layout_name
    backend = get_backend(tiny_llama)
    task = prepare_task(backend, tasks[0])
    want = extract_features(tiny_llama, task.input_ids, list(task.source_token_ranges), task.response_token_range,
                            options=options).features()
    assert torch.allclose(store.read(0).features, want, atol=1e-6)
    est, _ = train_from_store(store, held_out=None, steps=2, progress=False)
    assert est.feature_options == options
    with pytest.raises(InputError, match="features: expected FeatureOptions"):
        collect(tiny_llama, tasks, tmp_path / "other", features="max")  # type: ignore[arg-type]
    assert not (tmp_path / "other").exists()
