"""The bad-input catalogue (issue #8): every way a user can hand at2_lens bad input, one named test per case.

Each case asserts three things:

1. the specific error class (``type(err) is ...``, not just some exception);
2. that the message names the argument (or the file) at fault;
3. that it was raised *before expensive work*: a global ``nn.Module`` forward pre-hook counts every module call
   (TransformerLens blocks, hook points, the Hugging Face model under a bridge, generation) while the bad call
   runs, and the count must be zero. Attribution objects are built (and the one-off six-token attention probe run)
   before counting starts, so the count is the call's own work.

NaN/inf cases cannot be known before the forward that produces them; they assert that a ``NumericalError`` is raised
and no non-finite score is ever returned.

Groups: text (context, query, response, target, sources, documents); lengths and ids (context window, vocabulary,
ragged or padded batches); files (estimators, ablation store); integration and method arguments; model support;
NaN/inf. Each group has at least one case on SmolLM2 (``real``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from at2_lens import AT2Attribution, AttentionAttribution, ContextTask, TargetSpan
from at2_lens.at2.collect import collect
from at2_lens.at2.estimator import ESTIMATOR_META_KEY, LinearEstimator, load_estimator_file, model_fingerprint
from at2_lens.at2.pretrained import load_estimator
from at2_lens.at2.store import AblationExample, AblationStore, StoreSettings, example_to_bytes
from at2_lens.backends import Backend, get_backend
from at2_lens.backends.probe import AttentionProbe
from at2_lens.baselines import (
    AverageAttention,
    ContextCite,
    GradientXInput,
    IntegratedGradientsAttribution,
    LastLayerAttention,
    LeaveOneOut,
)
from at2_lens.errors import (
    EstimatorFileError,
    InputError,
    ModelNotSupportedError,
    NumericalError,
    StoreError,
)
from at2_lens.evaluation.runner import evaluate
from tests.conftest import sdpa_bert_bridge

CONTEXT = ["The Nile is the longest river. It flows north.", "The Amazon carries the most water."]
QUERY = "Which river is longest?"
RESPONSE = "The Nile is."


# --------------------------------------------------------------------------------------------------- the harness
@contextlib.contextmanager
def count_forwards() -> Iterator[list[str]]:
    """Record the class name of every ``nn.Module`` whose forward runs inside the block (any model, any module)."""
    calls: list[str] = []
    handle = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda module, args: calls.append(type(module).__name__)
    )
    try:
        yield calls
    finally:
        handle.remove()


def fails_before_work(error: type[Exception], names: str | tuple[str, ...], fn: Callable[..., Any], *args: Any,
                      **kwargs: Any) -> str:
    """Call ``fn`` and assert: it raised exactly ``error``, the message names each of ``names``, and no module ran a
    forward pass. Returns the message."""
    names = (names,) if isinstance(names, str) else names
    with count_forwards() as calls, pytest.raises(error) as info:
        fn(*args, **kwargs)
    assert type(info.value) is error, f"expected {error.__name__}, got {type(info.value).__name__}: {info.value}"
    message = str(info.value)
    for name in names:
        assert name in message, f"the message does not name {name!r}: {message}"
    assert calls == [], f"{len(calls)} module forwards ran before the error ({calls[:4]}...): {message}"
    return message


def primed(model: Any) -> Any:
    """The model with its one-off attention probe already run, so later forward counts are the call's own."""
    _ = get_backend(model).probe
    return model


@pytest.fixture(scope="module")
def model(tiny_llama: Any) -> Any:
    return primed(tiny_llama)


@pytest.fixture(scope="module")
def at2(model: Any) -> AT2Attribution:
    return AT2Attribution(model)


@pytest.fixture(scope="module")
def attattr(model: Any) -> AttentionAttribution:
    return AttentionAttribution(model)


@pytest.fixture(scope="module")
def task() -> ContextTask:
    return ContextTask(CONTEXT, QUERY, response=RESPONSE, sources="sentence")


def test_harness_sees_forward_passes(model: Any) -> None:
    """The forward counter is not blind: one plain forward pass registers module calls."""
    with count_forwards() as calls:
        get_backend(model).run(torch.tensor([[5, 6, 7]]))
    assert len(calls) > 3


