"""AT2 end to end on tiny models: features, ablations, collection, training, the Captum class."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from captum.attr import Attribution

from at2_lens.ablation import (
    extract_features,
    mask_mode_outputs,
    output_from_logprob,
    random_masks,
    removal_builder,
    remove_mode_outputs,
    span_output,
    token_keep,
)
from at2_lens.at2.attribution import AT2Attribution
from at2_lens.at2.collect import collect
from at2_lens.at2.estimator import LinearEstimator, model_fingerprint
from at2_lens.at2.training import train_estimator
from at2_lens.backends import get_backend
from at2_lens.errors import EstimatorFileError, InputError
from at2_lens.tasks import ContextTask, TokenizedTask

CONTEXT = [
    "The cat sat on the mat. Dogs bark loudly at night.",
    "Paris is the capital of France. The sky is blue today.",
    "Water boils at 100 degrees. Ice melts in the sun.",
]
ROOT = Path(__file__).resolve().parents[1]


def _task(i: int = 0, response: str | None = "The answer is here.") -> ContextTask:
    return ContextTask(context=CONTEXT, query=f"Question number {i}?", response=response, sources="sentence")


def _tokenized(model: object):
    return _task().tokenize(get_backend(model).tokenizer, max_length=get_backend(model).n_ctx)


def test_features_equal_a_full_cache_computation(tiny_llama: object) -> None:
    b = get_backend(tiny_llama)
    tt = _tokenized(tiny_llama)
    fpass = extract_features(tiny_llama, tt.input_ids, list(tt.source_token_ranges), tt.target_token_range)
    _, cache = b.model.run_with_cache(tt.input_ids[None], names_filter=lambda n: n.endswith("hook_pattern"))
    t0, t1 = tt.target_token_range
    expected = torch.zeros(tt.n_sources, b.n_layers, b.n_heads)
    for layer in range(b.n_layers):
        rows = cache[f"blocks.{layer}.attn.hook_pattern"][0, :, t0 - 1 : t1 - 1]  # rows that predict the target
        for s, (a, e) in enumerate(tt.source_token_ranges):
            expected[s, layer] = rows[:, :, a:e].sum(-1).mean(-1)
    torch.testing.assert_close(fpass.features(), expected, atol=1e-6, rtol=0)
    # Token log-probs read in the same pass equal the model's.
    logits = b.run(tt.input_ids[None])
    lp = torch.log_softmax(logits[0, t0 - 1 : t1 - 1], -1).gather(-1, tt.input_ids[t0:t1, None])[:, 0]
    torch.testing.assert_close(fpass.token_logprobs, lp, atol=1e-5, rtol=0)


def test_outputs_are_stable_and_consistent() -> None:
    logits = torch.randn(2, 3, 11)
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    log_p = span_output(logits, ids, "log_prob")
    logit = span_output(logits, ids, "logit_prob")
    p = log_p.double().exp()
    torch.testing.assert_close(logit.double(), torch.log(p / (1 - p)), atol=1e-5, rtol=1e-5)
    # A near-certain target stays finite.
    assert torch.isfinite(output_from_logprob(torch.tensor(-1e-9))).all()
    with pytest.raises(InputError, match="output"):
        span_output(logits, ids, "prob")  # type: ignore[arg-type]


def test_masks_are_deterministic_and_validated() -> None:
    a, b = random_masks(7, 32, 0.5, seed=3), random_masks(7, 32, 0.5, seed=3)
    assert torch.equal(a, b) and not torch.equal(a, random_masks(7, 32, 0.5, seed=4))
    assert 0.3 < a.float().mean() < 0.7
    with pytest.raises(InputError, match="keep_prob"):
        random_masks(3, 4, keep_prob=1.0)
    keep = token_keep(torch.tensor([[True, False]]), [(1, 3), (3, 5)], 6)
    assert keep.tolist() == [[True, True, True, False, False, True]]


def test_mask_mode_all_kept_equals_full_output_and_is_batch_invariant(tiny_llama: object) -> None:
    tt = _tokenized(tiny_llama)
    src, tgt = list(tt.source_token_ranges), tt.target_token_range
    masks = torch.cat([torch.ones(1, len(src), dtype=torch.bool), random_masks(len(src), 5, seed=1)])
    out1 = mask_mode_outputs(tiny_llama, tt.input_ids, src, tgt, masks, batch_size=1)
    out6 = mask_mode_outputs(tiny_llama, tt.input_ids, src, tgt, masks, batch_size=6)
    torch.testing.assert_close(out1, out6, atol=1e-4, rtol=0)
    fpass = extract_features(tiny_llama, tt.input_ids, src, tgt)
    torch.testing.assert_close(out1[0], output_from_logprob(fpass.token_logprobs.sum()), atol=1e-4, rtol=0)
    assert out1[1:].std() > 0  # ablations change the output
    with pytest.raises(InputError, match="masks"):
        mask_mode_outputs(tiny_llama, tt.input_ids, src, tgt, masks[:, :2])


def test_mask_and_remove_agree_on_a_rotary_model(tiny_llama: object) -> None:
    tt = _tokenized(tiny_llama)
    src, tgt = list(tt.source_token_ranges), tt.target_token_range
    masks = random_masks(len(src), 16, seed=0)
    masked = mask_mode_outputs(tiny_llama, tt.input_ids, src, tgt, masks)
    removed = remove_mode_outputs(tiny_llama, removal_builder(get_backend(tiny_llama).tokenizer, tt), masks)
    corr = torch.corrcoef(torch.stack([masked, removed]))[0, 1]
    assert corr > 0.99, f"mask vs remove correlation {corr:.4f}"
    # Keeping everything, removal is the identity.
    ids, rng = removal_builder(get_backend(tiny_llama).tokenizer, tt)(torch.ones(len(src), dtype=torch.bool))
    assert torch.equal(ids, tt.input_ids) and rng == tgt


def test_attribution_is_a_captum_class_and_reuses_the_pass(tiny_llama: object) -> None:
    at2 = AT2Attribution(tiny_llama)
    assert isinstance(at2, Attribution) and not at2.has_convergence_delta()
    res = at2.attribute(_task())
    assert res.scores.shape == (6,) and at2.forward_passes == 1
    assert res.extra["forward_passes"] == 1 and res.extra["backward_passes"] == 0
    assert isinstance(res.task, TokenizedTask) and res.task.response == "The answer is here."
    # Uniform weights: the score is average attention over all heads.
    tt = res.task
    fpass = extract_features(tiny_llama, tt.input_ids, list(tt.source_token_ranges), tt.target_token_range)
    torch.testing.assert_close(res.scores, fpass.features().mean(dim=(1, 2)), atol=1e-6, rtol=0)
    # A sub-span of the same response: no new forward pass, and the per-token scores average to the span's.
    sub = at2.attribute(tt, target=(4, 10), per_token=True)
    assert at2.forward_passes == 1
    assert sub.extra["forward_passes"] == 0  # each result reports its own call's passes
    assert sub.target_text == "answer"
    torch.testing.assert_close(sub.token_scores.mean(0), sub.scores, atol=1e-6, rtol=0)
    df = res.to_dataframe()
    assert list(df.columns) == ["source", "text", "start", "end", "score", "rank"]
    assert df.loc[df["rank"] == 1, "source"].item() == res.top_k(1)[0][0]
    assert "at2-source" in res._repr_html_()


def test_attribution_generates_the_response_greedily(tiny_llama: object) -> None:
    at2 = AT2Attribution(tiny_llama)
    res = at2.attribute(_task(response=None), max_new_tokens=6)
    tt = res.task
    b = get_backend(tiny_llama)
    expected = b.generate_greedy(tt.input_ids[: tt.prompt_len], max_new_tokens=6)
    assert torch.equal(tt.input_ids[tt.prompt_len :], expected)


def test_estimator_for_another_model_is_refused(tiny_llama: object) -> None:
    fp = dict(model_fingerprint(get_backend(tiny_llama)), n_layers=30)
    est = LinearEstimator(torch.ones(30, 4) / 120, model_fingerprint=fp)
    with pytest.raises(EstimatorFileError, match="n_layers=30"):
        AT2Attribution(tiny_llama, estimator=est)


def test_collect_train_attribute(tiny_llama: object, tmp_path: Path) -> None:
    tasks = [_task(i) for i in range(10)]
    store = collect(tiny_llama, tasks, tmp_path / "store", n_masks=8, progress=False)
    assert len(store) == 10
    ex = store.load()
    assert ex[0].features.shape == (6, 2, 4) and ex[0].masks.shape == (8, 6)
    est, summary = train_estimator(ex[:8], held_out=ex[8:], steps=60, batch_size=8, progress=False,
                                   settings=store.settings)
    assert abs(est.weights.abs().sum().item() - 1.0) < 1e-5
    assert summary.lds_train >= summary.lds_train_init - 0.05
    path = est.save(tmp_path / "est.safetensors")
    res = AT2Attribution(tiny_llama, estimator=path).attribute(_task(99))
    assert res.method == "AT2" and torch.isfinite(res.scores).all()


def test_collect_rejects_bad_input(tiny_llama: object, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="tasks"):
        collect(tiny_llama, [], tmp_path)
    with pytest.raises(InputError, match="mode"):
        collect(tiny_llama, [_task()], tmp_path, mode="delete")  # type: ignore[arg-type]
    mixed = [_task(), ContextTask(context=CONTEXT, query="q?", response="r", sources="word")]
    with pytest.raises(InputError, match="granularity"):
        collect(tiny_llama, mixed, tmp_path)


_COLLECT_SCRIPT = """
import sys, warnings
warnings.simplefilter("ignore")
from at2_lens.models.tiny import load_tiny
from at2_lens.at2.collect import collect
from tests.test_at2 import _task
collect(load_tiny("llama", sys.argv[2]), [_task(i) for i in range(8)], sys.argv[1], n_masks=4, progress=False)
"""


@pytest.mark.slow
def test_collection_killed_with_sigkill_resumes_to_identical_files(tmp_path: Path, tiny_llama: object) -> None:
    backend = "hooked" if get_backend(tiny_llama).kind == "hooked_transformer" else "bridge"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = [sys.executable, "-c", _COLLECT_SCRIPT]
    subprocess.run([*run, str(tmp_path / "clean"), backend], check=True, env=env, cwd=ROOT, timeout=300)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*run, str(killed), backend], env=env, cwd=ROOT)
    deadline = time.time() + 240
    while time.time() < deadline and len(list((killed / "examples").glob("*.safetensors"))) < 2:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list((killed / "examples").glob("*.safetensors")))
    assert 2 <= done_before < 8, f"the kill came too late to test resuming ({done_before} examples written)"
    subprocess.run([*run, str(killed), backend], check=True, env=env, cwd=ROOT, timeout=300)
    clean_files = sorted(p.relative_to(tmp_path / "clean") for p in (tmp_path / "clean").rglob("*") if p.is_file())
    killed_files = sorted(p.relative_to(killed) for p in killed.rglob("*") if p.is_file())
    assert clean_files == killed_files
    for rel in clean_files:
        assert (tmp_path / "clean" / rel).read_bytes() == (killed / rel).read_bytes(), f"{rel} differs"


def test_for_model_falls_back_to_uniform_weights(tiny_llama: object, tmp_path: Path) -> None:
    at2 = AT2Attribution.for_model(tiny_llama)  # no estimator ships for the tiny model
    assert at2.uses_uniform_weights and at2.estimator.training is None
    fp = model_fingerprint(get_backend(tiny_llama))
    given = AT2Attribution.for_model(tiny_llama, LinearEstimator(torch.rand(2, 4), model_fingerprint=fp))
    assert not given.uses_uniform_weights


def test_public_names_and_load_estimator(tiny_llama: object, tmp_path: Path) -> None:
    import at2_lens

    assert at2_lens.ContextTask is ContextTask and at2_lens.AT2Attribution is AT2Attribution
    fp = model_fingerprint(get_backend(tiny_llama))
    path = LinearEstimator(torch.rand(2, 4), model_fingerprint=fp).save(tmp_path / "e.safetensors")
    est = at2_lens.load_estimator(path, model=tiny_llama)
    assert est.weights.shape == (2, 4)
    other = LinearEstimator(torch.rand(2, 4), model_fingerprint=dict(fp, d_model=999)).save(tmp_path / "o.safetensors")
    with pytest.raises(EstimatorFileError, match="d_model"):
        at2_lens.load_estimator(other, model=tiny_llama)
