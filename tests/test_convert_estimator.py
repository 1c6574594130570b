"""Converting score estimators of the AT2 authors' package (``at2``) into at2_lens estimator files.

The equality tests run the reference package itself (``pip install --no-deps at2==0.0.1``; skipped without it) on a
tiny random Llama-architecture Hugging Face model: a reference estimator with known random weights, saved by the
package's own ``save``, scores a three-document task with the package's own attributor; at2_lens converts the file
and scores the same tokens (the same model weights as a TransformerLens model, every backend of this line) with
``AT2Attribution``. The scores must agree within 1e-4, per source and per target token, and a wrong head order (the
[heads, layers] transpose) must not - so the test really pins the order.

The reference's task uses both sides' tokens: at2_lens tokenizes the task, and the reference task is given that
prompt and response text (its own tokenization gives the same ids, checked) and the same source and target ranges,
because the two packages render prompts with different templates.

The refusal tests need no reference package: they write the reference layout with ``torch.save`` (a test checks the
layout against the package's own ``save`` when it is installed) and break one key at a time.
"""

from __future__ import annotations

import collections
import fractions
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from at2_lens.at2.attribution import AT2Attribution
from at2_lens.at2.convert import convert_reference_estimator, read_reference_estimator
from at2_lens.at2.estimator import load_estimator_file
from at2_lens.errors import EstimatorFileError
from at2_lens.tasks import ContextTask, TargetSpan
from tests.conftest import BACKENDS
from tests.test_security import PAYLOADS

pytestmark = pytest.mark.usefixtures("one_thread")

N_LAYERS, N_HEADS, N_KV = 3, 4, 2  # L != H, so a transposed head order changes the scores
TOL = 1e-4


# ---------------------------------------------------------------------------------------- the reference package
def _reference() -> types.SimpleNamespace:
    """The reference package's modules. ``at2.utils`` imports nltk and spacy (and downloads an nltk corpus) at import
    time, only to split text into sentences or words, which these tests never ask for (they give token ranges); stub
    modules stand in for them during the import, so no network call is attempted."""
    if importlib.util.find_spec("at2") is None:
        pytest.skip("the AT2 reference package is not installed (pip install --no-deps at2==0.0.1)")
    names = ["nltk", "spacy", "spacy.lang", "spacy.lang.en"]
    saved = {n: sys.modules.get(n) for n in names}
    for n in names:
        sys.modules[n] = types.ModuleType(n)
    sys.modules["nltk"].download = lambda *a, **k: None  # type: ignore[attr-defined]
    sys.modules["spacy.lang.en"].English = None  # type: ignore[attr-defined]
    try:
        from at2.attribution import attributors, features, score_estimators
        from at2.tasks import base
    finally:
        for n, mod in saved.items():
            if mod is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = mod
    return types.SimpleNamespace(attributors=attributors, features=features, estimators=score_estimators, base=base)


def _tiny_hf(tok: Any) -> Any:
    """The tiny random Llama, with larger query/key weights: at the default initialisation every head attends almost
    uniformly, so heads would be interchangeable and the head order untested."""
    from at2_lens.models.tiny import tiny_hf_model

    hf = tiny_hf_model("llama", seed=0, tokenizer=tok, n_layers=N_LAYERS, n_heads=N_HEADS, n_kv_heads=N_KV)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in hf.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.weight.copy_(torch.randn(proj.weight.shape, generator=gen) * 0.3)
    return hf


