"""``evaluate``: every method on every task under every metric, in one tidy table, with the cost of each method.

Per task, the work that does not depend on the method is done once and shared: the response (generated greedily
when the task has none), the held-out ground-truth ablations for LDS, the unablated output, the reference scores
for Kendall τ (leave-one-out and gradient × input) and the attention checks; top-k ablations are remembered
per task, so methods that rank alike do not pay for the same ablation twice. Costs are counted in passes
(sequences through the model) and as the wall time of ``attribute`` divided by the median time of one plain
forward pass over the same tokens, measured in the same run.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pandas as pd
import torch

from at2_lens._validate import check_int
from at2_lens.ablation import (
    AblationFn,
    AblationMode,
    OutputType,
    ablation_fn,
    check_mode,
    check_output_type,
    ground_truth,
)
from at2_lens.backends import get_backend
from at2_lens.baselines import GradientXInput, LeaveOneOut
from at2_lens.errors import InputError
from at2_lens.evaluation._names import ALIASES, DEFAULT_METRICS, METRICS
from at2_lens.evaluation.metrics import (
    adversarial_attention,
    attention_permutation_check,
    kendall_tau,
    lds_score,
    topk_drop_from,
    topk_kendall_tau,
)
from at2_lens.results import SourceAttribution
from at2_lens.tasks import DEFAULT_MAX_NEW_TOKENS, ContextTask, TokenizedTask, check_tasks, prepare_task

PERMUTATION_METHOD = "attention_permutation"
ADVERSARIAL_METHOD = "attention_adversarial"
COLUMNS = ["method", "task", "metric", "k", "value", "n_sources", "forward_passes", "backward_passes", "time_ratio"]


def resolve_metrics(metrics: Sequence[str]) -> list[str]:
    """Expand aliases (``topk_drop``, ``kendall``, ``attention_checks``, ``all``) and validate the names."""
    if isinstance(metrics, str):
        metrics = [metrics]
    out: list[str] = []
    for m in metrics:
        for name in ALIASES.get(m, (m,)):
            if name not in METRICS:
                raise InputError(f"metrics: unknown metric {name!r}; choose from {METRICS + tuple(ALIASES)}")
            if name not in out:
                out.append(name)
    if not out:
        raise InputError("metrics: expected at least one metric")
    return out


class _MemoAblation:
    """An ablation function that runs each distinct keep-mask once and remembers its output."""

    def __init__(self, run: AblationFn) -> None:
        self.run = run
        self.memo: dict[bytes, float] = {}

    def __call__(self, masks: torch.Tensor) -> torch.Tensor:
        keys = [m.numpy().tobytes() for m in masks.detach().bool().cpu()]  # masks may live on the model's device
        todo = [i for i, k in enumerate(keys) if k not in self.memo]
        if todo:
            for i, v in zip(todo, self.run(masks[todo]).tolist(), strict=True):
                self.memo[keys[i]] = float(v)
        return torch.tensor([self.memo[k] for k in keys], dtype=torch.float64)


def _passes(result: SourceAttribution) -> tuple[int, int]:
    """(forward, backward) passes of one ``attribute`` call, as every method records them in ``extra`` (-1 when a
    method records none)."""
    fwd = result.extra.get("forward_passes")
    return (int(fwd) if fwd is not None else -1), int(result.extra.get("backward_passes", 0))


def _since(t: float) -> float:
    return time.perf_counter() - t


def _forward_times(model: Any, ids: torch.Tensor, repeats: int, warmup: bool = True) -> list[float]:
    """Wall times of ``repeats`` plain forward passes over ``ids`` (after one untimed warm-up call)."""
    backend = get_backend(model)
    times = []
    with torch.no_grad():
        if warmup:
            backend.run(ids[None])
        for _ in range(max(1, repeats)):
            t = time.perf_counter()
            backend.run(ids[None])
            times.append(time.perf_counter() - t)
    return times


def _model_of(methods: Mapping[str, Any], model: Any) -> Any:
    models = {id(getattr(m, "forward_func", None)): getattr(m, "forward_func", None) for m in methods.values()}
    if model is None:
        if len(models) != 1 or None in models.values():
            raise InputError("model: the methods do not share one model (forward_func); pass model= explicitly")
        return next(iter(models.values()))
    return model


def evaluate(
    methods: Mapping[str, Any],
    tasks: Sequence[ContextTask | TokenizedTask],
    metrics: Sequence[str] = DEFAULT_METRICS,
    *,
    model: Any = None,
    n_eval_masks: int = 32,
    ks: Sequence[int] = (1, 3, 5),
    kendall_k: int = 3,
    mode: AblationMode = "mask",
    output: OutputType = "logit_prob",
    seed: int = 0,
    batch_size: int = 8,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    timing_repeats: int = 3,
    n_permutations: int = 16,
    permutation: Mapping[str, Any] | None = None,
    adversarial: Mapping[str, Any] | None = None,
    references: Mapping[str, Any] | None = None,
    task_ids: Sequence[int] | None = None,
    progress: bool | Callable[[str], None] = False,
) -> pd.DataFrame:
    """Evaluate attribution methods on tasks; returns a tidy DataFrame, one row per method × task × metric (× k).

    Args:
        methods: ``{name: attribution object}``; each has ``attribute(task) -> SourceAttribution``
            (``AT2Attribution`` or a class of ``at2_lens.baselines``), all on the same model.
        tasks: ``ContextTask`` (responses generated greedily when absent, once, shared by all methods) or
            ``TokenizedTask`` with a response.
        metrics: names from ``METRICS`` or aliases ``topk_drop``, ``kendall``, ``attention_checks``, ``all``.
        model: the model; default the methods' shared ``forward_func``.
        n_eval_masks: held-out random ablations per task for LDS (computed once per task, shared by methods).
        ks: the k of top-k drop; kendall_k: the k of the top-k Kendall variant.
        mode: ablation of the LDS ground truth and of the leave-one-out reference (``mask`` or ``remove``).
        output: the LDS output, ``logit_prob`` (default) or ``log_prob``. Top-k drop always uses log-prob.
        seed: seed of the held-out masks (a stream no method draws from) and of the attention checks.
        batch_size: ablations per forward call in mask mode.
        max_new_tokens: generation budget for tasks without a response.
        timing_repeats: plain forward passes timed per task for the time ratio.
        n_permutations: permutations per task for ``attn_permutation``.
        permutation: keyword arguments for ``attention_permutation_check`` (e.g. ``{"layers": [29], "heads": [0]}``;
            default all layers and heads, the rows that produce the target).
        adversarial: keyword arguments for ``adversarial_attention`` (e.g. ``{"steps": 30, "layers": [29]}``).
        references: ``{"loo": ..., "gradxinput": ...}`` reference methods for Kendall τ; by default a method of
            the right class in ``methods`` is reused, else ``LeaveOneOut(model, mode=mode)`` / ``GradientXInput``.
        task_ids: the global index of each task (default ``0..len(tasks)-1``): the ``task`` column and the seed of
            the task's held-out masks and checks. Evaluating a split task by task (resuming, sharding) with the
            global indices gives the same rows as evaluating it whole.
        progress: True to log to stderr, or a callable taking a line.

    Columns: ``method, task, metric, k, value, n_sources, forward_passes, backward_passes, time_ratio``; the cost
    columns are those of the method's ``attribute`` call on that task (for the ``attention_permutation`` and
    ``attention_adversarial`` rows, of the check; those rows do not depend on the methods).
    ``df.attrs`` holds the ground-truth cost and the settings.
    """
    if not methods:
        raise InputError("methods: expected at least one method")
    if not tasks:
        raise InputError("tasks: expected at least one task")
    metric_list = resolve_metrics(metrics)
    ids = list(range(len(tasks))) if task_ids is None else [check_int("task_ids", i, minimum=0) for i in task_ids]
    if len(ids) != len(tasks) or len(set(ids)) != len(ids):
        raise InputError(f"task_ids: expected {len(tasks)} distinct non-negative integers, one per task, got {ids}")
    mode = check_mode(mode)
    output = check_output_type(output)
    check_int("n_eval_masks", n_eval_masks, minimum=2)
    if not ks:
        raise InputError("ks: expected at least one k")
    for k in ks:
        check_int("ks", k)
    check_int("kendall_k", kendall_k)
    if not isinstance(methods, Mapping):
        raise InputError(f"methods: expected a {{name: attribution object}} mapping, got {type(methods).__name__}")
    for name, method in methods.items():
        if not callable(getattr(method, "attribute", None)):
            raise InputError(f"methods[{name!r}]: expected an object with attribute(task), got {type(method).__name__}")
    model = _model_of(methods, model)
    backend = get_backend(model)
    check_tasks(backend, tasks)  # every task tokenizes and fits the context window, before any model work
    log: Callable[[str], None]
    if callable(progress):
        log = progress
    elif progress:
        def log(line: str) -> None:
            print(line, file=sys.stderr, flush=True)
    else:
        def log(line: str) -> None:
            return None

    refs = _references(methods, model, mode, references, metric_list)
    rows: list[dict[str, Any]] = []
    gt_passes = 0
    for ti, raw in zip(ids, tasks, strict=True):
        task = prepare_task(backend, raw, max_new_tokens)
        n_src = task.n_sources
        fwd_times = _forward_times(model, task.input_ids, timing_repeats)
        fwd_s = statistics.median(fwd_times)  # provisional, for the progress lines
        t_task = time.perf_counter()
        log(f"task {ti}: {n_src} sources, {task.seq_len} tokens, response {task.response!r}")
        gt = None
        if "lds" in metric_list or any(m.startswith("topk_drop") for m in metric_list):
            gt = ground_truth(model, task, n_eval_masks, mode=mode, seed=seed, index=ti, batch_size=batch_size)
            gt_passes += gt.forward_passes
        actual = gt.outputs(output) if gt is not None else None
        if gt is not None:
            log(f"  ground truth: {gt.forward_passes} forward passes, {_since(t_task) / fwd_s:.1f}x a forward pass")

        def row(method: str, metric: str, value: float, k: int | None, cost: tuple[int, int, float],
                ti: int = ti, n_src: int = n_src) -> None:
            rows.append({"method": method, "task": ti, "metric": metric, "k": k, "value": float(value),
                         "n_sources": n_src, "forward_passes": cost[0], "backward_passes": cost[1],
                         "time_ratio": cost[2]})

        ablations = {m: _MemoAblation(ablation_fn(model, task, mode=m, output="log_prob", batch_size=batch_size))
                     for m in ("mask", "remove")}  # methods that rank alike share their top-k ablations
        ref_scores: dict[str, torch.Tensor] = {}
        results: dict[str, tuple[SourceAttribution, tuple[int, int, float]]] = {}
        elapsed: dict[str, float] = {}
        for name, method in methods.items():
            t = time.perf_counter()
            result = method.attribute(task)
            elapsed[name] = time.perf_counter() - t
            fwd, bwd = _passes(result)
            results[name] = (result, (fwd, bwd, math.nan))
            log(f"  {name}: {fwd} forward + {bwd} backward passes, {elapsed[name] / fwd_s:.1f}x a forward pass")
        # The forward pass is timed before and after the methods, so load drifting during the run hits both.
        fwd_s = statistics.median(fwd_times + _forward_times(model, task.input_ids, timing_repeats, warmup=False))
        results = {n: (r, (c[0], c[1], elapsed[n] / fwd_s)) for n, (r, c) in results.items()}
        for ref_name, ref in refs.items():
            reused = next((n for n, m in methods.items() if m is ref), None)
            ref_scores[ref_name] = (results[reused][0] if reused else ref.attribute(task)).scores

        for name, (result, cost) in results.items():
            scores = result.scores
            if "lds" in metric_list:
                assert gt is not None and actual is not None
                row(name, "lds", lds_score(scores, gt.masks, actual), None, cost)
            for m_mode in ("mask", "remove"):
                metric = f"topk_drop_{m_mode}"
                if metric in metric_list:
                    assert gt is not None
                    drops = topk_drop_from(ablations[m_mode], scores, ks, full=gt.full_log_prob)
                    for k, v in drops.items():
                        row(name, metric, v, int(k), cost)
            for ref_name, ref_s in ref_scores.items():
                if f"kendall_{ref_name}" in metric_list:
                    row(name, f"kendall_{ref_name}", kendall_tau(scores, ref_s), None, cost)
                if f"kendall_topk_{ref_name}" in metric_list:
                    row(name, f"kendall_topk_{ref_name}", topk_kendall_tau(scores, ref_s, kendall_k), kendall_k,
                        cost)

        n_topk = sum(len(a.memo) for a in ablations.values())
        log(f"  metrics: {n_topk} top-k ablation passes; task so far {_since(t_task) / fwd_s:.1f}x a forward pass")
        if "attn_permutation" in metric_list:
            t = time.perf_counter()
            perm = attention_permutation_check(model, task, n_permutations, seed=seed + ti, batch_size=batch_size,
                                               **dict(permutation or {}))
            cost = (perm.forward_passes, 0, (time.perf_counter() - t) / fwd_s)
            row(PERMUTATION_METHOD, "attn_permutation", perm.median_abs_delta, None, cost)
            log(f"  attention permutations: {cost[0]} forward passes, {cost[2]:.1f}x a forward pass")
        if "attn_adversarial" in metric_list:
            t = time.perf_counter()
            adv = adversarial_attention(model, task, seed=seed + ti, **dict(adversarial or {}))
            cost = (adv.forward_passes, adv.backward_passes, (time.perf_counter() - t) / fwd_s)
            row(ADVERSARIAL_METHOD, "attn_adversarial_jsd", adv.max_jsd, None, cost)
            row(ADVERSARIAL_METHOD, "attn_adversarial_delta", abs(adv.delta), None, cost)
            log(f"  adversarial attention: {cost[0]} forward + {cost[1]} backward passes, {cost[2]:.1f}x a forward "
                "pass")

    df = pd.DataFrame(rows, columns=COLUMNS)
    df["k"] = df["k"].astype("Int64")
    df.attrs.update({
        "ground_truth_forward_passes": gt_passes, "n_eval_masks": n_eval_masks, "mode": mode, "output": output,
        "seed": seed, "ks": list(ks), "kendall_k": kendall_k, "n_tasks": len(tasks),
    })
    return df


def _references(
    methods: Mapping[str, Any], model: Any, mode: AblationMode, given: Mapping[str, Any] | None, metrics: list[str]
) -> dict[str, Any]:
    """Reference methods of the Kendall metrics that were asked for (reusing a matching method when possible)."""
    wanted = {r for r in ("loo", "gradxinput") if f"kendall_{r}" in metrics or f"kendall_topk_{r}" in metrics}
    refs: dict[str, Any] = {}
    given = dict(given or {})
    for r in [x for x in ("loo", "gradxinput") if x in wanted]:
        if r in given:
            refs[r] = given[r]
            continue
        if r == "loo":
            match = [m for m in methods.values() if isinstance(m, LeaveOneOut) and m.mode == mode and m.ablate is None]
            refs[r] = match[0] if match else LeaveOneOut(model, mode=mode)
        else:
            match = [m for m in methods.values() if isinstance(m, GradientXInput)]
            refs[r] = match[0] if match else GradientXInput(model)
    return refs


def metric_label(metric: str, k: Any) -> str:
    """``topk_drop_mask`` with k 3 -> ``topk_drop_mask@3``; metrics without k keep their name."""
    return metric if k is None or (isinstance(k, float) and math.isnan(k)) or pd.isna(k) else f"{metric}@{int(k)}"


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Method × metric table of means over tasks (NaN ignored), with each method's mean cost per task:
    forward passes, backward passes and wall time as a multiple of one forward pass.

    Top-k drop rows with ``k >= n_sources`` are left out of the means (also in results written before
    ``evaluate`` made them NaN): removing every source is the same ablation for every method, so such rows would
    pull all methods towards one value. A column with no task left shows as NaN ("–" in the markdown table)."""
    if df.empty:
        raise InputError("df: no rows to summarise")
    d = df.copy()
    topk = d["metric"].astype(str).str.startswith("topk_drop") & d["k"].notna() & d["n_sources"].notna()
    undefined = topk & (d["k"].astype("float") >= d["n_sources"].astype("float"))
    d["value"] = d["value"].astype("float").mask(undefined)
    d["metric"] = [metric_label(m, k) for m, k in zip(d["metric"], d["k"], strict=True)]
    order = list(dict.fromkeys(d["metric"]))
    methods = list(dict.fromkeys(d["method"]))
    table = d.pivot_table(index="method", columns="metric", values="value", aggfunc="mean", dropna=False)
    table = table.reindex(index=methods, columns=order)
    cost = d.drop_duplicates(["method", "task"]).groupby("method")[["forward_passes", "backward_passes",
                                                                      "time_ratio"]].mean()
    cost = cost.rename(columns={"forward_passes": "forward passes", "backward_passes": "backward passes",
                                "time_ratio": "time / forward"})
    return table.join(cost.reindex(methods))


COST_COLUMNS = ("forward passes", "backward passes", "time / forward")


def markdown_table(summary: pd.DataFrame, digits: int = 3) -> str:
    """A GitHub markdown table of a ``summarize`` result (no extra dependency); costs with one decimal."""
    cols = [str(c) for c in summary.columns]
    lines = ["| method | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, values in summary.iterrows():
        cells = []
        for col, v in zip(cols, values.tolist(), strict=True):
            if v is None or (isinstance(v, float) and math.isnan(v)):
                cells.append("–")
            elif isinstance(v, float):
                cells.append(f"{v:.1f}" if col in COST_COLUMNS else f"{v:.{digits}f}")
            else:
                cells.append(str(v))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