# ===================================================================================================== 1. text
@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("context", lambda: ContextTask("", QUERY)),
        ("context", lambda: ContextTask(" \n\t\u3000", QUERY)),
        ("context", lambda: ContextTask([], QUERY)),
        ("context[1]", lambda: ContextTask(["A river.", "  \n"], QUERY)),
        ("context", lambda: ContextTask(42, QUERY)),  # type: ignore[arg-type]
        ("query", lambda: ContextTask(CONTEXT, "")),
        ("query", lambda: ContextTask(CONTEXT, " \n ")),
        ("query", lambda: ContextTask(CONTEXT, None)),  # type: ignore[arg-type]
        ("response", lambda: ContextTask(CONTEXT, QUERY, response="   ")),
        ("target", lambda: ContextTask(CONTEXT, QUERY, response="The Nile is.", target=(3, 4))),  # " " only
        ("separator", lambda: ContextTask(["a.", "b."], QUERY, separator="")),
        ("system_prompt", lambda: ContextTask(CONTEXT, QUERY, system_prompt=3)),  # type: ignore[arg-type]
        ("prompt_format", lambda: ContextTask(CONTEXT, QUERY, prompt_format="markdown")),  # type: ignore[arg-type]
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
@pytest.mark.line_independent
def test_empty_or_whitespace_text(name: str, make: Callable[[], ContextTask]) -> None:
    fails_before_work(InputError, name, make)


def test_empty_response_ids(model: Any, task: ContextTask) -> None:
    prompt = task.tokenize(model.tokenizer)
    fails_before_work(InputError, "response", prompt.with_response, model.tokenizer, [])


def test_whitespace_target_through_attribute(at2: AT2Attribution, task: ContextTask) -> None:
    fails_before_work(InputError, "target", at2.attribute, task, target=(3, 4))


@pytest.mark.parametrize(
    "target",
    [(0, 50), (7, 13), TargetSpan(0, 40, "token"), (5, 2), (3, 3), (-1, 4), "0:4", (1, 2, 3), (0.5, 3)],
    ids=["past-end", "straddles-end", "token-past-end", "reversed", "empty", "negative", "string", "triple", "float"],
)
def test_target_span_outside_response(at2: AT2Attribution, task: ContextTask, target: Any) -> None:
    fails_before_work(InputError, "target", at2.attribute, task, target=target)


@pytest.mark.line_independent
def test_target_outside_response_in_the_task() -> None:
    fails_before_work(InputError, ("target", "outside the response"), ContextTask, CONTEXT, QUERY, response="Nile.",
                      target=(0, 9))


def test_bad_target_is_refused_before_generation(at2: AT2Attribution) -> None:
    """Without a response the model would generate one first; a malformed target must not wait for that."""
    no_response = ContextTask(CONTEXT, QUERY)
    fails_before_work(InputError, "target", at2.attribute, no_response, target=(5, 2))
    fails_before_work(InputError, ("target", "max_new_tokens=4"), at2.attribute, no_response,
                      target=TargetSpan(0, 9, "token"), max_new_tokens=4)
    fails_before_work(InputError, "max_new_tokens", at2.attribute, no_response, max_new_tokens=0)


@pytest.mark.parametrize(
    "cls", [AverageAttention, LastLayerAttention, LeaveOneOut, ContextCite, GradientXInput,
            IntegratedGradientsAttribution],
)
def test_target_outside_response_in_every_baseline(model: Any, task: ContextTask, cls: type) -> None:
    method = cls(model)
    fails_before_work(InputError, "target", method.attribute, task, target=(0, 99))
    fails_before_work(InputError, "target", method.attribute, task, target=(4, 1))


@pytest.mark.parametrize(
    ("sources", "name", "what"),
    [
        ([(0, 10), (5, 20)], "sources[1]", "overlaps"),
        ([(10, 5)], "sources[0]", "reversed"),
        ([(0, 10_000)], "sources[0]", "outside the text"),
        ([(-3, 4)], "sources[0]", "outside the text"),
        ([(4, 4)], "sources[0]", "empty"),
        ([(20, 30), (0, 10)], "sources[1]", "text order"),
        ([(0.0, 3)], "sources[0]", "pair of ints"),
        ([(1, 2, 3)], "sources[0]", "pair of ints"),
        ([], "sources", "no spans"),
        ("paragraphs", "sources", "unknown granularity"),
        (42, "sources", "expected a granularity"),
    ],
    ids=["overlap", "reversed", "past-end", "negative", "empty", "out-of-order", "float", "triple", "none",
         "unknown-granularity", "not-spans"],
)
@pytest.mark.line_independent
def test_bad_source_spans(sources: Any, name: str, what: str) -> None:
    fails_before_work(InputError, (name, what), ContextTask, CONTEXT, QUERY, sources=sources)


@pytest.mark.line_independent
def test_duplicate_documents() -> None:
    fails_before_work(InputError, ("context[2]", "duplicate of document 0"), ContextTask,
                      ["The Nile.", "The Amazon.", "The Nile."], QUERY, sources="document")