def _tl_model(backend: str, tok: Any) -> Any:
    """The same weights as a TransformerLens model (a fresh HF instance: the bridge adapts the model it wraps)."""
    from at2_lens.models.hf import bridge_from_hf, hooked_from_hf

    if backend == "bridge":
        return bridge_from_hf(_tiny_hf(tok), tok, label="tiny-llama-convert")
    return hooked_from_hf(_tiny_hf(tok), tok, model_name="tiny-llama-convert")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Reference estimator file with known random weights, and the reference attributor's scores on a task."""
    from at2_lens.models.tiny import tiny_tokenizer

    ref = _reference()
    tok = tiny_tokenizer("llama")
    hf = _tiny_hf(tok)
    task = ContextTask(
        context=["Paris is the capital of France.", "The Seine flows through it.", "Bread is cheap there."],
        query="What flows through Paris?", response=" The Seine river flows there.", sources="document",
    ).tokenize(tok)

    class SameTokensTask(ref.base.AttributionTask):  # type: ignore[misc, name-defined]
        """The reference task over at2_lens's prompt and response, with at2_lens's source and target ranges."""

        @property
        def input_text(self) -> str:
            return task.prompt

        def _get_source_token_ranges(self) -> list[tuple[int, int]]:
            return [tuple(r) for r in task.source_token_ranges]

        @property
        def target_token_range(self) -> tuple[int, int]:
            return tuple(task.target_token_range)

    ref_task = SameTokensTask(hf, tok)
    ref_task.set_generation(task.response)
    assert ref_task.get_tokens()["input_ids"] == task.input_ids.tolist()  # both sides read the same tokens

    extractor = ref.features.AttentionFeatureExtractor(num_layers=N_LAYERS, num_heads=N_HEADS, model_type="llama")
    estimator = ref.estimators.LinearScoreEstimator(extractor)
    torch.manual_seed(1234)
    estimator.linear.weight.data[:] = torch.randn(1, N_LAYERS * N_HEADS)
    path = tmp_path_factory.mktemp("reference") / "score_estimator.pt"
    estimator.save(path)  # the package's own save path
    attributor = ref.attributors.ScoreEstimationAttributor(ref_task, ref.estimators.LinearScoreEstimator.load(path))
    n_target = task.target_token_range[1] - task.target_token_range[0]
    return {
        "tok": tok, "task": task, "path": path, "weight": estimator.linear.weight.detach().clone(),
        "scores": torch.as_tensor(attributor.get_attribution_scores()),
        "sub_scores": torch.as_tensor(attributor.get_attribution_scores(token_start=2, token_end=n_target - 1)),
        "token_scores": attributor.scores.float().T.clone(),  # [target token, source]
    }


@pytest.fixture(scope="module", params=BACKENDS)
def tl_model(request: pytest.FixtureRequest, reference_run: dict[str, Any]) -> Any:
    return _tl_model(request.param, reference_run["tok"])


# ------------------------------------------------------------------------------------------------- equality
def test_converted_scores_equal_the_reference(reference_run: dict[str, Any], tl_model: Any, tmp_path: Path) -> None:
    converted = convert_reference_estimator(reference_run["path"], tl_model)
    expected_w = reference_run["weight"].reshape(N_LAYERS, N_HEADS)
    assert torch.equal(converted.weights, expected_w)
    assert converted.feature_layout == "per_head_mean_target_sum_source"

    task = reference_run["task"]
    result = AT2Attribution(tl_model, converted).attribute(task, per_token=True)
    diff = (result.scores - reference_run["scores"]).abs().max().item()
    print(f"max |at2_lens - reference| over sources: {diff:.3g}")
    assert diff < TOL, (result.scores, reference_run["scores"])
    assert result.token_scores is not None
    token_diff = (result.token_scores - reference_run["token_scores"]).abs().max().item()
    print(f"max |at2_lens - reference| over target tokens x sources: {token_diff:.3g}")
    assert token_diff < TOL

    # A sub-span of the response (target tokens 2 .. n-1) agrees with the reference's token_start/token_end.
    n_target = task.target_token_range[1] - task.target_token_range[0]
    sub = AT2Attribution(tl_model, converted).attribute(task, target=TargetSpan(2, n_target - 1, unit="token"))
    assert (sub.scores - reference_run["sub_scores"]).abs().max().item() < TOL

    # The head order is pinned: the [heads, layers] reading of the same weights gives other scores.
    transposed = convert_reference_estimator(reference_run["path"], tl_model)
    transposed.weights = reference_run["weight"].reshape(N_HEADS, N_LAYERS).T.contiguous()
    wrong = AT2Attribution(tl_model, transposed).attribute(task)
    wrong_diff = (wrong.scores - reference_run["scores"]).abs().max().item()
    print(f"max |transposed head order - reference|: {wrong_diff:.3g}")
    assert wrong_diff > 1000 * TOL

    # The written file (safetensors + JSON) loads with the model's fingerprint and scores the same.
    out = converted.save(tmp_path / "converted.safetensors")
    again = AT2Attribution(tl_model, out).attribute(task)
    assert torch.allclose(again.scores, result.scores, atol=1e-6, rtol=0)
    loaded = load_estimator_file(out)
    assert loaded.training is not None and loaded.training["reference_model_type"] == "llama"
    assert loaded.training["reference_file"] == "score_estimator.pt"


