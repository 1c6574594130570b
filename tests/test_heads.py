"""Decoder head finders (``at2_lens.heads``), the needle generator and the one-call causal checks."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from at2_lens.ablation.outputs import span_output
from at2_lens.backends import get_backend
from at2_lens.errors import InputError
from at2_lens.head_ablation import ablate_heads, top_heads
from at2_lens.heads import (
    ablation_reference,
    at2_head_importance,
    attattr_head_importance,
    causal_check,
    compare_rankings,
    knockout_check,
    query_focus_scores,
    retrieval_scores,
)
from at2_lens.tasks import TokenizedTask, prepare_task
from at2_lens.tasks.needle import NEEDLE_TEMPLATE, haystack_sentences, needle_tasks
from tests.conftest import BACKENDS

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------ needle tasks
def test_needle_tasks_are_deterministic_and_place_the_needle_where_they_say() -> None:
    a = needle_tasks(6, seed=3, n_sentences=4)
    assert a == needle_tasks(6, seed=3, n_sentences=4)
    assert [t.task.context for t in a] != [t.task.context for t in needle_tasks(6, seed=4, n_sentences=4)]
    for i, t in enumerate(a):
        s, e = t.needle_span
        assert t.task.context[s:e] == NEEDLE_TEMPLATE.format(key=t.key, code=t.code)
        assert tuple(t.task.sources[t.needle_index]) == (s, e)
        assert t.n_sources == 5
        assert t.depth == (0.0, 0.25, 0.5, 0.75, 1.0)[i % 5] and t.needle_index == round(t.depth * 4)
        assert t.task.response is not None and t.task.target is not None
        c0, c1 = t.task.target.start, t.task.target.end
        assert t.task.response[c0:c1] == t.code and len(t.code) == 4 and t.code.isdigit()
    assert set(haystack_sentences("train")).isdisjoint(haystack_sentences("held_out"))
    held = needle_tasks(2, seed=3, split="held_out", n_sentences=4)
    pool = set(haystack_sentences("held_out"))
    spans = held[0].task.sources
    sentences = [held[0].task.context[s:e] for s, e in spans]
    assert all(x in pool for j, x in enumerate(sentences) if j != held[0].needle_index)


def test_needle_tasks_refuse_bad_arguments() -> None:
    with pytest.raises(InputError, match="n"):
        needle_tasks(0)
    with pytest.raises(InputError, match="depths"):
        needle_tasks(2, depths=(0.5, 1.5))
    with pytest.raises(InputError, match="depths"):
        needle_tasks(2, depths=())
    with pytest.raises(InputError, match="split"):
        needle_tasks(2, split="test")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="n_sentences"):
        needle_tasks(1, n_sentences=100_000)


# ------------------------------------------------------------------------------------------------ finders (tiny)
def _copy_task(model: Any) -> TokenizedTask:
    """Context token ids 60..79 (positions 0..19), a three-token query, and a response copying the context tokens at
    positions 14, 15, 16."""
    ids = [*range(60, 80), 5, 6, 7, 74, 75, 76]
    return TokenizedTask.from_tokens(ids, [(0, 10), (10, 20)], (23, 26), tokenizer=model.tokenizer)


def test_a_planted_retrieval_head_is_found(tiny_llama: Any) -> None:
    """A head whose attention at every target row points at the context copy of the token it produces scores 1."""
    task = _copy_task(tiny_llama)
    b = get_backend(tiny_llama)
    layer, head = b.n_layers - 1, 1

    def plant(pattern: torch.Tensor, hook: Any) -> torch.Tensor:
        if pattern.shape[-1] != task.seq_len:  # another input (the backend's probe)
            return pattern
        pattern = pattern.clone()
        for row, key in ((22, 14), (23, 15), (24, 16)):  # row t-1 produces token t, copied from key
            pattern[:, head, row] = 0.0
            pattern[:, head, row, key] = 1.0
        return pattern

    with tiny_llama.hooks(fwd_hooks=[(f"blocks.{layer}.attn.hook_pattern", plant)]):
        scores, counted = retrieval_scores(tiny_llama, [task], only_generated=False, return_counts=True)
    assert counted == 3
    assert scores.shape == (b.n_layers, b.n_heads)
    assert scores[layer, head] == 1.0
    assert top_heads(scores, 1) == [(layer, head)]
    assert float(scores.min()) >= 0.0 and float(scores.max()) <= 1.0
    with pytest.raises(InputError, match="copied"):  # the random model produces none of these tokens itself
        retrieval_scores(tiny_llama, [task])


def test_query_focus_is_attention_mass_and_validates(tiny_llama: Any) -> None:
    tasks = needle_tasks(2, seed=0, n_sentences=1)
    b = get_backend(tiny_llama)
    raw = query_focus_scores(tiny_llama, tasks, calibrate=False)
    assert raw.shape == (b.n_layers, b.n_heads)
    assert float(raw.min()) >= 0.0 and float(raw.max()) <= 1.0 + 1e-5
    whole = query_focus_scores(tiny_llama, tasks, calibrate=False, relevant=[[0, 1], [0, 1]])
    assert (whole >= raw - 1e-6).all()  # the whole context holds the needle
    cal = query_focus_scores(tiny_llama, tasks)
    assert not torch.allclose(cal, raw)
    with pytest.raises(InputError, match="relevant"):
        query_focus_scores(tiny_llama, tasks, relevant=[[0]])
    with pytest.raises(InputError, match="relevant"):
        query_focus_scores(tiny_llama, tasks, relevant=[[5], None])
    with pytest.raises(InputError, match="calibrate"):
        query_focus_scores(tiny_llama, [_copy_task(tiny_llama)], calibrate=True)


def test_attattr_and_at2_rankings(tiny_llama: Any) -> None:
    from at2_lens.at2.estimator import LinearEstimator

    b = get_backend(tiny_llama)
    imp = attattr_head_importance(tiny_llama, needle_tasks(1, n_sentences=1), n_steps=2)
    assert imp.shape == (b.n_layers, b.n_heads) and torch.isfinite(imp).all()
    est = LinearEstimator(torch.arange(b.n_layers * b.n_heads, dtype=torch.float32).view(b.n_layers, b.n_heads))
    w = at2_head_importance(est)
    assert torch.equal(w, est.weights)
    w[0, 0] = 99.0
    assert est.weights[0, 0] == 0.0  # a copy
    with pytest.raises(InputError, match="estimator"):
        at2_head_importance(3)
    with pytest.raises(InputError, match="n_steps"):
        attattr_head_importance(tiny_llama, needle_tasks(1, n_sentences=1), n_steps=0)


def test_compare_rankings() -> None:
    a = torch.arange(12.0).view(3, 4)
    out = compare_rankings({"a": a, "b": a * 2, "c": -a}, k=3)
    assert list(out["spearman"].round(6)) == [1.0, -1.0, -1.0]
    assert list(out["overlap"]) == [3, 0, 0]
    with pytest.raises(InputError, match="two"):
        compare_rankings({"a": a})


# ------------------------------------------------------------------------------------------------ causal checks
@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_check_rows_match_ablate_heads(tiny_llama_models: dict[str, Any], backend: str) -> None:
    """Each batch row's own ablation equals ``ablate_heads`` run alone (zero, and mean over one reference task)."""
    model = tiny_llama_models[backend]
    b = get_backend(model)
    tasks = needle_tasks(2, seed=1, n_sentences=1)
    ref = needle_tasks(1, seed=9, n_sentences=1)
    ranking = torch.randn(b.n_layers, b.n_heads, generator=torch.Generator().manual_seed(0))
    res = causal_check(model, {"r": ranking}, tasks, k=3, how=("zero", "mean"), n_random=4, reference=ref, seed=0)
    assert len(res.rows) == 2 * 2 * (1 + 2)
    assert res.n_random_per_task == 2
    heads = top_heads(ranking, 3)
    assert res.heads["r"] == heads
    ref_ids = ref[0].task.tokenize(b.tokenizer).input_ids
    for i, t in enumerate(tasks):
        tt = prepare_task(b, t.task)
        t0, t1 = tt.target_token_range
        for how in ("zero", "mean"):
            kw = {} if how == "zero" else {"reference": ref_ids}
            with ablate_heads(model, heads, how, **kw), torch.no_grad():  # type: ignore[arg-type]
                logits = b.run(tt.input_ids[None])[:, t0 - 1 : t1 - 1]
            want = float(span_output(logits, tt.input_ids[t0:t1][None], "log_prob")[0])
            got = res.rows.query(f"task == {i} and mode == '{how}' and set == 'r'")["ablated"].item()
            assert got == pytest.approx(want, abs=1e-4)


