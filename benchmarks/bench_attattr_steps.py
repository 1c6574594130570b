"""AttAttr ``n_steps="auto"``: error against gradient evaluations per quadrature rule, and its cost as a ratio to
Captum's ``LayerIntegratedGradients`` at the same completeness error, on SmolLM2 and real SQuAD tasks.

    python benchmarks/bench_attattr_steps.py                                  # tasks 51,75 of the train split
    python benchmarks/bench_attattr_steps.py --tasks 51,75,102 --layers 0,1,15,29 --parts rules

F is the summed log-probability of the model's own greedy answer (up to 8 tokens) to a SQuAD training-split
question (``at2_lens.evaluation.squad.squad_split``; the shortest prompts by default, to keep the CPU cost down).

Part 1 (rules): per task and layer, ``g(α) = ⟨A, ∂F/∂A(α·A)⟩`` at the 129 Clenshaw-Curtis nodes (one
``n_steps="auto"`` run with an unreachable tolerance and ``max_steps=129``, its node gradients recorded). The
Clenshaw-Curtis errors at 5, 9, ..., 129 nodes are exact (those nodes were evaluated); Gauss-Legendre and Romberg
errors are computed on the degree-128 polynomial through the samples (a surrogate: its own error is about
Clenshaw-Curtis-129's, so smaller numbers in those columns are not resolved). The completeness target
``F(A) − F(A_l = 0)`` comes from real forward passes.

Part 2 (cost): per task and layer, the wall time of ``n_steps="auto"`` (default rule and tolerance) against
``LayerIntegratedGradients`` on ``blocks.{l}.attn.hook_pattern`` (benchmarks/bench_attattr.py's ``LigBaseline``) with
the fewest Gauss-Legendre steps on a grid that meet the same tolerance: the surrogate proposes the count, the LIG run
measures its own completeness error, and the count grows until that measurement meets the tolerance. Times are
measured alternately in the same process; only ratios are printed. Results are cached in a JSON next to ``--out``
(written after every task and layer, so a killed run resumes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.interpolate import BarycentricInterpolator

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

from bench_attattr import LigBaseline  # noqa: E402

from at2_lens.attattr import AttentionAttribution, quadrature  # noqa: E402
from at2_lens.attattr.attribution import DEFAULT_ATOL  # noqa: E402
from at2_lens.attattr.targets import labels_objective  # noqa: E402
from at2_lens.files import atomic_write_text  # noqa: E402

from _timing import interleaved_ratio  # noqa: E402

CHUNK = 8
"""Integration points per forward pass on both sides (``internal_batch_size``), to bound memory on a shared CPU."""
GRID = (8, 12, 16, 20, 24, 32, 40, 48, 64, 80, 96, 128, 160, 192, 256, 320)
"""Gauss-Legendre step counts tried for LIG."""
N_SAMPLES = 128  # Clenshaw-Curtis intervals of part 1 (129 nodes)


def load_tasks(model: Any, indices: list[int]) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """``(index, input_ids, labels)``: labels are ``-100`` except on the greedy answer's target tokens."""
    from at2_lens.backends import get_backend
    from at2_lens.data import SQUAD_V2_DEV_SUBSET
    from at2_lens.evaluation.squad import squad_split
    from at2_lens.tasks.prepare import prepare_task

    train, _ = squad_split(SQUAD_V2_DEV_SUBSET)
    out = []
    for i in indices:
        tt = prepare_task(get_backend(model), train[i], max_new_tokens=8)
        labels = torch.full_like(tt.input_ids, -100)
        s, e = tt.target_token_range
        labels[s:e] = tt.input_ids[s:e]
        out.append((i, tt.input_ids, labels))
    return out


def sample_layer(attr: AttentionAttribution, ids: torch.Tensor, labels: torch.Tensor, layer: int) -> dict[str, Any]:
    """Part 1: g at the 129 Clenshaw-Curtis nodes, F(A) and F(A_l = 0)."""
    seen: dict[float, float] = {}
    inner = attr._node_gradients

    def recording(forward: Any, pattern: torch.Tensor, args: Any, alphas: list[float]) -> Any:
        f, grads = inner(forward, pattern, args, alphas)
        for a, g in zip(alphas, (grads * pattern[None]).sum(dim=(1, 2, 3, 4)).tolist(), strict=True):
            seen[a] = g
        return f, grads

    attr._node_gradients = recording  # type: ignore[method-assign]
    try:
        t = time.perf_counter()
        res = attr.attribute(ids, labels, layers=[layer], n_steps="auto", method="clenshaw_curtis", rtol=1e-12,
                             atol=0.0, max_steps=N_SAMPLES + 1, internal_batch_size=CHUNK)
        seconds = time.perf_counter() - t
    finally:
        del attr._node_gradients
    alphas = sorted(seen)
    return {"alphas": alphas, "g": [seen[a] for a in alphas], "f1": float(res.output),
            "f0": float(res.baseline_output[0]), "seconds_per_eval": seconds / len(alphas)}