def test_reference_layout_matches_the_package_save(reference_run: dict[str, Any], tmp_path: Path) -> None:
    """The hand-written layout the refusal tests break is the one the package writes."""
    saved = torch.load(reference_run["path"], weights_only=True)
    mine = _layout()
    assert set(saved) == set(mine)
    for key in ("class", "feature_extractor", "kwargs", "extras"):
        assert type(saved[key]) is type(mine[key]) and (key != "class" or saved[key] == mine[key])
    assert set(saved["kwargs"]) == set(mine["kwargs"])
    assert saved["feature_extractor"]["class"] == mine["feature_extractor"]["class"]
    assert set(saved["feature_extractor"]["kwargs"]) == set(mine["feature_extractor"]["kwargs"])
    assert {k: tuple(v.shape) for k, v in saved["state_dict"].items()} == {"linear.weight": (1, N_LAYERS * N_HEADS)}


# ------------------------------------------------------------------------------------------------- refusals
def _layout(n_layers: int = N_LAYERS, n_heads: int = N_HEADS, model_type: str | None = "llama") -> dict[str, Any]:
    """What the AT2 package's ``ScoreEstimator.save`` writes for a ``LinearScoreEstimator``."""
    return {
        "class": "LinearScoreEstimator",
        "state_dict": collections.OrderedDict([("linear.weight", torch.randn(1, n_layers * n_heads))]),
        "feature_extractor": {"class": "AttentionFeatureExtractor",
                              "kwargs": {"num_layers": n_layers, "num_heads": n_heads, "model_type": model_type}},
        "kwargs": {"normalize": True, "non_negative": False, "bias": False},
        "extras": {},
    }


def _write(tmp_path: Path, obj: dict[str, Any], name: str = "score_estimator.pt") -> Path:
    path = tmp_path / name
    torch.save(obj, path)
    return path


@pytest.fixture(scope="module")
def tiny_tl() -> Any:
    from at2_lens.models.tiny import tiny_tokenizer

    return _tl_model(BACKENDS[-1], tiny_tokenizer("llama"))


def test_valid_layout_converts(tmp_path: Path, tiny_tl: Any) -> None:
    est = convert_reference_estimator(_write(tmp_path, _layout()), tiny_tl)
    assert (est.n_layers, est.n_heads) == (N_LAYERS, N_HEADS)
    assert est.ablation_mode == "mask" and est.output_type == "logit_prob" and est.granularity == "unrecorded"