def test_causal_check_k0_is_no_change_and_intervals_hold_the_mean(tiny_llama: Any) -> None:
    b = get_backend(tiny_llama)
    tasks = needle_tasks(3, seed=2, n_sentences=1)
    ranks = {"a": torch.rand(b.n_layers, b.n_heads), "b": torch.rand(b.n_layers, b.n_heads)}
    ref = ablation_reference(tiny_llama, needle_tasks(2, seed=5, n_sentences=1))
    zero = causal_check(tiny_llama, ranks, tasks, k=0, n_random=3, reference=ref)
    assert zero.rows["delta"].abs().max() == 0.0
    res = causal_check(tiny_llama, ranks, tasks, k=2, n_random=9, reference=ref, seed=1, n_bootstrap=200)
    s = res.summary()
    assert len(s) == 3 * 2 and set(s["mode"]) == {"zero", "mean", "resample"}
    assert (s["delta_lo"] <= s["delta"] + 1e-9).all() and (s["delta"] <= s["delta_hi"] + 1e-9).all()
    assert (s["random_lo"] <= s["random_delta"] + 1e-9).all() and (s["random_delta"] <= s["random_hi"] + 1e-9).all()
    assert (res.rows.groupby(["mode", "task"]).size() == 2 + 3).all()
    md = res.to_markdown()
    assert md.count("\n") == 1 + len(s) and "resample" in md
    again = causal_check(tiny_llama, ranks, tasks, k=2, n_random=9, reference=ref, seed=1, n_bootstrap=200)
    assert again.rows["ablated"].tolist() == res.rows["ablated"].tolist()  # seeded