def rule_errors(sample: dict[str, Any]) -> dict[str, dict[int, float]]:
    """Relative completeness error of each rule family at each size (gradient evaluations paid, cumulative for
    families that are not nested)."""
    alphas, g = np.array(sample["alphas"]), np.array(sample["g"])
    change = sample["f1"] - sample["f0"]
    exact = dict(zip(alphas.tolist(), g.tolist(), strict=True))
    surrogate = BarycentricInterpolator(alphas, g)
    out: dict[str, dict[int, float]] = {}
    for name in quadrature.RULES:
        paid: set[object] = set()
        errors: dict[int, float] = {}
        for rule in quadrature.family(name, 1000):
            if name == "clenshaw_curtis" and rule.size > len(alphas):
                break
            paid.update(rule.keys)
            values = [exact[a] if a in exact else float(surrogate(a)) for a in rule.alphas]
            total = math.fsum(w * v for w, v in zip(rule.weights, values, strict=True))
            errors[len(paid)] = abs(total - change) / abs(change)
        out[name] = errors
    # Gauss-Legendre at one fixed size (the integer n_steps path: no rule tried before it)
    out["gausslegendre_fixed"] = {}
    for n in GRID:
        rule = quadrature.gauss_legendre(n)
        total = math.fsum(w * float(surrogate(a)) for a, w in zip(rule.alphas, rule.weights, strict=True))
        out["gausslegendre_fixed"][n] = abs(total - change) / abs(change)
    return out


