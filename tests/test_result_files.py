"""``SourceAttribution.save/load`` and ``AttAttrResult.save/load``: round trips, refusals, atomic writes, the CLI."""

from __future__ import annotations

import dataclasses
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch

from at2_lens import AT2Attribution, AttentionAttribution, ContextTask, SourceAttribution
from at2_lens._result_files import write_result
from at2_lens.at2.estimator import LinearEstimator, model_fingerprint
from at2_lens.attattr import AttAttrResult
from at2_lens.backends import get_backend
from at2_lens.errors import InputError, ResultFileError
from at2_lens.files import is_temp_file

CONTEXT = ["The cat sat on the mat. Dogs bark loudly at night.", "Paris is the capital of France. The sky is blue."]
TASK = ContextTask(context=CONTEXT, query="Where is Paris?", response="Paris is in France.", sources="sentence")
TOKENS = torch.tensor([[5, 40, 41, 42, 43, 44]])


@pytest.fixture(scope="module")
def at2_result(tiny_llama: Any) -> tuple[AT2Attribution, SourceAttribution]:
    at2 = AT2Attribution(tiny_llama)
    result = at2.attribute(TASK, target=(0, 5), per_token=True)
    extra = {**result.extra, "intercept": 0.25, "layers": [0, 1], "weights": torch.arange(4.0)}
    return at2, dataclasses.replace(result, extra=extra)


@pytest.fixture(scope="module")
def attattr_result(tiny_llama: Any) -> AttAttrResult:
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    return AttentionAttribution(tiny_llama).attribute(TOKENS.expand(2, -1), attention_mask=mask, n_steps=4,
                                                      return_convergence_delta=True)


def _same_tensor(a: torch.Tensor | None, b: torch.Tensor | None) -> None:
    assert (a is None) == (b is None)
    if a is not None and b is not None:
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def _no_temp_files(directory: Path) -> bool:
    return not any(is_temp_file(p) for p in directory.iterdir())


# ------------------------------------------------------------------------------------------------- round trips
def test_source_attribution_round_trip(at2_result: tuple[AT2Attribution, SourceAttribution], tiny_llama: Any,
                                       tmp_path: Path) -> None:
    at2, result = at2_result
    path = result.save(tmp_path / "result.safetensors", model=tiny_llama)
    loaded = SourceAttribution.load(path, model=tiny_llama)
    for name in ("scores", "token_scores"):
        _same_tensor(getattr(loaded, name), getattr(result, name))
    for name in ("source_texts", "source_spans", "context", "target_text", "response", "method", "units",
                 "target_tokens", "query"):
        assert getattr(loaded, name) == getattr(result, name), name
    assert loaded.query is not None and loaded.task is not None and loaded.task.query == loaded.query
    assert loaded.model_fingerprint == model_fingerprint(get_backend(tiny_llama))
    assert set(loaded.extra) == set(result.extra)
    _same_tensor(loaded.extra["weights"], result.extra["weights"])
    assert {k: v for k, v in loaded.extra.items() if k != "weights"} == \
        {k: v for k, v in result.extra.items() if k != "weights"}
    assert loaded.extra["forward_passes"] == result.extra["forward_passes"]
    # The task comes back whole and usable: same fields, same top sources, and AT2 gives the same scores on it.
    assert loaded.task is not None and result.task is not None
    for f in dataclasses.fields(result.task):
        a, b = getattr(loaded.task, f.name), getattr(result.task, f.name)
        if isinstance(a, torch.Tensor):
            _same_tensor(a, b)
        else:
            assert a == b, f.name
    assert loaded.top_k(3) == result.top_k(3)
    assert loaded.to_dataframe().equals(result.to_dataframe())
    assert loaded.to_html() == result.to_html()
    again = at2.attribute(loaded.task, target=(0, 5))
    torch.testing.assert_close(again.scores, result.scores, atol=0, rtol=0)
    # Deterministic bytes: saving the loaded result again gives the same file.
    assert loaded.save(tmp_path / "again.safetensors").read_bytes() == path.read_bytes()


@pytest.mark.line_independent
def test_result_without_task_or_token_scores(tmp_path: Path) -> None:
    result = SourceAttribution(scores=torch.tensor([0.5, -1.0]), source_texts=("a.", "b."), source_spans=((0, 2),
                               (3, 5)), context="a. b.", target_text="x", response="x y", method="custom")
    loaded = SourceAttribution.load(result.save(tmp_path / "r.safetensors"))
    assert loaded.task is None and loaded.token_scores is None and loaded.model_fingerprint is None
    assert loaded.top_k(2) == result.top_k(2) and loaded.extra == {}


def test_attattr_round_trip(attattr_result: AttAttrResult, tiny_llama: Any, tmp_path: Path) -> None:
    res = attattr_result
    loaded = AttAttrResult.load(res.save(tmp_path / "attattr.safetensors", model=tiny_llama))
    for name in ("attributions", "output", "convergence_delta", "baseline_output", "attention_mask"):
        _same_tensor(getattr(loaded, name), getattr(res, name).detach())
    assert (loaded.layers, loaded.method, loaded.n_steps) == (res.layers, res.method, res.n_steps)
    assert loaded.model_fingerprint == model_fingerprint(get_backend(tiny_llama))
    _same_tensor(loaded.head_importance(), res.head_importance().detach())
    assert loaded.hook_names == res.hook_names
    # Unbatched, no convergence delta.
    single = AttentionAttribution(tiny_llama).attribute(TOKENS[0], n_steps=2, layers=[1])
    back = AttAttrResult.load(single.save(tmp_path / "single.safetensors"))
    _same_tensor(back.attributions, single.attributions.detach())
    assert back.layers == (1,) and back.convergence_delta is None and back.model_fingerprint is None


