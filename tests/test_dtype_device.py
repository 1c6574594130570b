"""Models in any dtype and on any device: the probe, AT2 / AttAttr / leave-one-out, AT2's cache key on the
model's state, ``dtype=`` at load time, and log-probabilities computed on the logits' device."""

from __future__ import annotations

import functools
import warnings
from typing import Any

import pytest
import torch
from scipy.stats import spearmanr

from at2_lens.ablation import span_output
from at2_lens.ablation.outputs import log1mexp, target_logprobs
from at2_lens.at2.attribution import AT2Attribution
from at2_lens.attattr import AttentionAttribution
from at2_lens.backends import get_backend
from at2_lens.backends.probe import probe_attention, zero_tolerance
from at2_lens.baselines.perturbation import LeaveOneOut
from at2_lens.errors import InputError
from at2_lens.models import load_model, resolve_dtype
from at2_lens.models.tiny import load_tiny
from at2_lens.tasks import ContextTask
from tests.conftest import BACKENDS

pytestmark = pytest.mark.usefixtures("one_thread")

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]  # every float dtype the CPU runs
TOKENS = torch.tensor([5, 70, 71, 72, 33, 90, 100, 44, 45, 46, 120, 7])
TASK = ContextTask(
    context=["The cat sat on the mat. Dogs bark loudly at night.", "Paris is the capital of France."],
    query="Where does the cat sit?", response="On the mat.", sources="sentence",
)
# Measured on the demo task (9 sentence sources, response generated in float32, shipped estimator): bfloat16 vs
# float32 Spearman 0.983, Kendall 0.944, same top-1 and top-3; float16 vs float32 Spearman 1.0.
HALF_MIN_SPEARMAN = 0.9