class LigLabels(LigBaseline):
    """``LigBaseline`` with AttAttr's F for labels: the summed log-probability of the labelled tokens."""

    def __init__(self, model: Any, layer: int, tokens: torch.Tensor, labels: torch.Tensor) -> None:
        super().__init__(model, layer, tokens, 0)
        self.labels = labels

    def forward(self, tokens: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        self.alpha = alpha
        logits = self.model(tokens)
        return labels_objective(logits, self.labels[None].expand(tokens.shape[0], -1).to(logits.device), "log_prob")

    def attribute(self, n_steps: int, delta: bool = False) -> Any:
        self.hook_point.add_hook(lambda p, hook: p * self.alpha.to(p.dtype)[:, None, None, None])
        try:
            return self.lig.attribute(
                (self.tokens, torch.ones(1)), baselines=(self.tokens, torch.zeros(1)), n_steps=n_steps,
                return_convergence_delta=delta, internal_batch_size=CHUNK,
            )
        finally:
            self.hook_point.remove_hooks("fwd")


def cost_layer(model: Any, attr: AttentionAttribution, ids: torch.Tensor, labels: torch.Tensor, layer: int,
               fixed: dict[int, float], rtol: float, repeats: int, lig_budget: int) -> dict[str, Any]:
    """Part 2: auto against LIG with enough steps for the same tolerance, timed alternately."""

    def auto() -> Any:
        return attr.attribute(ids, labels, layers=[layer], n_steps="auto", rtol=rtol, internal_batch_size=CHUNK)

    t = time.perf_counter()
    res = auto()
    auto_seconds = time.perf_counter() - t
    change = abs(float(res.output - res.baseline_output[0]))
    tolerance = rtol * change + DEFAULT_ATOL
    lig = LigLabels(model, layer, ids[None], labels)
    candidates = [n for n in GRID if fixed.get(n, 1.0) * change <= tolerance] or [GRID[-1]]
    start = GRID.index(candidates[0])
    n_lig, lig_error, lig_seconds = None, None, None
    tried = 0
    for n in GRID[start:]:
        if tried + n > lig_budget:
            break
        tried += n
        t = time.perf_counter()
        _, delta = lig.attribute(n, delta=True)
        lig_seconds = time.perf_counter() - t
        lig_error = abs(float(delta[0]))
        if lig_error <= tolerance:
            n_lig = n
            break
    if n_lig is None or lig_seconds is None or lig_error is None:
        return {"skipped": f"LIG did not reach the tolerance within {tried} evaluations tried from {GRID[start]} "
                           f"steps (last error {lig_error / change if lig_error else float('nan'):.1e})",
                "auto_steps": int(res.steps[0]), "auto_error": float(res.relative_convergence_delta()[0])}
    a_times, l_times = [auto_seconds], [lig_seconds]
    for _ in range(repeats - 1):
        t = time.perf_counter()
        auto()
        a_times.append(time.perf_counter() - t)
        t = time.perf_counter()
        lig.attribute(n_lig, delta=True)
        l_times.append(time.perf_counter() - t)
    return {
        "tokens": len(ids), "auto_steps": int(res.steps[0]), "auto_converged": bool(res.converged[0]),
        "auto_error": float(res.relative_convergence_delta()[0]), "lig_steps": n_lig,
        "lig_error": lig_error / change, "time_ratio": float(np.median(a_times) / np.median(l_times)),
        "lig_steps_from_grid_start": GRID[start],
    }


def retime(model: Any, attr: AttentionAttribution, ids: torch.Tensor, labels: torch.Tensor, layer: int, n_lig: int,
           rtol: float, repeats: int) -> dict[str, Any]:
    """Time auto against LIG at the step count part 2 found, ``repeats`` times alternately (after one warm-up each)."""
    lig = LigLabels(model, layer, ids[None], labels)

    def auto() -> Any:
        return attr.attribute(ids, labels, layers=[layer], n_steps="auto", rtol=rtol, internal_batch_size=CHUNK)

    _, _, ratio = interleaved_ratio(auto, lambda: lig.attribute(n_lig, delta=True), repeats=repeats, warmup=1)
    return {"time_ratio": ratio, "timed_repeats": repeats}


def write_report(path: Path, cache: dict[str, Any], args: argparse.Namespace) -> None:
    lines = ["# AttAttr `n_steps=\"auto\"`: steps, error and cost against Captum LIG (SmolLM2)", "",
             f"Command: `python benchmarks/bench_attattr_steps.py --tasks {args.tasks} --layers {args.layers} "
             f"--rtol {args.rtol:g}` (TL {args.tl}, backend {args.backend}, 1 thread). Generated by the script; "
             "see its docstring for the method.", ""]
    lines += ["## Relative completeness error against gradient evaluations", "",
              "Per task (SQuAD train-split index, tokens) and layer. Clenshaw-Curtis (nested; evaluations = nodes, "
              "exact), Romberg (nested; surrogate), Gauss-Legendre doubling 4, 8, 16, ... (not nested: evaluations "
              "= all rules tried; surrogate) and Gauss-Legendre at one fixed size (the integer `n_steps` path, "
              "surrogate).", ""]
    lines += [f"Gradient evaluations each scheme needs to reach rtol = {args.rtol:g} (atol = {DEFAULT_ATOL:g}); "
              "'-' where it did not within the samples (Clenshaw-Curtis beyond 129 nodes is not sampled, and the "
              "surrogate columns cannot resolve errors below Clenshaw-Curtis-129's own):", "",
              "| task | layer | Clenshaw-Curtis (nested, auto default) | Romberg (nested) | Gauss-Legendre doubling | "
              "Gauss-Legendre fixed, oracle | Gauss-Legendre fixed, steady |", "|---|---|---|---|---|---|---|"]
    for key in sorted((k for k in cache if k.startswith("rules/")), key=lambda k: [int(x) for x in k.split("/")[1:]]):
        entry = cache[key]
        _, task, layer = key.split("/")
        limit = args.rtol + DEFAULT_ATOL / abs(entry["change"])
        cells = []
        for name in (*quadrature.RULES, "gausslegendre_fixed"):
            series = sorted((int(n), e) for n, e in entry["errors"][name].items())
            met = [n for n, e in series if e <= limit]
            cells.append(str(met[0]) if met else "-")
        fixed = sorted((int(n), e) for n, e in entry["errors"]["gausslegendre_fixed"].items())
        steady = [n for n, _ in fixed if all(e <= limit for m, e in fixed if m >= n)]
        cells.append(str(steady[0]) if steady else "-")
        lines.append(f"| {task} | {layer} | " + " | ".join(cells) + " |")
    lines.append("")
    for key in sorted((k for k in cache if k.startswith("rules/")), key=lambda k: [int(x) for x in k.split("/")[1:]]):
        entry = cache[key]
        _, task, layer = key.split("/")
        errs = entry["errors"]
        lines.append(f"**task {task} ({entry['tokens']} tokens), layer {layer}**: F(A) − F(A_l=0) = "
                     f"{entry['change']:.4g}; {len(entry['sample']['alphas'])} Clenshaw-Curtis samples"
                     + (f"; {entry['note']}" if entry.get("note") else ""))
        lines.append("")
        lines.append("| rule | " + " | ".join(["evaluations: error"] * 1) + " |")
        lines.append("|---|---|")
        for name, series in errs.items():
            cells = ", ".join(f"{n}: {e:.1e}" for n, e in sorted(series.items(), key=lambda kv: int(kv[0])))
            lines.append(f"| {name} | {cells} |")
        lines.append("")
    lines += ["## Cost of `n_steps=\"auto\"` as a ratio to LIG at the same tolerance", "",
              f"rtol = {args.rtol:g}, atol = {DEFAULT_ATOL:g}; F as in part 1; time ratio = "
              "median wall time of AttAttr auto / LIG (alternating, same process).", "",
              "LIG steps needed: the fewest grid steps whose measured error meets the tolerance (an oracle: "
              "Gauss-Legendre's error is not monotone in the step count, so a user fixing a count in advance cannot "
              "know it); steady: the fewest grid steps from which every larger grid count meets it too (part 1's "
              "surrogate).", "",
              "| task | tokens | layer | auto evaluations | auto error | LIG steps needed | LIG error | "
              "evaluations ratio | time ratio | LIG steps, steady |", "|---|---|---|---|---|---|---|---|---|---|"]
    ratios = []
    for key in sorted(k for k in cache if k.startswith("cost/")):
        _, task, layer = key.split("/")
        c = cache[key]
        if "skipped" in c:
            lines.append(f"| {task} | | {layer} | | | {c['skipped']} | | | |")
            continue
        ratios.append(c["time_ratio"])
        steady = "?"
        rules = cache.get(f"rules/{task}/{layer}")
        if rules is not None:
            fixed = {int(n): e for n, e in rules["errors"]["gausslegendre_fixed"].items()}
            limit = args.rtol + DEFAULT_ATOL / abs(rules["change"])
            ok = [n for n in sorted(fixed) if all(fixed[m] <= limit for m in fixed if m >= n)]
            steady = str(ok[0]) if ok else f"> {max(fixed)}"
        lines.append(f"| {task} | {c['tokens']} | {layer} | {c['auto_steps']} | {c['auto_error']:.1e} | "
                     f"{c['lig_steps']} | {c['lig_error']:.1e} | {c['auto_steps'] / c['lig_steps']:.2f} | "
                     f"{c['time_ratio']:.2f} | {steady} |")
    if ratios:
        lines += ["", f"Time ratio: median {float(np.median(ratios)):.2f}, worst {max(ratios):.2f}."]
    atomic_write_text(path, "\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="51,75", help="SQuAD train-split task indices (default: two short ones)")
    ap.add_argument("--layers", default="0,1,15,29")
    ap.add_argument("--rtol", type=float, default=1e-3)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--parts", default="rules,cost",
                    help="which parts to run: rules, cost, retime (time cached cost entries again, --repeats times); "
                         "default rules,cost; 'report' only rewrites the report from the cache")
    ap.add_argument("--lig-budget", type=int, default=600,
                    help="gradient evaluations LIG may spend searching for its step count per layer (default 600)")
    ap.add_argument("--out", default="benchmarks/results/attattr_steps.md")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from importlib.metadata import version

    args.tl = version("transformer_lens")
    out = Path(args.out)
    cache_path = out.with_suffix(".json")
    cache: dict[str, Any] = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    if args.parts == "report":  # rewrite the report from the cached results only
        write_report(out, cache, args)
        return
    from at2_lens.models import load_model

    model = load_model("smollm2", backend=args.backend)
    layers = [int(x) for x in args.layers.split(",")]
    parts = set(args.parts.split(","))
    attr = AttentionAttribution(model)
    for task, ids, labels in load_tasks(model, [int(x) for x in args.tasks.split(",")]):
        for layer in layers:
            key = f"rules/{task}/{layer}"
            if "rules" in parts and key not in cache:
                sample = sample_layer(attr, ids, labels, layer)
                errors = rule_errors(sample)
                cache[key] = {"tokens": len(ids), "change": sample["f1"] - sample["f0"], "errors": errors,
                              "sample": sample}
                atomic_write_text(cache_path, json.dumps(cache))
                print(key, {k: {n: f"{e:.1e}" for n, e in v.items()} for k, v in errors.items()}, flush=True)
            ckey = f"cost/{task}/{layer}"
            if "retime" in parts and "lig_steps" in cache.get(ckey, {}):
                cache[ckey].update(retime(model, attr, ids, labels, layer, cache[ckey]["lig_steps"], args.rtol,
                                          args.repeats))
                atomic_write_text(cache_path, json.dumps(cache))
                print(ckey, cache[ckey], flush=True)
            if "cost" in parts and ckey not in cache:
                # part 1's fixed-size Gauss-Legendre errors propose LIG's step count (else the grid starts at 8)
                fixed = {int(n): e for n, e in cache.get(key, {}).get("errors", {}).get("gausslegendre_fixed",
                                                                                          {}).items()}
                cache[ckey] = cost_layer(model, attr, ids, labels, layer, fixed, args.rtol, args.repeats,
                                         args.lig_budget)
                atomic_write_text(cache_path, json.dumps(cache))
                print(ckey, cache[ckey], flush=True)
    write_report(out, cache, args)
    print(out.read_text())


if __name__ == "__main__":
    main()
