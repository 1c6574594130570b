"""Decoder head study on SmolLM2: four head rankings found on training tasks, checked causally on held-out tasks.

    python benchmarks/bench_head_finders.py                 # the settings below (CPU: about an hour on a quiet core)
    python benchmarks/bench_head_finders.py --small         # smoke run: 2 + 2 held-out tasks, 8 random sets
    python benchmarks/bench_head_finders.py --table-only    # reprint the tables from the results files

Rankings (``at2_lens.heads``), all from TRAINING tasks only: retrieval (copy-paste) scores on training-split needle
tasks (``at2_lens.tasks.needle``); query-focused context attention (calibrated against the query "N/A") on SQuAD
training paragraphs (relevant source: the sentence holding the gold answer) and the needle training tasks (the
needle); AttAttr head importance for the answer's log-probability on a few short training tasks; the shipped AT2
estimator's weights. Causal check (``causal_check``) on HELD-OUT tasks: the 31 held-out SQuAD paragraphs (target:
SmolLM2's own greedy answer) and held-out needle tasks (haystack from held-out paragraphs; target: the gold code),
top-k heads of each ranking vs random k-head sets, zero / mean / resample ablation (reference and donors: training
tasks). Also the needle success rate (greedy answer holds the code) and a per-source attention knockout (top-10 heads of
each ranking stop attending to the gold source vs to another source of about its length) on the held-out needle tasks.

Resumable: ``--out`` (default ``benchmarks/results/head_finders.csv``) holds the causal-check rows, ``.json`` beside
it the settings, the rankings and the other measurements, ``.md`` the tables; each is written atomically after every
task, and a rerun with the same settings continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

from at2_lens.at2.pretrained import default_estimator_for  # noqa: E402
from at2_lens.backends import get_backend  # noqa: E402
from at2_lens.data import SQUAD_V2_DEV_SUBSET  # noqa: E402
from at2_lens.evaluation.squad import squad_split_records  # noqa: E402
from at2_lens.files import atomic_write_text  # noqa: E402
from at2_lens.head_ablation import top_heads  # noqa: E402
from at2_lens.heads import (  # noqa: E402
    CausalCheck,
    ablation_reference,
    at2_head_importance,
    attattr_head_importance,
    causal_check,
    compare_rankings,
    knockout_check,
    query_focus_scores,
    retrieval_scores,
)
from at2_lens.models import load_model  # noqa: E402
from at2_lens.tasks import ContextTask, TokenizedTask, prepare_task  # noqa: E402
from at2_lens.tasks.needle import needle_success_rate, needle_tasks  # noqa: E402
from at2_lens.tasks.spans import source_holding  # noqa: E402

RANKINGS = ("retrieval", "query_focus", "attattr", "at2")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/head_finders.csv")
    p.add_argument("--small", action="store_true", help="smoke run (few tasks and draws)")
    p.add_argument("--table-only", action="store_true", help="reprint the tables from --out, run nothing")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--ks-extra", default="", help="comma-separated extra k (zero ablation only), e.g. 5,20")
    p.add_argument("--n-random", type=int, default=123, help="random k-head sets in all (spread over the tasks)")
    p.add_argument("--n-squad", type=int, default=31, help="held-out SQuAD paragraphs checked (31 = all)")
    p.add_argument("--n-needle", type=int, default=10, help="held-out needle tasks checked")
    p.add_argument("--n-sentences", type=int, default=6, help="haystack sentences per needle task")
    p.add_argument("--n-train-needle", type=int, default=16, help="training needle tasks (retrieval, query focus)")
    p.add_argument("--n-train-squad", type=int, default=16, help="training SQuAD paragraphs (query focus)")
    p.add_argument("--n-attattr", type=int, default=2, help="training needle tasks for AttAttr (short ones)")
    p.add_argument("--attattr-steps", type=int, default=4, help="AttAttr Gauss-Legendre steps")
    p.add_argument("--n-reference", type=int, default=8, help="training tasks behind mean and resample ablation")
    p.add_argument("--n-success", type=int, default=10, help="needle tasks per split for the success rate")
    p.add_argument("--max-new-tokens", type=int, default=24, help="SmolLM2's answer budget on SQuAD")
    p.add_argument("--attattr-from", default=None,
                   help="take the AttAttr ranking from another run's .json (its settings are recorded) instead of "
                        "computing it")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="auto")
    args = p.parse_args(argv)
    if args.small:
        args.n_squad, args.n_needle, args.n_random, args.n_train_needle, args.n_train_squad = 2, 2, 8, 4, 2
        args.n_attattr, args.attattr_steps, args.n_reference, args.n_success, args.ks_extra = 1, 2, 2, 2, ""
        if args.out == "benchmarks/results/head_finders.csv":
            args.out = "benchmarks/results/head_finders_small.csv"
    return args


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    skip = {"out", "table_only", "device", "small"}
    return {k: v for k, v in sorted(vars(args).items()) if k not in skip}


def gold_source(task: TokenizedTask, answers: list[str]) -> int | None:
    """The source holding the first gold answer found in the context."""
    return source_holding(task.context, task.source_spans, answers)


def write_state(out: Path, rows: pd.DataFrame, state: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, rows.to_csv(index=False))
    atomic_write_text(out.with_suffix(".json"), json.dumps(state, indent=1))
    atomic_write_text(out.with_suffix(".md"), tables(rows, state))


def tables(rows: pd.DataFrame, state: dict[str, Any]) -> str:
    s = state["settings"]
    parts = [f"# Decoder head study (SmolLM2-135M-Instruct, {state.get('model', '')})", ""]
    if "success" in state:
        parts.append("Needle success rate (greedy answer holds the code): " + ", ".join(
            f"{k} {v['rate']:.2f} ({v['n']} tasks)" for k, v in state["success"].items()))
        parts.append("")
    if "retrieval_counted" in state:
        parts.append(f"Retrieval scores from {state['retrieval_counted']} copied code tokens.")
        parts.append("")
    if state.get("rankings"):
        ranks = {n: torch.tensor(v) for n, v in state["rankings"].items()}
        parts.append("## Top-10 heads (layer.head) of each ranking (training tasks)\n")
        for n, r in ranks.items():
            parts.append(f"- {n}: " + ", ".join(f"{a}.{b}" for a, b in top_heads(r, 10)))
        if len(ranks) > 1:
            cmp = compare_rankings(ranks, k=s["k"])
            parts.append("\n## Agreement between rankings (Spearman over all heads, top-k overlap)\n")
            parts.append(f"| a | b | Spearman | top-{s['k']} overlap |\n|---|---|---:|---:|")
            parts += [f"| {r.a} | {r.b} | {r.spearman:+.2f} | {r.overlap} |" for r in cmp.itertuples()]
        parts.append("")
    if len(rows):
        for k in sorted(rows["k"].unique()):
            for suite in ["needle", "squad", "all"]:
                part = rows[rows["k"] == k] if suite == "all" else rows[(rows["k"] == k) & (rows["suite"] == suite)]
                if part.empty:
                    continue
                n_tasks = part["task"].nunique()
                per = part[part["set"] == "random"].groupby("task").size().max() // max(1, part["mode"].nunique())
                check = CausalCheck(part.drop(columns=["suite"]), {}, int(k), int(per), s["seed"])
                parts.append(f"## Causal check, k = {k}, held-out {suite} tasks ({n_tasks} tasks, "
                             f"{int(per) * n_tasks} random sets per mode)\n")
                parts.append("Change of the target's log-probability (nats) when the ranking's top-k heads, or k "
                             "random heads, are ablated; ratio = ranking / random.\n")
                parts.append(check.to_markdown())
                parts.append("")
    if state.get("knockout"):
        parts.append("## Source knockout, held-out needle tasks (top-10 heads of each ranking)\n")
        parts.append("| ranking | tasks | Δ log p, needle knocked out | Δ log p, other sentence | "
                     "tasks needle < other |")
        parts.append("|---|---:|---:|---:|---:|")
        for n, v in state["knockout"].items():
            parts.append(f"| {n} | {v['tasks']} | {v['delta_gold']:+.3f} | {v['delta_other']:+.3f} | "
                         f"{v['share_gold_lower']:.2f} |")
        parts.append("")
    if state.get("attattr_source"):
        a = state["attattr_source"]
        parts.append(f"AttAttr ranking taken from {a['file']} ({a['n_attattr']} short training needle task(s), "
                     f"{a['attattr_steps']} Gauss-Legendre steps).")
    if state.get("timing"):
        parts.append("Timing (s): " + ", ".join(f"{k} {v:.0f}" for k, v in state["timing"].items()))
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    settings = settings_of(args)
    state: dict[str, Any] = {"settings": settings}
    rows = pd.DataFrame()
    if out.is_file() and out.with_suffix(".json").is_file():
        old = json.loads(out.with_suffix(".json").read_text())
        if old.get("settings") != settings and not args.table_only:
            raise SystemExit(f"{out} was written with other settings ({out.with_suffix('.json')}); use another --out")
        state = old
        rows = pd.read_csv(out)
        print(f"resuming: {len(rows)} rows read from {out}", file=sys.stderr)
    if args.table_only:
        sys.stdout.write(tables(rows, state))
        return 0
    torch.set_num_threads(1)
    model = load_model("smollm2", backend=args.backend, device=args.device)
    backend = get_backend(model)
    state["model"] = backend.describe()
    timing = state.setdefault("timing", {})
    train_rec, held_rec = squad_split_records(SQUAD_V2_DEV_SUBSET)

    def stage(name: str) -> float:
        print(f"[{time.strftime('%H:%M:%S')}] {name}", file=sys.stderr, flush=True)
        return time.perf_counter()

    # ---- tasks (deterministic)
    n_train_needle = max(args.n_train_needle, args.n_attattr, args.n_reference)
    needle_train = needle_tasks(n_train_needle, seed=args.seed, split="train", n_sentences=args.n_sentences)
    needle_held = needle_tasks(args.n_needle, seed=args.seed + 1, split="held_out", n_sentences=args.n_sentences)
    squad_train_rec = train_rec[: args.n_train_squad]
    squad_train = [ContextTask(context=r["context"], query=r["question"]) for r in squad_train_rec]

    # ---- needle success rate
    if "success" not in state:
        t = stage("needle success rate")
        state["success"] = {
            "train": {"rate": needle_success_rate(model, needle_train[: args.n_success]), "n": args.n_success},
            "held_out": {"rate": needle_success_rate(model, needle_held[: args.n_success]),
                         "n": min(args.n_success, len(needle_held))},
        }
        timing["success"] = time.perf_counter() - t
        write_state(out, rows, state)

    # ---- rankings on training tasks
    ranks: dict[str, list[list[float]]] = state.setdefault("rankings", {})
    if "retrieval" not in ranks:
        t = stage("retrieval scores")
        scores, counted = retrieval_scores(model, needle_train[: args.n_train_needle], return_counts=True)
        ranks["retrieval"], state["retrieval_counted"] = scores.tolist(), counted
        timing["retrieval"] = time.perf_counter() - t
        write_state(out, rows, state)
    if "query_focus" not in ranks:
        t = stage("query focus scores")
        prompts = [ContextTask(context=r["context"], query=r["question"]).tokenize(backend.tokenizer)
                   for r in squad_train_rec]
        relevant: list[Any] = [[g] if (g := gold_source(p, r["answers"])) is not None else None
                               for p, r in zip(prompts, squad_train_rec, strict=True)]
        tasks: list[Any] = squad_train + list(needle_train[: args.n_train_needle])
        relevant += [None] * args.n_train_needle
        ranks["query_focus"] = query_focus_scores(model, tasks, relevant=relevant).tolist()
        timing["query_focus"] = time.perf_counter() - t
        write_state(out, rows, state)
    if "attattr" not in ranks and args.attattr_from:
        t = stage(f"waiting for the AttAttr ranking in {args.attattr_from}")
        while "attattr" not in (other := json.loads(Path(args.attattr_from).read_text())).get("rankings", {}):
            if time.perf_counter() - t > 3600:
                raise SystemExit(f"{args.attattr_from} holds no AttAttr ranking after an hour")
            time.sleep(20)
        ranks["attattr"] = other["rankings"]["attattr"]
        state["attattr_source"] = {"file": str(args.attattr_from), "n_attattr": other["settings"]["n_attattr"],
                                   "attattr_steps": other["settings"]["attattr_steps"],
                                   "seconds": other.get("timing", {}).get("attattr")}
        write_state(out, rows, state)
    if "attattr" not in ranks:
        t = stage("AttAttr head importance")
        short = needle_tasks(args.n_attattr, seed=args.seed + 7, split="train", n_sentences=3)
        ranks["attattr"] = attattr_head_importance(model, short, n_steps=args.attattr_steps, progress=True).tolist()
        timing["attattr"] = time.perf_counter() - t
        write_state(out, rows, state)
    if "at2" not in ranks:
        est = default_estimator_for(model)
        if est is None:
            raise SystemExit("no shipped AT2 estimator for this model")
        ranks["at2"] = at2_head_importance(est).tolist()
        write_state(out, rows, state)
    rankings = {n: torch.tensor(ranks[n]) for n in RANKINGS}

    # ---- causal check on held-out tasks, one task per call (resumable)
    t = stage("reference activations")
    reference = ablation_reference(model, [*needle_train[: args.n_reference // 2],
                                           *squad_train[: args.n_reference - args.n_reference // 2]])
    timing["reference"] = time.perf_counter() - t
    squad_held = [ContextTask(context=r["context"], query=r["question"]) for r in held_rec[: args.n_squad]]
    # interleave the suites so that a cut-off run holds both
    order: list[tuple[str, int]] = []
    ns, nn = len(squad_held), len(needle_held)
    for i in range(ns + nn):
        want_needle = nn and (len([o for o in order if o[0] == "needle"]) < math.ceil((i + 1) * nn / (ns + nn)))
        suite = "needle" if want_needle else "squad"
        order.append((suite, len([o for o in order if o[0] == suite])))
    per_task = math.ceil(args.n_random / len(order))
    ks = [args.k] + [int(x) for x in args.ks_extra.split(",") if x.strip()]
    for k in ks:
        hows = ("zero", "mean", "resample") if k == args.k else ("zero",)
        t = stage(f"causal check k={k}")
        for gi, (suite, i) in enumerate(order):
            if len(rows) and ((rows["k"] == k) & (rows["suite"] == suite) & (rows["task"] == gi)).any():
                continue
            task: Any = needle_held[i] if suite == "needle" else squad_held[i]
            if suite == "squad":
                task = prepare_task(backend, task, max_new_tokens=args.max_new_tokens)
            res = causal_check(model, rankings, [task], k=k, how=hows, n_random=per_task, reference=reference,
                               seed=args.seed, task_ids=[gi], batch_size=args.batch_size)
            new = res.rows.assign(suite=suite)
            rows = pd.concat([rows, new], ignore_index=True)
            timing[f"causal_k{k}"] = timing.get(f"causal_k{k}", 0.0) + (time.perf_counter() - t)
            t = time.perf_counter()
            write_state(out, rows, state)
            print(f"  k={k} task {gi + 1}/{len(order)} ({suite}) done", file=sys.stderr, flush=True)

    # ---- per-source knockout on held-out needle tasks
    ko = state.setdefault("knockout", {})
    for name in RANKINGS:
        if name in ko or not needle_held:
            continue
        t = stage(f"knockout {name}")
        res = knockout_check(model, top_heads(rankings[name], 10), needle_held)
        ko[name] = {k: float(v) if k != "heads" and k != "tasks" else int(v)
                    for k, v in res.summary().iloc[0].items()}
        timing[f"knockout_{name}"] = time.perf_counter() - t
        write_state(out, rows, state)
    print(tables(rows, state))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