@functools.cache
def _tiny(arch: str, backend: str, dtype: torch.dtype) -> Any:
    """A tiny model loaded in ``dtype`` (shared by the read-only tests below; never edited)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_tiny(arch, backend, dtype=dtype)  # type: ignore[arg-type]


def _dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ------------------------------------------------------------------------------------------ 1. the probe, methods
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_probe_measures_the_same_in_every_dtype(backend_name: str, dtype: torch.dtype) -> None:
    for arch, causal in (("llama", True), ("bert", False)):
        model = _tiny(arch, backend_name, dtype)
        assert {p.dtype for p in model.parameters()} == {dtype}
        probe = probe_attention(get_backend(model))
        assert probe.causal is causal, (arch, dtype)
        assert probe == probe_attention(get_backend(_tiny(arch, backend_name, torch.float32)))


def test_zero_tolerance_is_representable() -> None:
    # the bug: 1e-8 is 0 in float16, so exact zeros were not "< 1e-8" and decoders looked like encoders
    assert torch.tensor(1e-8, dtype=torch.float16).item() == 0.0
    for dtype in DTYPES:
        assert 0.0 < zero_tolerance(dtype) <= 1e-3
    assert zero_tolerance(torch.float32) == 1e-8


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_methods_construct_and_attribute_in_every_dtype(backend_name: str, dtype: torch.dtype) -> None:
    model = _tiny("llama", backend_name, dtype)
    at2 = AT2Attribution(model).attribute(TASK)
    loo = LeaveOneOut(model).attribute(TASK)
    assert at2.scores.shape == loo.scores.shape == (3,)
    assert torch.isfinite(at2.scores).all() and torch.isfinite(loo.scores).all()
    aa = AttentionAttribution(model).attribute(TOKENS, 101, n_steps=4)
    assert torch.isfinite(aa.attributions).all()
    # and the encoder, with masked-LM labels
    encoder = _tiny("bert", backend_name, dtype)
    labels = torch.full_like(TOKENS, -100)
    labels[3] = 50
    enc = AttentionAttribution(encoder).attribute(TOKENS, labels, n_steps=4)
    assert torch.isfinite(enc.attributions).all()


@pytest.mark.real
def test_smollm2_in_half_precision_agrees_with_float32(smollm2: object) -> None:
    from at2_lens.tasks.loaders import demo_task

    full = AT2Attribution.for_model(smollm2).attribute(demo_task())  # the response, generated in float32
    fp16 = load_model("smollm2").to(torch.float16)  # the recipe: cast after loading
    assert get_backend(fp16).is_causal
    AttentionAttribution(fp16)
    LeaveOneOut(fp16)
    bf16 = load_model("smollm2", dtype="bfloat16")
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    for model in (fp16, bf16):
        at2 = AT2Attribution.for_model(model)
        half = at2.attribute(full.task)
        at2.attribute(full.task)
        assert at2.forward_passes == 1  # the state key is stable across forward passes of a real model
        assert torch.isfinite(half.scores).all()
        rho = spearmanr(full.scores.numpy(), half.scores.numpy()).statistic
        assert rho >= HALF_MIN_SPEARMAN, rho
        assert int(half.scores.argmax()) == int(full.scores.argmax())


# --------------------------------------------------------------------------------- 2. AT2's cache and the model
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_at2_cache_follows_the_models_state(backend_name: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_tiny("llama", backend_name)  # its own copy: this test edits it
    at2 = AT2Attribution(model)
    first = at2.attribute(TASK).scores
    assert at2.forward_passes == 1
    assert torch.equal(at2.attribute(TASK).scores, first) and at2.forward_passes == 1  # unchanged: reused

    model.to(torch.bfloat16)  # dtype changed
    cast = at2.attribute(TASK).scores
    assert at2.forward_passes == 2 and not torch.equal(cast, first)
    at2.attribute(TASK)
    assert at2.forward_passes == 2

    model.to(torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(1.5)  # in-place edits: they bump the version counters
    edited = at2.attribute(TASK).scores
    assert at2.forward_passes == 3 and not torch.equal(edited, cast)

    module, name = next((m, n) for m in model.modules() for n, p in m.named_parameters(recurse=False))
    setattr(module, name, torch.nn.Parameter(getattr(module, name).detach().clone()))  # a replaced tensor
    at2.attribute(TASK)
    assert at2.forward_passes == 4
    at2.clear_cache()
    at2.attribute(TASK)
    assert at2.forward_passes == 5


def test_state_token_sees_a_device_move() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_tiny("llama", BACKENDS[-1])
    backend = get_backend(model)
    before = backend.state_token()
    assert backend.state_token() == before  # cheap and stable while nothing changes
    model.to("meta")  # no GPU here: the meta device stands in for another device
    after = backend.state_token()
    assert after != before and all(device == "meta" for _, device in after[0])


# -------------------------------------------------------------------------------------------- 3. dtype= at load
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_load_with_dtype_names_and_dtypes(backend_name: str) -> None:
    for arch in ("llama", "bert"):
        for given, want in (("bfloat16", torch.bfloat16), (torch.float16, torch.float16), ("float64", torch.float64)):
            model = load_tiny(arch, backend_name, dtype=given)  # type: ignore[arg-type]
            assert {p.dtype for p in model.parameters()} == {want}
            assert get_backend(model).run(TOKENS[None]).dtype == want


@pytest.mark.parametrize("bad", ["int8", "fp8", torch.int32, torch.complex64, 16, None])
def test_bad_dtype_refused_before_loading(bad: Any) -> None:
    with pytest.raises(InputError, match="dtype"):
        load_model("smollm2", dtype=bad)
    with pytest.raises(InputError, match="dtype"):
        load_model("some/model-that-is-never-fetched", dtype=bad)
    with pytest.raises(InputError, match="dtype"):
        load_tiny("llama", dtype=bad)


def test_resolve_dtype_names() -> None:
    assert resolve_dtype("torch.bfloat16") is torch.bfloat16
    assert resolve_dtype(" FP16 ") is torch.float16 and resolve_dtype("half") is torch.float16
    assert resolve_dtype(torch.float32) is torch.float32


@pytest.mark.real
def test_minilm_loads_in_float16(minilm: object) -> None:
    model = load_model("minilm", dtype=torch.float16)
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    assert not get_backend(model).is_causal


# ------------------------------------------------------------------------------- 4. log-probs on the logits' device
def _reference(logits: torch.Tensor, target: torch.Tensor, output: str) -> torch.Tensor:
    """The former computation: log-softmax over the whole vocabulary in float64."""
    lp = torch.log_softmax(logits.double(), dim=-1).gather(-1, target[..., None])[..., 0].sum(dim=-1)
    return (lp if output == "log_prob" else lp - log1mexp(lp)).float()


@pytest.mark.parametrize("output", ["log_prob", "logit_prob"])
def test_span_output_equals_the_float64_reference(output: str) -> None:
    g = torch.Generator().manual_seed(0)
    for scale in (1.0, 5.0, 30.0):
        logits = torch.randn(3, 4, 5000, generator=g) * scale
        target = torch.randint(0, 5000, (3, 4), generator=g)
        target[1] = logits[1].argmax(dim=-1)  # likely, not certain
        got, want = span_output(logits, target, output), _reference(logits, target, output)
        assert got.device == logits.device and got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_near_certain_targets_keep_their_digits() -> None:
    # log p = -log1p(R) with R ~ 1e-23: float64's log-softmax rounds it to 0 (and the logit-probability to its
    # clamp); the new form keeps it.
    logits = torch.randn(1, 2, 5000, generator=torch.Generator().manual_seed(1))
    logits[..., 7] = 60.0
    target = torch.full((1, 2), 7)
    others = torch.cat([logits[..., :7], logits[..., 8:]], dim=-1).double()
    rest = torch.exp(others - 60.0).sum(-1)  # the other tokens' mass, without the 1 that swamps it
    want = -torch.log1p(rest).sum(-1)
    torch.testing.assert_close(span_output(logits, target, "log_prob").double(), want, rtol=1e-4, atol=0)
    torch.testing.assert_close(
        span_output(logits, target, "logit_prob").double(), want - log1mexp(want), rtol=1e-4, atol=0
    )


def test_target_logprobs_stay_on_the_input_device_and_differentiate() -> None:
    # meta tensors have no data: any host round trip (.item(), .cpu(), .tolist()) on the way would raise
    logits = torch.empty(2, 3, 100, device="meta", dtype=torch.bfloat16)
    target = torch.zeros(2, 3, dtype=torch.long, device="meta")
    for output in ("log_prob", "logit_prob"):
        out = span_output(logits, target, output)  # type: ignore[arg-type]
        assert out.device.type == "meta" and out.shape == (2,)
    x = torch.randn(2, 50, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([3, 4])
    (got,) = torch.autograd.grad(target_logprobs(x, t).sum(), x)
    (want,) = torch.autograd.grad(torch.log_softmax(x, -1).gather(-1, t[:, None]).sum(), x)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)