def test_text_holding_a_control_token(model: Any) -> None:
    """A context spelling a special token would silently change the prompt's structure."""
    eos = model.tokenizer.eos_token
    bad = ContextTask(f"The Nile {eos} is long.", QUERY, response=RESPONSE)
    fails_before_work(InputError, ("context", "special token"), AT2Attribution(model).attribute, bad)


# ======================================================================================== 2. lengths and ids
def _long_task(n_ctx: int, response: str | None = RESPONSE) -> ContextTask:
    return ContextTask("The river flows north. " * (n_ctx // 2), QUERY, response=response)


def test_prompt_longer_than_context_window(model: Any, at2: AT2Attribution) -> None:
    n_ctx = get_backend(model).n_ctx
    for response in (RESPONSE, None):  # with a response, and one that would be generated
        fails_before_work(InputError, ("max_length", f"max_length={n_ctx}", "context size"), at2.attribute,
                          _long_task(n_ctx, response))
    fails_before_work(InputError, "max_length", LeaveOneOut(model).attribute, _long_task(n_ctx))
    fails_before_work(InputError, "max_length", GradientXInput(model).attribute, _long_task(n_ctx))


def test_tokenized_task_longer_than_context_window(model: Any, at2: AT2Attribution) -> None:
    n_ctx = get_backend(model).n_ctx
    long = _long_task(n_ctx).tokenize(model.tokenizer)  # no max_length: tokenizing alone cannot know the model
    assert long.seq_len > n_ctx
    fails_before_work(InputError, ("inputs.input_ids", "context window"), at2.attribute, long)


def test_attattr_inputs_longer_than_context_window(model: Any, attattr: AttentionAttribution) -> None:
    n_ctx = get_backend(model).n_ctx
    fails_before_work(InputError, ("inputs", "context window"), attattr.attribute, torch.ones(1, n_ctx + 1).long())


@pytest.mark.parametrize("bad_id", [-1, 10_000_000, "d_vocab"])
def test_token_ids_outside_vocabulary(model: Any, at2: AT2Attribution, attattr: AttentionAttribution,
                                      task: ContextTask, bad_id: Any) -> None:
    bad = get_backend(model).d_vocab if bad_id == "d_vocab" else bad_id
    ids = torch.tensor([[5, 6, bad, 8]])
    fails_before_work(InputError, ("inputs", "token ids must lie in"), attattr.attribute, ids)
    tt = task.tokenize(model.tokenizer)
    broken = dataclasses.replace(tt, input_ids=tt.input_ids.clone().index_fill_(0, torch.tensor([2]), bad))
    fails_before_work(InputError, ("inputs.input_ids", "token ids"), at2.attribute, broken)


def test_token_ids_of_the_wrong_type(attattr: AttentionAttribution) -> None:
    fails_before_work(InputError, "inputs", attattr.attribute, torch.tensor([[5.0, 6.0]]))
    fails_before_work(InputError, "inputs", attattr.attribute, torch.zeros(1, 0, dtype=torch.long))
    fails_before_work(InputError, "inputs", attattr.attribute, torch.ones(1, 2, 3, dtype=torch.long))


def test_ragged_batch(attattr: AttentionAttribution) -> None:
    fails_before_work(InputError, ("inputs", "differ in length", "attention_mask"), attattr.attribute,
                      [[5, 6, 7], [5, 6]])


def test_padded_batch_without_attention_mask(model: Any, attattr: AttentionAttribution) -> None:
    pad = model.tokenizer.pad_token_id
    assert pad is not None
    right = torch.tensor([[5, 6, 7, 8], [5, 6, pad, pad]])
    fails_before_work(InputError, ("attention_mask", "pad tokens", "at the end"), attattr.attribute, right)
    left = torch.tensor([[5, 6, 7, 8], [pad, 5, 6, 7]])
    fails_before_work(InputError, ("attention_mask", "at the start"), attattr.attribute, left)


def test_padded_batch_with_its_mask_is_accepted(model: Any, attattr: AttentionAttribution) -> None:
    """The padding check does not fire once the mask is given (the contrast to the case above)."""
    pad = model.tokenizer.pad_token_id
    tokens = torch.tensor([[5, 6, 7, 8], [5, 6, pad, pad]])
    res = attattr.attribute(tokens, attention_mask=(tokens != pad).long(), layers=[0], n_steps=2)
    assert res.attributions.shape[:2] == (2, 1) and torch.isfinite(res.attributions).all()


@pytest.mark.parametrize(
    ("mask", "what"),
    [
        (torch.ones(1, 3, dtype=torch.long), "expected shape"),
        (torch.ones(1, 4), "integer or bool"),
        (torch.tensor([[1, 2, 1, 1]]), "only 0"),
        (torch.tensor([[0, 0, 0, 0]]), "at least one real token"),  # every key of the row masked
    ],
    ids=["shape", "float", "not-binary", "fully-masked-row"],
)
def test_bad_attention_mask(attattr: AttentionAttribution, mask: torch.Tensor, what: str) -> None:
    fails_before_work(InputError, ("attention_mask", what), attattr.attribute, torch.tensor([[5, 6, 7, 8]]),
                      attention_mask=mask)


# ============================================================================================ 3. files
def _estimator_for(n_layers: int, n_heads: int, fingerprint: dict[str, Any]) -> LinearEstimator:
    weights = torch.arange(1, n_layers * n_heads + 1, dtype=torch.float32).reshape(n_layers, n_heads)
    return LinearEstimator(weights / weights.sum(), granularity="sentence", model_fingerprint=fingerprint)


@pytest.fixture
def good_estimator(model: Any) -> LinearEstimator:
    b = get_backend(model)
    return _estimator_for(b.n_layers, b.n_heads, model_fingerprint(b))


def test_estimator_for_a_different_model(model: Any, good_estimator: LinearEstimator, tmp_path: Path) -> None:
    b = get_backend(model)
    other = dict(model_fingerprint(b), n_layers=b.n_layers + 1, d_vocab=b.d_vocab + 7)
    path = _estimator_for(b.n_layers + 1, b.n_heads, other).save(tmp_path / "other.safetensors")
    message = fails_before_work(EstimatorFileError, (str(path), f"n_layers={b.n_layers + 1}", f"n_layers={b.n_layers}",
                                                     "d_vocab="), AT2Attribution, model, estimator=path)
    assert "different model" in message
    fails_before_work(EstimatorFileError, str(path), load_estimator, path, model=model)
    in_memory = load_estimator_file(path)
    fails_before_work(EstimatorFileError, ("does not match this model", "n_layers="), AT2Attribution, model,
                      estimator=in_memory)
    # the same weights with this model's fingerprint load fine (the contrast)
    assert AT2Attribution(model, estimator=good_estimator.save(tmp_path / "mine.safetensors")).estimator.n_layers


def _rewrite(path: Path, fn: Callable[[bytes], bytes]) -> Path:
    path.write_bytes(fn(path.read_bytes()))
    return path


def _flip_last_data_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0x01])