def _break(change: str) -> dict[str, Any]:
    obj = _layout()
    if change == "unknown top-level key":
        obj["optimizer"] = {}
    elif change == "missing top-level key":
        del obj["extras"]
    elif change == "unknown estimator class":
        obj["class"] = "MLPScoreEstimator"
    elif change == "unknown kwargs key":
        obj["kwargs"]["temperature"] = 1.0
    elif change == "non-bool kwarg":
        obj["kwargs"]["normalize"] = "yes"
    elif change == "unknown feature extractor":
        obj["feature_extractor"]["class"] = "GradientFeatureExtractor"
    elif change == "unknown feature kwarg":
        obj["feature_extractor"]["kwargs"]["pooling"] = "max"
    elif change == "unknown model_type":
        obj["feature_extractor"]["kwargs"]["model_type"] = "mistral"
    elif change == "unknown state key":
        obj["state_dict"]["linear2.weight"] = torch.ones(1)
    elif change == "wrong weight shape":
        obj["state_dict"]["linear.weight"] = torch.randn(N_LAYERS * N_HEADS, 1)
    elif change == "integer weights":
        obj["state_dict"]["linear.weight"] = torch.ones(1, N_LAYERS * N_HEADS, dtype=torch.long)
    elif change == "nan weight":
        obj["state_dict"]["linear.weight"][0, 3] = float("nan")
    elif change == "bias without kwarg":
        obj["state_dict"]["linear.bias"] = torch.zeros(1)
    elif change == "non-zero bias":
        obj["kwargs"]["bias"] = True
        obj["state_dict"]["linear.bias"] = torch.tensor([0.5])
    elif change == "extras not JSON":
        obj["extras"] = {"w": torch.ones(2)}
    return obj


BREAKS = {
    "unknown top-level key": "'optimizer'", "missing top-level key": "'extras'",
    "unknown estimator class": "MLPScoreEstimator", "unknown kwargs key": "'temperature'",
    "non-bool kwarg": "kwargs['normalize']", "unknown feature extractor": "GradientFeatureExtractor",
    "unknown feature kwarg": "'pooling'", "unknown model_type": "mistral", "unknown state key": "'linear2.weight'",
    "wrong weight shape": "shape (12, 1), expected (1, 12)", "integer weights": "torch.int64",
    "nan weight": "NaN", "bias without kwarg": "inconsistent", "non-zero bias": "non-zero bias",
    "extras not JSON": "'extras'",
}


@pytest.mark.parametrize("change", list(BREAKS))
@pytest.mark.line_independent
def test_unknown_or_malformed_content_is_refused(tmp_path: Path, change: str) -> None:
    path = _write(tmp_path, _break(change))
    with pytest.raises(EstimatorFileError) as info:
        read_reference_estimator(path)
    assert str(path) in str(info.value) and BREAKS[change] in str(info.value), str(info.value)


def test_zero_bias_is_accepted(tmp_path: Path, tiny_tl: Any) -> None:
    obj = _layout()
    obj["kwargs"]["bias"] = True
    obj["state_dict"]["linear.bias"] = torch.zeros(1)
    est = convert_reference_estimator(_write(tmp_path, obj), tiny_tl)
    assert est.training is not None and est.training["reference_bias"] == 0.0


@pytest.mark.parametrize(("n_layers", "n_heads"), [(2, 4), (4, 3), (1, 12)])
def test_heads_must_match_the_model(tmp_path: Path, tiny_tl: Any, n_layers: int, n_heads: int) -> None:
    path = _write(tmp_path, _layout(n_layers, n_heads))
    with pytest.raises(EstimatorFileError, match=rf"{n_layers} layers x {n_heads} heads.*3 layers x 4 heads"):
        convert_reference_estimator(path, tiny_tl)


def test_model_type_must_match_the_architecture(tmp_path: Path, tiny_tl: Any) -> None:
    path = _write(tmp_path, _layout(model_type="qwen2"))
    with pytest.raises(EstimatorFileError, match=r"model_type 'qwen2'.*LlamaForCausalLM"):
        convert_reference_estimator(path, tiny_tl)


class _Opaque:
    """A harmless class: weights_only must still refuse to build it."""

    def __init__(self) -> None:
        self.x = 1