# ------------------------------------------------------------------------------------------------------ refusals
def test_files_of_another_kind_or_version_are_refused(
    at2_result: tuple[AT2Attribution, SourceAttribution], attattr_result: AttAttrResult, tmp_path: Path
) -> None:
    source = at2_result[1].save(tmp_path / "source.safetensors")
    attattr = attattr_result.save(tmp_path / "attattr.safetensors")
    with pytest.raises(ResultFileError, match=r"at2_lens.attattr_result.*AttAttrResult.load"):
        SourceAttribution.load(attattr)
    with pytest.raises(ResultFileError, match=r"at2_lens.source_attribution.*SourceAttribution.load"):
        AttAttrResult.load(source)
    newer = write_result(tmp_path / "v2.safetensors", "at2_lens.source_attribution", 2, {}, {})
    with pytest.raises(ResultFileError, match=r"format_version 2 \(written by a newer"):
        SourceAttribution.load(newer)
    bad_version = write_result(tmp_path / "v0.safetensors", "at2_lens.attattr_result", 0, {}, {})
    with pytest.raises(ResultFileError, match="invalid format_version 0"):
        AttAttrResult.load(bad_version)
    est = LinearEstimator.uniform(2, 4).save(tmp_path / "est.safetensors")
    with pytest.raises(ResultFileError, match="AT2 estimator file"):
        SourceAttribution.load(est)
    pickled = tmp_path / "result.pkl"
    pickled.write_bytes(pickle.dumps({"scores": [1.0]}))
    with pytest.raises(ResultFileError, match="pickle"):
        SourceAttribution.load(pickled)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(source.read_bytes()[:-3])
    with pytest.raises(ResultFileError, match="truncated"):
        SourceAttribution.load(truncated)
    with pytest.raises(ResultFileError, match="no such result file"):
        SourceAttribution.load(tmp_path / "missing.safetensors")
    broken = write_result(tmp_path / "broken.safetensors", "at2_lens.source_attribution", 1,
                          {"scores": torch.zeros(3)}, {"source_texts": ["a"]})
    with pytest.raises(ResultFileError, match="inconsistent SourceAttribution file"):
        SourceAttribution.load(broken)


def test_loading_for_another_model_is_refused(at2_result: tuple[AT2Attribution, SourceAttribution],
                                              tiny_llama: Any, tiny_bert_models: dict[str, Any],
                                              tmp_path: Path) -> None:
    path = at2_result[1].save(tmp_path / "r.safetensors", model=tiny_llama)
    with pytest.raises(ResultFileError, match="another model"):
        SourceAttribution.load(path, model=next(iter(tiny_bert_models.values())))


def test_a_failed_save_leaves_no_partial_file(at2_result: tuple[AT2Attribution, SourceAttribution],
                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result = at2_result[1]
    path = result.save(tmp_path / "r.safetensors")
    before = path.read_bytes()
    bad = dataclasses.replace(result, extra={**result.extra, "callback": object()})
    with pytest.raises(InputError, match=r"extra\['callback'\]"):
        bad.save(path)
    nan = dataclasses.replace(result, extra={"gap": float("nan")})
    with pytest.raises(InputError, match=r"extra\['gap'\]"):
        nan.save(tmp_path / "nan.safetensors")

    def fail(*_: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        dataclasses.replace(result, method="other").save(path)
    assert path.read_bytes() == before
    assert not (tmp_path / "nan.safetensors").exists()
    assert _no_temp_files(tmp_path)


# ----------------------------------------------------------------------------------------------------------- CLI
def test_cli_attribute_and_tree_save(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from at2_lens.cli import main
    from at2_lens.models.classifier import ClassifierHead, write_head
    from at2_lens.models.tiny import save_tiny

    llama = save_tiny("llama", tmp_path / "llama")
    saved = tmp_path / "out" / "result.safetensors"
    assert main(["attribute", "--model", str(llama), "--context-text", "The cat sat. The dog ran.", "--query", "Who?",
                 "--response", "The cat.", "--html", "", "--save", str(saved)]) == 0
    loaded = SourceAttribution.load(saved)
    assert loaded.response == "The cat." and loaded.n_sources == 2 and loaded.task is not None
    assert loaded.model_fingerprint is not None and loaded.model_fingerprint["n_layers"] == 2
    assert "Result saved to" in capsys.readouterr().out

    bert = save_tiny("bert", tmp_path / "bert")
    head = write_head(tmp_path / "head.safetensors", ClassifierHead(
        weight=torch.randn(2, 64, generator=torch.Generator().manual_seed(0)), bias=torch.zeros(2),
        meta={"labels": ["negative", "positive"], "pooling": "mean"}))
    tree = tmp_path / "tree.safetensors"
    assert main(["tree", "--model", str(bert), "--head", str(head), "--text", "a good film", "--n-steps", "2",
                 "--out", "", "--save", str(tree)]) == 0
    res = AttAttrResult.load(tree)
    assert res.layers == (0, 1) and res.n_steps == 2 and res.attention_mask is not None
    assert "AttAttr result saved to" in capsys.readouterr().out