def _break_header(data: bytes) -> bytes:
    n = int.from_bytes(data[:8], "little")
    return data[:8] + data[8 : 8 + n].replace(b'"', b"'", 3) + data[8 + n :]


@pytest.mark.parametrize(
    ("damage", "what"),
    [
        (lambda d: d[: len(d) - 10], "truncated"),
        (lambda d: d[:5], "too short"),
        (lambda d: d + b"\x00" * 16, "padded"),
        (_break_header, "not valid JSON"),
        (_flip_last_data_byte, "weights_sha256"),
        (lambda d: b"\x00" * len(d), "corrupted"),
    ],
    ids=["truncated", "stub", "trailing-garbage", "broken-header", "flipped-bit", "zeroed"],
)
def test_truncated_or_corrupted_estimator_file(model: Any, good_estimator: LinearEstimator, tmp_path: Path,
                                               damage: Callable[[bytes], bytes], what: str) -> None:
    path = _rewrite(good_estimator.save(tmp_path / "est.safetensors"), damage)
    fails_before_work(EstimatorFileError, (str(path), what), AT2Attribution, model, estimator=path)


def test_estimator_metadata_lying_about_its_shape(model: Any, good_estimator: LinearEstimator, tmp_path: Path) -> None:
    meta = good_estimator.metadata()
    meta["feature_layout"]["n_heads"] = good_estimator.n_heads + 2
    meta["model_fingerprint"]["n_heads"] = good_estimator.n_heads + 2
    path = tmp_path / "lie.safetensors"
    save_file({"weights": good_estimator.weights}, str(path), metadata={ESTIMATOR_META_KEY: json.dumps(meta)})
    fails_before_work(EstimatorFileError, (str(path), f"n_heads={good_estimator.n_heads + 2}", "shape"),
                      AT2Attribution, model, estimator=path)


def test_estimator_path_that_is_missing_or_a_directory(model: Any, tmp_path: Path) -> None:
    fails_before_work(EstimatorFileError, ("not found", "nope.safetensors"), AT2Attribution, model,
                      estimator=tmp_path / "nope.safetensors")
    fails_before_work(EstimatorFileError, ("not a file", str(tmp_path)), load_estimator, tmp_path)
    fails_before_work(InputError, "estimator", AT2Attribution, model, estimator=42)


def _settings(model: Any, **changes: Any) -> StoreSettings:
    b = get_backend(model)
    base = dict(model_fingerprint=model_fingerprint(b), n_layers=b.n_layers, n_heads=b.n_heads,
                ablation_mode="mask", output_type="logit_prob", granularity="sentence", n_masks=4, keep_prob=0.5,
                seed=0, extra={})
    return StoreSettings(**{**base, **changes})