@pytest.mark.parametrize("kind", ["custom class", "fractions.Fraction"])
@pytest.mark.line_independent
def test_pickled_arbitrary_object_is_refused(tmp_path: Path, kind: str) -> None:
    obj = _layout()
    obj["extras"] = {"note": _Opaque() if kind == "custom class" else fractions.Fraction(1, 3)}
    path = _write(tmp_path, obj)
    with pytest.raises(EstimatorFileError, match=r"refused: torch.load\(weights_only=True\) would not build"):
        read_reference_estimator(path)


@pytest.mark.parametrize("kind", list(PAYLOADS))
def test_code_executing_pickle_is_refused_without_running(tmp_path: Path, tiny_tl: Any, kind: str) -> None:
    """A payload whose ``__reduce__`` would create a marker file (a plain pickle, a torch.save zip, a legacy torch.save;
    the control that each really runs when unpickled unsafely is in test_security)."""
    marker = tmp_path / "payload_ran.marker"
    path = tmp_path / "score_estimator.pt"
    path.write_bytes(PAYLOADS[kind](marker))
    with pytest.raises(EstimatorFileError, match="nothing in it ran"):
        convert_reference_estimator(path, tiny_tl)
    assert not marker.exists(), f"the converter executed the {kind} payload"
    from at2_lens.cli import main

    assert main(["convert-estimator", str(path), "--model", "unused", "--out", str(tmp_path / "o.safetensors")]) == 2
    assert not marker.exists() and not (tmp_path / "o.safetensors").exists()


@pytest.mark.line_independent
def test_not_a_torch_file_is_refused(tmp_path: Path) -> None:
    text = tmp_path / "estimator.pt"
    text.write_text("not an estimator")
    with pytest.raises(EstimatorFileError, match=r"not a torch\.save file"):
        read_reference_estimator(text)
    with pytest.raises(EstimatorFileError, match="not found"):
        read_reference_estimator(tmp_path / "missing.pt")
    whole = _write(tmp_path, _layout()).read_bytes()
    cut = tmp_path / "truncated.pt"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(EstimatorFileError, match=r"damaged or unreadable torch\.save file"):
        read_reference_estimator(cut)


@pytest.mark.line_independent
def test_an_at2_lens_estimator_is_not_converted_again(tmp_path: Path) -> None:
    from at2_lens.at2.estimator import LinearEstimator

    path = LinearEstimator.uniform(N_LAYERS, N_HEADS).save(tmp_path / "est.safetensors")
    with pytest.raises(EstimatorFileError, match="already converted"):
        read_reference_estimator(path)


# ------------------------------------------------------------------------------------------------------ CLI
def test_cli_converts_a_file_for_a_local_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from at2_lens.cli import main
    from at2_lens.models.tiny import save_tiny

    model_dir = save_tiny("llama", tmp_path / "model", n_layers=N_LAYERS, n_heads=N_HEADS, n_kv_heads=N_KV)
    src = _write(tmp_path, _layout())
    out = tmp_path / "converted.safetensors"
    assert main(["convert-estimator", str(src), "--model", str(model_dir), "--backend", "bridge",
                 "--out", str(out)]) == 0
    assert "3 layers x 4 heads" in capsys.readouterr().out
    est = load_estimator_file(out)
    assert torch.equal(est.weights, torch.load(src, weights_only=True)["state_dict"]["linear.weight"].view(3, 4))
    # Too few heads for the model: exit status 2 with the reason, nothing written.
    bad = _write(tmp_path, _layout(2, 4), name="small.pt")
    assert main(["convert-estimator", str(bad), "--model", str(model_dir), "--backend", "bridge",
                 "--out", str(tmp_path / "bad.safetensors")]) == 2
    assert "2 layers x 4 heads" in capsys.readouterr().err
    assert not (tmp_path / "bad.safetensors").exists()
    assert main(["convert-estimator", str(src), "--model", str(model_dir), "--out", str(src)]) == 2

