"""Faithfulness metrics on hand-computed cases, the attention checks and ``evaluate`` on a tiny model, the
``evaluate`` command, the SQuAD split, and one real run on SmolLM2."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.spatial.distance import jensenshannon

from at2_lens.ablation import ground_truth, mask_mode_outputs, random_masks, span_output
from at2_lens.at2.attribution import AT2Attribution
from at2_lens.backends import get_backend
from at2_lens.baselines import AverageAttention, ContextCite, GradientXInput, LeaveOneOut
from at2_lens.cli.evaluate import add_evaluate_parser, cmd_evaluate
from at2_lens.data import SQUAD_V2_DEV_SUBSET
from at2_lens.errors import InputError
from at2_lens.evaluation.methods import build_methods
from at2_lens.evaluation.metrics import (
    adversarial_attention,
    attention_permutation_check,
    context_key_positions,
    jensen_shannon,
    kendall_tau,
    lds_score,
    permute_keys,
    predicted_outputs,
    topk_drop,
    topk_drop_from,
    topk_kendall_tau,
)
from at2_lens.evaluation.runner import evaluate, markdown_table, resolve_metrics, summarize
from at2_lens.evaluation.squad import is_held_out, squad_split
from at2_lens.ranking import top_k
from at2_lens.tasks import ContextTask, TokenizedTask
from at2_lens.tasks.sources import partition

CONTEXT = [
    "The cat sat on the mat. Dogs bark loudly at night.",
    "Paris is the capital of France. The sky is blue today.",
]
COLUMNS = ["method", "task", "metric", "k", "value", "n_sources", "forward_passes", "backward_passes", "time_ratio"]


def _tokenized(model: Any, query: str = "Which city?") -> TokenizedTask:
    b = get_backend(model)
    task = ContextTask(context=CONTEXT, query=query, response="The answer is here.", sources="sentence")
    return task.tokenize(b.tokenizer, max_length=b.n_ctx)


# ================================================================================================ pure metrics


@pytest.mark.line_independent
def test_lds_is_one_for_the_true_weights_of_a_linear_target() -> None:
    w = torch.tensor([3.0, -1.0, 0.5, 2.0, 0.0, -2.5])
    masks = random_masks(6, 64, seed=7)
    actual = masks.float() @ w + 0.25
    assert lds_score(w, masks, actual) == pytest.approx(1.0)
    # Any increasing affine map of the prediction (AT2's (2m - 1) form, a scale) gives the same LDS.
    assert lds_score(2 * w, masks, actual) == pytest.approx(1.0)
    assert lds_score(w, masks, (2 * masks.float() - 1) @ w) == pytest.approx(1.0)
    shuffled = w[torch.tensor([3, 5, 0, 1, 4, 2])]
    assert lds_score(shuffled, masks, actual) < 0.9
    assert lds_score(-w, masks, actual) == pytest.approx(-1.0)
    assert math.isnan(lds_score(torch.ones(6), torch.ones(64, 6, dtype=torch.bool), actual))


@pytest.mark.line_independent
def test_predicted_outputs_is_masks_times_scores() -> None:
    masks = torch.tensor([[1, 0, 1], [0, 0, 0], [1, 1, 1]], dtype=torch.bool)
    pred = predicted_outputs(torch.tensor([1.0, 2.0, 4.0]), masks)
    assert pred.tolist() == [5.0, 0.0, 7.0]
    with pytest.raises(Exception, match="source"):  # the shape check names the mismatched dimension
        predicted_outputs(torch.tensor([1.0, 2.0]), masks)


@pytest.mark.line_independent
def test_topk_drop_on_a_toy_where_the_important_sources_are_known() -> None:
    v = torch.tensor([0.0, 5.0, 0.0, 1.0, 0.0])  # output = sum of the kept sources' values

    def ablate(masks: torch.Tensor) -> torch.Tensor:
        return masks.float() @ v

    good = topk_drop_from(ablate, v, ks=(1, 2, 3))
    assert good == {1: 5.0, 2: 6.0, 3: 6.0}
    bad = topk_drop_from(ablate, -v, ks=(1, 2))  # ranks the useless sources first
    assert bad == {1: 0.0, 2: 0.0}
    assert math.isnan(topk_drop_from(ablate, v, ks=(6,), full=6.0)[6])  # k above the number of sources
    assert top_k([1.0, 3.0, 3.0, 0.0], 2) == [1, 2]  # ties broken by position


@pytest.mark.line_independent
def test_kendall_tau_on_known_rankings() -> None:
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)  # 5 concordant, 1 discordant pair
    assert math.isnan(kendall_tau([1, 1, 1], [1, 2, 3]))
    # Top-2 variant: union of the top-2 of each = {0, 1, 2}; on it the orders are (3,2,1) vs (2,3,1): tau 1/3.
    a, b = [3.0, 2.0, 1.0, 0.0, -1.0], [2.0, 3.0, 1.5, 5.0, -9.0]
    assert top_k(b, 2) == [3, 1]
    assert topk_kendall_tau(a, b, 2) == pytest.approx(kendall_tau([3, 2, 0], [2, 3, 5]))
    assert topk_kendall_tau(a, a, 2) == pytest.approx(1.0)


@pytest.mark.line_independent
def test_jensen_shannon_on_known_distributions() -> None:
    p, q = torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5])
    expected = 0.5 * math.log(1 / 0.75) + 0.5 * (0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25))
    assert float(jensen_shannon(p, q)) == pytest.approx(expected, abs=1e-6)  # 0.21576
    assert float(jensen_shannon(q, q)) == pytest.approx(0.0, abs=1e-9)
    assert float(jensen_shannon(p, torch.tensor([0.0, 1.0]))) == pytest.approx(math.log(2), abs=1e-6)
    rng = np.random.default_rng(0)
    a, b = rng.dirichlet(np.ones(7), size=4), rng.dirichlet(np.ones(7), size=4)
    ours = jensen_shannon(torch.tensor(a), torch.tensor(b)).numpy()
    np.testing.assert_allclose(ours, jensenshannon(a, b, axis=-1) ** 2, atol=1e-9)


@pytest.mark.line_independent
def test_permute_keys_moves_only_the_selected_weights() -> None:
    torch.manual_seed(0)
    pattern = torch.softmax(torch.randn(1, 2, 4, 5), dim=-1)
    rows = torch.tensor([False, False, True, True])
    heads = torch.tensor([True, False])
    identity = torch.arange(5).expand(1, 2, 5)
    assert torch.equal(permute_keys(pattern, identity, rows, heads), pattern)
    swap = identity.clone()
    swap[..., 1], swap[..., 3] = 3, 1
    out = permute_keys(pattern, swap, rows, heads)
    assert torch.equal(out[0, 0, 2:, 1], pattern[0, 0, 2:, 3]) and torch.equal(out[0, 0, 2:, 3], pattern[0, 0, 2:, 1])
    assert torch.equal(out[0, 1], pattern[0, 1]) and torch.equal(out[0, 0, :2], pattern[0, 0, :2])
    torch.testing.assert_close(out.sum(-1), pattern.sum(-1))


# ======================================================================================== model-running metrics


def test_ground_truth_and_topk_drop_equal_direct_ablations(tiny_llama: Any) -> None:
    task = _tokenized(tiny_llama)
    gt = ground_truth(tiny_llama, task, 8, seed=0, index=3)
    assert gt.masks.shape == (8, task.n_sources) and gt.forward_passes == 9
    assert not torch.equal(gt.masks, ContextCite(tiny_llama, 8).masks_for(task.n_sources))
    direct = mask_mode_outputs(tiny_llama, task.input_ids, list(task.source_token_ranges), task.target_token_range,
                               gt.masks, output="log_prob")
    torch.testing.assert_close(gt.log_probs, direct)
    b = get_backend(tiny_llama)
    t0, t1 = task.target_token_range
    with torch.no_grad():
        logits = b.run(task.input_ids[None])
    plain = span_output(logits[:, t0 - 1 : t1 - 1], task.input_ids[None, t0:t1], "log_prob")
    assert gt.full_log_prob == pytest.approx(float(plain[0]), abs=1e-4)
    scores = torch.tensor([0.1, 0.9, -0.2, 0.4])
    drops = topk_drop(tiny_llama, task, scores, ks=(1, 2))
    keep1 = torch.tensor([[True, False, True, True], [True, False, True, False]])
    ablated = mask_mode_outputs(tiny_llama, task.input_ids, list(task.source_token_ranges), task.target_token_range,
                                keep1, output="log_prob")
    assert drops[1] == pytest.approx(float(plain[0] - ablated[0]), abs=1e-4)
    assert drops[2] == pytest.approx(float(plain[0] - ablated[1]), abs=1e-4)


def test_identity_permutation_changes_nothing(tiny_llama: Any) -> None:
    task = _tokenized(tiny_llama)
    n_ctx = len(context_key_positions(task))
    ident = attention_permutation_check(tiny_llama, task, permutations=torch.arange(n_ctx).expand(3, -1))
    assert ident.forward_passes == 4 and ident.deltas.shape == (3,)
    assert float(ident.deltas.abs().max()) < 1e-4
    rand = attention_permutation_check(tiny_llama, task, 4, rows="after_context", seed=1)
    assert rand.forward_passes == 5 and rand.median_abs_delta > 1e-4
    again = attention_permutation_check(tiny_llama, task, 4, rows="after_context", seed=1)
    torch.testing.assert_close(rand.deltas, again.deltas)
    with pytest.raises(InputError, match="permutation"):
        attention_permutation_check(tiny_llama, task, permutations=torch.zeros(1, n_ctx, dtype=torch.long))


def test_adversarial_attention_stays_within_tolerance(tiny_llama: Any) -> None:
    task = _tokenized(tiny_llama)
    adv = adversarial_attention(tiny_llama, task, steps=6, tolerance=0.05)
    assert adv.forward_passes == 7 and adv.backward_passes == 6 and len(adv.trace) == 6
    assert 0.0 <= adv.max_jsd <= math.log(2) and abs(adv.delta) <= 0.05
    assert adv.max_head_jsd >= adv.max_jsd
    loose = adversarial_attention(tiny_llama, task, steps=6, tolerance=1e6, keys="all", layers=[1])
    assert loose.max_jsd > 0.01  # nothing constrains it: the divergence grows from the noisy start
    assert loose.max_jsd == pytest.approx(max(j for j, _ in loose.trace))


# ================================================================================================= evaluate


def test_evaluate_on_two_tasks_returns_the_tidy_table(tiny_llama: Any) -> None:
    tasks = [_tokenized(tiny_llama, "Which city?"), _tokenized(tiny_llama, "What colour is the sky?")]
    methods = {
        "at2_uniform": AT2Attribution(tiny_llama),
        "avg_attention": AverageAttention(tiny_llama),
        "loo": LeaveOneOut(tiny_llama),
        "contextcite8": ContextCite(tiny_llama, 8),
        "gradxinput": GradientXInput(tiny_llama),
    }
    df = evaluate(methods, tasks, ["lds", "topk_drop", "kendall", "attn_permutation"], n_eval_masks=8, ks=(1, 3, 5),
                  n_permutations=2)
    assert list(df.columns) == COLUMNS
    n = tasks[0].n_sources
    per_method = 1 + 2 * 3 + 4  # lds, top-k drop (2 modes x 3 k), 4 Kendall rows
    assert len(df) == 2 * (len(methods) * per_method + 1)
    lds = df[df.metric == "lds"]
    assert lds.value.between(-1, 1).all()
    cost = df.drop_duplicates(["method", "task"]).set_index(["method", "task"])
    assert (cost.loc["loo", "forward_passes"] == n + 1).all()
    assert (cost.loc["contextcite8", "forward_passes"] == 8).all()
    assert (cost.loc["at2_uniform", "forward_passes"] == 1).all()
    assert (cost.loc["gradxinput", "backward_passes"] == 1).all() and (cost.time_ratio > 0).all()
    # Uniform AT2 is average attention: identical metrics.
    a = df[df.method == "at2_uniform"].value.to_numpy()
    b = df[df.method == "avg_attention"].value.to_numpy()
    np.testing.assert_allclose(a, b, atol=1e-6, equal_nan=True)
    # A reference compared with itself; k above the number of sources is NaN.
    assert (df[(df.method == "loo") & (df.metric == "kendall_loo")].value == 1.0).all()
    assert df[(df.metric == "topk_drop_mask") & (df.k == 5)].value.isna().all()
    assert df.attrs["ground_truth_forward_passes"] == 2 * 9
    summary = summarize(df)
    assert list(summary.index) == [*methods, "attention_permutation"]
    assert {"lds", "topk_drop_mask@1", "forward passes", "time / forward"} <= set(summary.columns)
    table = markdown_table(summary)
    assert table.count("\n") == len(summary) + 1 and "| loo |" in table


def test_evaluating_task_by_task_with_global_ids_equals_evaluating_together(tiny_llama: Any) -> None:
    """Resuming and sharding evaluate a split piecewise; with the global task ids the rows must not change."""
    tasks = [_tokenized(tiny_llama, "Which city?"), _tokenized(tiny_llama, "What colour is the sky?")]
    methods = {"avg_attention": AverageAttention(tiny_llama), "contextcite8": ContextCite(tiny_llama, 8)}
    kw: dict[str, Any] = {"n_eval_masks": 6, "ks": (1, 2), "n_permutations": 2}
    metrics = ["lds", "topk_drop_mask", "attn_permutation"]
    whole = evaluate(methods, tasks, metrics, **kw)
    parts = [evaluate(methods, [t], metrics, task_ids=[i], **kw) for i, t in enumerate(tasks)]
    piecewise = pd.concat(parts, ignore_index=True)
    cols = ["method", "task", "metric", "k", "value", "forward_passes"]
    pd.testing.assert_frame_equal(whole[cols], piecewise[cols])
    with pytest.raises(InputError, match="task_ids"):
        evaluate(methods, tasks, metrics, task_ids=[0, 0], **kw)


def test_metric_and_method_names(tiny_llama: Any) -> None:
    assert resolve_metrics(["lds", "topk_drop"]) == ["lds", "topk_drop_mask", "topk_drop_remove"]
    with pytest.raises(InputError, match="unknown metric"):
        resolve_metrics(["accuracy"])
    methods = build_methods(tiny_llama, ["at2", "loo_remove", "contextcite64", "ig8", "last_layer_attention"])
    assert list(methods) == ["at2_uniform", "loo_remove", "contextcite64", "ig8", "last_layer_attention"]
    assert methods["loo_remove"].mode == "remove" and methods["contextcite64"].n_ablations == 64
    assert methods["ig8"].n_steps == 8
    with pytest.raises(InputError, match="unknown method"):
        build_methods(tiny_llama, ["shap"])
    with pytest.raises(InputError, match="duplicates"):
        build_methods(tiny_llama, ["loo", "loo_mask"])


def test_evaluate_command_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from at2_lens.models.tiny import save_tiny

    model_dir = save_tiny("llama", tmp_path / "model", seed=0)
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("\n".join(json.dumps({"context": CONTEXT, "query": q, "response": "The answer is here."})
                               for q in ("Which city?", "Which animal?")), encoding="utf-8")
    parser = argparse.ArgumentParser(prog="at2-lens")
    add_evaluate_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "results.csv"
    args = parser.parse_args(["evaluate", "--model", str(model_dir), "--tasks", str(tasks), "--limit", "1",
                              "--methods", "at2,avg_attention,loo,contextcite8", "--metrics", "lds,topk_drop_mask",
                              "--n-eval-masks", "6", "--ks", "1,2", "--out", str(out), "--quiet"])
    assert args.func is cmd_evaluate
    assert cmd_evaluate(args) == 0
    printed = capsys.readouterr().out
    assert "| at2_uniform |" in printed and "| contextcite8 |" in printed and "7 forward passes" in printed
    import pandas as pd

    df = pd.read_csv(out)
    assert set(df.method) == {"at2_uniform", "avg_attention", "loo", "contextcite8"} and set(df.task) == {0}


@pytest.mark.line_independent
def test_squad_split_is_deterministic_and_disjoint() -> None:
    path = SQUAD_V2_DEV_SUBSET
    train, held = squad_split(path)
    train2, held2 = squad_split(path)
    assert [t.query for t in held] == [t.query for t in held2] and len(train) == len(train2)
    assert not {t.context_text for t in train} & {t.context_text for t in held}
    assert 0.1 < len(held) / (len(train) + len(held)) < 0.3
    assert all(t.response is None for t in held)
    assert is_held_out("x") == is_held_out("x")


# ================================================================================================= real model


@pytest.mark.real
def test_evaluate_on_smollm2_squad(smollm2: object) -> None:
    """One held-out SQuAD paragraph (the shortest with three sentences or more: every pass is cheap), SmolLM2's own
    answer as target: only facts that must hold are asserted."""
    _, held = squad_split(SQUAD_V2_DEV_SUBSET)
    task = min((t for t in held if len(partition(t.context, "sentence")) >= 3), key=lambda t: len(t.context_text))
    methods = build_methods(smollm2, ["avg_attention", "loo", "contextcite8", "gradxinput"])
    df = evaluate(methods, [task], ["lds", "topk_drop_mask", "kendall_loo"], n_eval_masks=8, ks=(1, 3),
                  max_new_tokens=12, timing_repeats=1)
    n = int(df.n_sources.iloc[0])
    assert n >= 2
    lds = df[df.metric == "lds"].value
    assert len(lds) == 4 and lds.between(-1, 1).all()
    cost = df.drop_duplicates("method").set_index("method")
    assert cost.loc["loo", "forward_passes"] == n + 1 and cost.loc["contextcite8", "forward_passes"] == 8
    assert cost.loc["avg_attention", "forward_passes"] == 1
    assert (cost.loc["gradxinput", ["forward_passes", "backward_passes"]] == 1).all()
    # Leave-one-out's own top-1 source is, by construction, the single ablation that hurts the target most, and
    # the held-out ablation of that source alone is what top-1 drop measures (logit-prob vs log-prob: same order).
    drops = df[(df.metric == "topk_drop_mask") & (df.k == 1)].set_index("method").value
    assert drops["loo"] >= drops.max() - 1e-4
    assert df[(df.method == "loo") & (df.metric == "kendall_loo")].value.iloc[0] == pytest.approx(1.0)
    assert df.attrs["ground_truth_forward_passes"] == 9


@pytest.mark.line_independent
def test_evaluate_stays_the_function_after_every_import_path() -> None:
    """A submodule named like the function once shadowed ``at2_lens.evaluate`` after its first use."""
    import importlib

    import at2_lens
    import at2_lens.evaluation

    first = at2_lens.evaluate
    importlib.import_module("at2_lens.evaluation.runner")
    from at2_lens.evaluation import evaluate as again

    assert callable(first) and first is at2_lens.evaluate is again is at2_lens.evaluation.evaluate
    assert first.__module__ == "at2_lens.evaluation.runner"