def test_store_with_other_settings(model: Any, task: ContextTask, tmp_path: Path) -> None:
    AblationStore(tmp_path, _settings(model))
    fails_before_work(StoreError, (str(tmp_path), "n_masks"), AblationStore, tmp_path, _settings(model, n_masks=8))
    fails_before_work(StoreError, "n_masks", collect, model, [task], tmp_path, n_masks=8, progress=False)


def test_corrupted_store_example(model: Any, tmp_path: Path) -> None:
    b = get_backend(model)
    store = AblationStore(tmp_path, _settings(model))
    ex = AblationExample(0, torch.rand(3, b.n_layers, b.n_heads), torch.rand(4, 3) > 0.5, torch.rand(4), 0.5)
    path = store.write(ex)
    path.write_bytes(example_to_bytes(ex)[:-9])
    fails_before_work(StoreError, ("corrupted example file", path.name), store.read, 0)
    fails_before_work(StoreError, "not an at2_lens ablation store", AblationStore, tmp_path / "examples")


# ============================================================================ 4. integration and method arguments
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"n_steps": 0}, "n_steps"),
        ({"n_steps": -3}, "n_steps"),
        ({"n_steps": 2.5}, "n_steps"),
        ({"n_steps": True}, "n_steps"),
        ({"n_steps": 1, "method": "riemann_right"}, "n_steps"),
        ({"method": "simpson"}, "method"),
        ({"method": 3}, "method"),
        ({"n_steps": "fast"}, "n_steps"),
        ({"n_steps": "auto", "method": "riemann_right"}, "method"),
        ({"n_steps": 20, "method": "clenshaw_curtis"}, "method"),
        ({"n_steps": "auto", "rtol": 0}, "rtol"),
        ({"n_steps": "auto", "rtol": -1e-3}, "rtol"),
        ({"n_steps": "auto", "rtol": 1.5}, "rtol"),
        ({"n_steps": "auto", "rtol": "1e-3"}, "rtol"),
        ({"n_steps": "auto", "rtol": float("nan")}, "rtol"),
        ({"n_steps": "auto", "atol": -1.0}, "atol"),
        ({"n_steps": "auto", "max_steps": 4}, "max_steps"),
        ({"n_steps": "auto", "max_steps": 30.0}, "max_steps"),
        ({"n_steps": 20, "rtol": 1e-3}, "rtol"),
        ({"n_steps": 20, "max_steps": 64}, "max_steps"),
        ({"layers": [2]}, "layers"),
        ({"layers": 99}, "layers"),
        ({"layers": [-1]}, "layers"),
        ({"layers": []}, "layers"),
        ({"layers": ["0"]}, "layers"),
        ({"layers": 0.5}, "layers"),
        ({"internal_batch_size": 0}, "internal_batch_size"),
    ],
    ids=lambda v: json.dumps(v) if isinstance(v, dict) else "",
)
def test_attattr_arguments(attattr: AttentionAttribution, kwargs: dict[str, Any], name: str) -> None:
    fails_before_work(InputError, name, attattr.attribute, torch.tensor([[5, 6, 7, 8]]), **kwargs)


def test_attattr_constructor_arguments(model: Any) -> None:
    fails_before_work(InputError, "output", AttentionAttribution, model, output="logits")
    fails_before_work(InputError, "output_func", AttentionAttribution, model, output_func=3)


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda m: IntegratedGradientsAttribution(m, n_steps=0), "n_steps"),
        (lambda m: IntegratedGradientsAttribution(m, n_steps=1, method="riemann_left"), "n_steps"),
        (lambda m: IntegratedGradientsAttribution(m, method="simpson"), "method"),
        (lambda m: IntegratedGradientsAttribution(m, internal_batch_size=0), "internal_batch_size"),
        (lambda m: IntegratedGradientsAttribution(m, output="prob"), "output"),
        (lambda m: AverageAttention(m, layers=[2]), "layers"),
        (lambda m: AverageAttention(m, layers=[-3]), "layers"),
        (lambda m: AverageAttention(m, layers=["last"]), "layers"),
        (lambda m: LeaveOneOut(m, mode="zero"), "mode"),
        (lambda m: LeaveOneOut(m, batch_size=0), "batch_size"),
        (lambda m: ContextCite(m, n_ablations=1), "n_ablations"),
        (lambda m: ContextCite(m, keep_prob=1.0), "keep_prob"),
        (lambda m: ContextCite(m, alpha=0.0), "alpha"),
    ],
    ids=lambda v: "" if callable(v) else v,
)
def test_baseline_arguments(model: Any, make: Callable[[Any], Any], name: str) -> None:
    fails_before_work(InputError, name, make, model)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"n_masks": 0}, "n_masks"),
        ({"mode": "zero"}, "mode"),
        ({"output": "prob"}, "output"),
        ({"keep_prob": 0.0}, "keep_prob"),
        ({"shard_index": 2, "shard_count": 2}, "shard_index"),
    ],
    ids=lambda v: json.dumps(v) if isinstance(v, dict) else "",
)
def test_collect_arguments(model: Any, task: ContextTask, tmp_path: Path, kwargs: dict[str, Any], name: str) -> None:
    fails_before_work(InputError, name, collect, model, [task], tmp_path / "store", progress=False, **kwargs)