def test_causal_check_refuses_bad_input_before_model_work(tiny_llama: Any) -> None:
    b = get_backend(tiny_llama)
    tasks = needle_tasks(1, n_sentences=1)
    r = torch.rand(b.n_layers, b.n_heads)
    with pytest.raises(InputError, match="how"):
        causal_check(tiny_llama, r, tasks, k=2, how="shuffle")
    with pytest.raises(InputError, match="reference"):
        causal_check(tiny_llama, r, tasks, k=2, how="mean")
    with pytest.raises(InputError, match="rankings"):
        causal_check(tiny_llama, {"a": torch.rand(2, 2)}, tasks, k=2, how="zero")
    with pytest.raises(InputError, match="rankings"):
        causal_check(tiny_llama, {"random": r}, tasks, k=2, how="zero")
    with pytest.raises(InputError, match="k"):
        causal_check(tiny_llama, r, tasks, how="zero", k=b.n_layers * b.n_heads + 1)
    with pytest.raises(InputError, match="task_ids"):
        causal_check(tiny_llama, r, tasks, k=2, how="zero", task_ids=[1, 2])
    with pytest.raises(InputError, match="tasks"):
        causal_check(tiny_llama, r, "not tasks", k=2, how="zero")


def test_knockout_check(tiny_llama: Any) -> None:
    tasks = needle_tasks(2, seed=0, n_sentences=1)
    res = knockout_check(tiny_llama, [(0, 0), (1, 1)], tasks)
    rows = res.rows
    assert list(rows["gold"]) == [t.needle_index for t in tasks]
    assert (rows["gold"] != rows["other"]).all()
    assert (rows["delta_gold"] != 0).all()
    assert "needle" not in res.to_markdown() and res.summary()["tasks"].item() == 2
    with pytest.raises(InputError, match="gold"):
        knockout_check(tiny_llama, [(0, 0)], [t.task for t in tasks])
    with pytest.raises(InputError, match="heads"):
        knockout_check(tiny_llama, [(99, 0)], tasks)


# ------------------------------------------------------------------------------------------------ SmolLM2
@pytest.mark.real
@pytest.mark.slow
def test_smollm2_retrieval_heads_matter_on_needle_tasks(smollm2: Any) -> None:
    """On SmolLM2: retrieval scores of 2 short needle tasks are fractions; ablating the top-10 heads lowers the
    gold code's log-probability on a held-out needle task."""
    tasks = needle_tasks(2, seed=0, n_sentences=3)
    scores, counted = retrieval_scores(smollm2, tasks, return_counts=True)
    assert scores.shape == (30, 9) and counted >= 4
    assert float(scores.min()) >= 0.0 and float(scores.max()) <= 1.0 and float(scores.max()) > 0.5
    held = needle_tasks(1, seed=1, split="held_out", n_sentences=3)
    res = causal_check(smollm2, {"retrieval": scores}, held, k=10, how="zero", n_random=1)
    delta = res.rows.query("set == 'retrieval'")["delta"].item()
    assert delta < -0.5


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_decoder_study_options_and_early_errors(capsys: pytest.CaptureFixture[str]) -> None:
    from at2_lens.cli import build_parser, main

    help_text = build_parser()._subparsers._group_actions[0].choices["heads"].format_help()  # type: ignore[union-attr]
    for option in ("--study", "--finders", "--how", "--k", "--n-random", "--n-needle", "--n-squad", "--out"):
        assert option in help_text
    for word in ("retrieval", "query_focus", "attattr", "at2", "resample", "mean"):
        assert word in help_text
    args = build_parser().parse_args(["heads", "--study", "decoder"])
    assert args.study == "decoder" and args.model is None and args.k == 10
    assert build_parser().parse_args(["heads"]).study == "encoder"
    for argv, expect in (
        (["--finders", "retrieval,bogus"], "--finders"),
        (["--how", "zero,shuffle"], "--how"),
        (["--k", "0"], "--k"),
        (["--n-squad", "40"], "--n-squad"),
        (["--model", "minilm"], "encoder"),
    ):
        assert main(["heads", "--study", "decoder", *argv]) == 2
        assert expect in capsys.readouterr().err