def test_collect_tasks(model: Any, task: ContextTask, tmp_path: Path) -> None:
    n_ctx = get_backend(model).n_ctx
    fails_before_work(InputError, "tasks", collect, model, [], tmp_path, progress=False)
    fails_before_work(InputError, "tasks[1]", collect, model, [task, "a question"], tmp_path, progress=False)
    word = ContextTask(CONTEXT, QUERY, sources="word")
    fails_before_work(InputError, ("tasks", "granularity"), collect, model, [task, word], tmp_path, progress=False)
    # the third task is too long: refused before the first two are collected
    fails_before_work(InputError, ("tasks[2]", "max_length"), collect, model, [task, task, _long_task(n_ctx)],
                      tmp_path / "s", progress=False)
    assert not list((tmp_path / "s").glob("examples/*.safetensors"))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"metrics": ["accuracy"]}, "metrics"),
        ({"metrics": []}, "metrics"),
        ({"n_eval_masks": 1}, "n_eval_masks"),
        ({"ks": [0]}, "ks"),
        ({"mode": "zero"}, "mode"),
        ({"task_ids": [0, 0]}, "task_ids"),
    ],
    ids=lambda v: json.dumps(v) if isinstance(v, dict) else "",
)
def test_evaluate_arguments(at2: AT2Attribution, task: ContextTask, kwargs: dict[str, Any], name: str) -> None:
    tasks = [task, task] if "task_ids" in kwargs else [task]
    fails_before_work(InputError, name, evaluate, {"at2": at2}, tasks, **kwargs)


def test_evaluate_methods_and_tasks(model: Any, at2: AT2Attribution, task: ContextTask) -> None:
    n_ctx = get_backend(model).n_ctx
    fails_before_work(InputError, "methods", evaluate, {}, [task])
    fails_before_work(InputError, "methods['x']", evaluate, {"x": object()}, [task], model=model)
    fails_before_work(InputError, "tasks", evaluate, {"at2": at2}, [])
    fails_before_work(InputError, "tasks[1]", evaluate, {"at2": at2}, [task, 3.14])
    fails_before_work(InputError, ("tasks[1]", "max_length"), evaluate, {"at2": at2}, [task, _long_task(n_ctx)])
    no_response = ContextTask(CONTEXT, QUERY).tokenize(model.tokenizer)
    fails_before_work(InputError, ("tasks[0]", "no response"), evaluate, {"at2": at2}, [no_response])


def test_attribute_inputs_of_the_wrong_kind(at2: AT2Attribution, task: ContextTask, model: Any) -> None:
    fails_before_work(InputError, "inputs", at2.attribute, "The Nile is long.")
    fails_before_work(InputError, ("inputs", "no response"), at2.attribute,
                      ContextTask(CONTEXT, QUERY).tokenize(model.tokenizer))
    fails_before_work(InputError, "inputs", LeaveOneOut(model).attribute, {"context": "x"})


# ===================================================================================================== 5. models
@pytest.mark.parametrize(
    "cls", [AT2Attribution, AttentionAttribution, AverageAttention, LeaveOneOut, ContextCite, GradientXInput,
            IntegratedGradientsAttribution],
)
def test_model_that_is_not_transformer_lens(cls: type) -> None:
    fails_before_work(ModelNotSupportedError, ("model", "Linear"), cls, torch.nn.Linear(4, 4))


def _not_intervenable(model: Any) -> Backend:
    """A backend whose probe found that attention edits take effect nowhere (as on some model classes)."""
    backend = Backend(model)
    backend.__dict__["probe"] = AttentionProbe(True, True, False, False, None, False)
    return backend


@pytest.mark.parametrize("cls", [AT2Attribution, AttentionAttribution, AverageAttention, LeaveOneOut, ContextCite])
def test_model_whose_attention_cannot_be_intervened_on(model: Any, cls: type) -> None:
    fails_before_work(ModelNotSupportedError, ("cannot be intervened on", "attention_access"), cls,
                      _not_intervenable(model))


def test_gradient_baselines_need_no_attention_edits(model: Any) -> None:
    """The contrast: embedding-gradient baselines never edit attention, so the same backend is accepted."""
    assert GradientXInput(_not_intervenable(model)).backend.kind == get_backend(model).kind


def test_sdpa_bert_bridge_is_refused() -> None:
    """A real case: TL 3.9's bridge over an sdpa-attention BERT never fires hook_pattern."""
    bridge = primed(sdpa_bert_bridge())
    fails_before_work(ModelNotSupportedError, "hook_pattern never fires", AttentionAttribution, bridge)


def test_encoder_where_a_decoder_is_needed(tiny_bert_models: dict[str, Any]) -> None:
    encoder = primed(next(iter(tiny_bert_models.values())))
    for cls in (AT2Attribution, AverageAttention, LeaveOneOut, GradientXInput):
        fails_before_work(InputError, ("forward_func", "decoder"), cls, encoder)


# ===================================================================================================== 6. NaN/inf
@contextlib.contextmanager
def nan_attention_row(model: Any, layer: int = 0, row: int = -2) -> Iterator[None]:
    """Make one row of a layer's attention pattern NaN, as broken weights or a 0/0 softmax would."""
    point = model.hook_dict[f"blocks.{layer}.attn.hook_pattern"]

    def hook(module: Any, args: Any, pattern: torch.Tensor) -> torch.Tensor:
        pattern = pattern.clone()
        pattern[..., row, :] = float("nan")
        return pattern

    handle = point.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def fully_masked_row(model: Any, layer: int = 0, row: int = -2) -> Iterator[None]:
    """Mask every key of one attention row (scores = -inf before the softmax)."""
    point = model.hook_dict[f"blocks.{layer}.attn.hook_attn_scores"]

    def hook(module: Any, args: Any, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.clone()
        scores[..., row, :] = float("-inf")
        return scores

    handle = point.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def nan_model() -> Any:
    """A model of its own (hooks are added to it), probed before any NaN is injected."""
    from at2_lens.models.tiny import load_tiny
    from tests.conftest import BACKENDS

    return primed(load_tiny("llama", BACKENDS[0], seed=0))


def test_nan_row_really_reaches_the_pattern(nan_model: Any) -> None:
    """The precondition of the NaN cases: the injected row is NaN where the methods read hook_pattern."""
    with nan_attention_row(nan_model):
        _, cache = nan_model.run_with_cache(torch.tensor([[5, 6, 7, 8]]), names_filter="blocks.0.attn.hook_pattern")
    assert torch.isnan(cache["blocks.0.attn.hook_pattern"][0, :, -2]).all()


def test_fully_masked_row_gives_zeros_or_an_error(nan_model: Any, task: ContextTask) -> None:
    """Every key of a row masked: TL 3.9's HookedTransformer turns the 0/0 row into zeros itself, a bridge gives
    NaN. Either way no NaN score comes back: the scores are finite or NumericalError is raised."""
    at2 = AT2Attribution(nan_model)
    with fully_masked_row(nan_model):
        try:
            scores = at2.attribute(task).scores
        except NumericalError as exc:
            assert "NaN" in str(exc)
        else:
            assert torch.isfinite(scores).all()


@pytest.mark.parametrize(
    "make", [AT2Attribution, AverageAttention, LeaveOneOut, lambda m: ContextCite(m, n_ablations=4), GradientXInput,
             lambda m: IntegratedGradientsAttribution(m, n_steps=2)],
    ids=["AT2", "AverageAttention", "LeaveOneOut", "ContextCite", "GradientXInput", "IntegratedGradients"],
)
def test_nan_attention_never_gives_nan_scores(nan_model: Any, task: ContextTask, make: Callable[[Any], Any]) -> None:
    method = make(nan_model)
    with nan_attention_row(nan_model), pytest.raises(NumericalError, match="NaN"):
        method.attribute(task)
    assert torch.isfinite(method.attribute(task).scores).all()  # the same call without the broken row works


def test_nan_attention_in_attattr(nan_model: Any) -> None:
    attattr = AttentionAttribution(nan_model)
    with nan_attention_row(nan_model, layer=1), pytest.raises(NumericalError, match="layer 1 holds NaN"):
        attattr.attribute(torch.tensor([[5, 6, 7, 8]]), layers=[1], n_steps=2)


def test_nan_attention_in_collect_writes_nothing(nan_model: Any, task: ContextTask, tmp_path: Path) -> None:
    with nan_attention_row(nan_model), pytest.raises(NumericalError, match="NaN"):
        collect(nan_model, [task], tmp_path, n_masks=2, progress=False)
    assert not list(tmp_path.glob("examples/*.safetensors"))


def test_nan_attention_in_evaluate(nan_model: Any, task: ContextTask) -> None:
    with nan_attention_row(nan_model), pytest.raises(NumericalError):
        evaluate({"avg": AverageAttention(nan_model)}, [task], metrics=["kendall_gradxinput"], timing_repeats=1)


def test_non_finite_numbers_in_estimators_and_examples(model: Any) -> None:
    b = get_backend(model)
    fails_before_work(InputError, "weights", LinearEstimator, torch.full((b.n_layers, b.n_heads), float("nan")))
    feats = torch.rand(3, b.n_layers, b.n_heads)
    feats[1, 0, 0] = float("inf")
    fails_before_work(InputError, ("features", "NaN or inf"), AblationExample, 0, feats, torch.ones(2, 3) > 0,
                      torch.rand(2), 0.1)
    fails_before_work(InputError, ("outputs", "NaN or inf"), AblationExample, 0, torch.rand(3, b.n_layers, b.n_heads),
                      torch.ones(2, 3) > 0, torch.tensor([0.1, float("nan")]), 0.1)


# ================================================================================================ real: SmolLM2
@pytest.fixture(scope="module")
def smol(smollm2: Any) -> Any:
    return primed(smollm2)


@pytest.mark.real
def test_real_text_and_target(smol: Any) -> None:
    at2 = AT2Attribution(smol, estimator=load_estimator())
    fails_before_work(InputError, "target", at2.attribute, ContextTask(CONTEXT, QUERY, response=RESPONSE),
                      target=(0, 40))
    fails_before_work(InputError, ("sources[1]", "overlaps"), ContextTask, CONTEXT, QUERY, sources=[(0, 9), (4, 12)])
    fails_before_work(InputError, ("context", "special token"), at2.attribute,
                      ContextTask("Rivers <|im_end|> flow.", QUERY, response=RESPONSE))


@pytest.mark.real
def test_real_lengths_ids_and_padding(smol: Any) -> None:
    b = get_backend(smol)
    at2 = AT2Attribution(smol)
    fails_before_work(InputError, ("max_length", f"max_length={b.n_ctx}"), at2.attribute, _long_task(b.n_ctx))
    attattr = AttentionAttribution(smol)
    fails_before_work(InputError, ("inputs", "token ids"), attattr.attribute, torch.tensor([[1, 2, b.d_vocab]]))
    fails_before_work(InputError, ("inputs", "differ in length"), attattr.attribute, [[1, 2, 3], [1, 2]])
    pad = smol.tokenizer.pad_token_id
    if pad is not None:
        fails_before_work(InputError, "attention_mask", attattr.attribute, torch.tensor([[1, 2, 3], [1, pad, pad]]))


@pytest.mark.real
def test_real_estimator_files(smol: Any, model: Any, tmp_path: Path) -> None:
    shipped = load_estimator()
    fails_before_work(EstimatorFileError, ("n_layers=30", "does not match"), AT2Attribution, model, estimator=shipped)
    b = get_backend(model)
    path = _estimator_for(b.n_layers, b.n_heads, model_fingerprint(b)).save(tmp_path / "tiny.safetensors")
    fails_before_work(EstimatorFileError, (str(path), "n_layers=30", "vocab_sha256"), load_estimator, path, model=smol)
    corrupt = _rewrite(shipped.save(tmp_path / "smol.safetensors"), _flip_last_data_byte)
    fails_before_work(EstimatorFileError, (str(corrupt), "weights_sha256"), AT2Attribution, smol, estimator=corrupt)


@pytest.mark.real
def test_real_integration_arguments(smol: Any) -> None:
    attattr = AttentionAttribution(smol)
    ids = torch.tensor([[1, 2, 3, 4]])
    fails_before_work(InputError, "n_steps", attattr.attribute, ids, n_steps=0)
    fails_before_work(InputError, "method", attattr.attribute, ids, method="trapezium")
    fails_before_work(InputError, ("layers", "[0, 30)"), attattr.attribute, ids, layers=[30])


@pytest.mark.real
def test_real_model_support(smol: Any, minilm: Any) -> None:
    fails_before_work(InputError, ("forward_func", "decoder"), AT2Attribution, primed(minilm))
    fails_before_work(ModelNotSupportedError, "cannot be intervened on", AT2Attribution, _not_intervenable(smol))


@pytest.mark.real
@pytest.mark.slow
def test_real_nan_attention(smol: Any) -> None:
    at2 = AT2Attribution(smol)
    short = ContextTask("The Nile is long. The Amazon is wide.", QUERY, response="The Nile.")
    with nan_attention_row(smol, layer=3), pytest.raises(NumericalError, match="layer 3 holds NaN"):
        at2.attribute(short)
