"""Faithfulness benchmark: every attribution method on held-out SQuAD paragraphs, scored against the model's own
ablations (LDS, top-k drop, Kendall tau vs leave-one-out and gradient x input, attention checks), with costs.

    python benchmarks/bench_faithfulness.py --small                  # CI: 3 held-out tasks, few masks (minutes, CPU)
    python benchmarks/bench_faithfulness.py                          # full held-out split, by hand (hours on CPU)
    python benchmarks/bench_faithfulness.py --estimator smollm2.safetensors   # include a trained AT2 estimator
    python benchmarks/bench_faithfulness.py --out runs/faith.csv               # resumable: finished tasks are kept
    python benchmarks/bench_faithfulness.py --out runs/b.csv --tasks 20:31     # a second process on other tasks ...
    python benchmarks/bench_faithfulness.py --out runs/faith.csv --merge runs/b.csv   # ... folded in afterwards
    python benchmarks/bench_faithfulness.py --out runs/faith.csv --rescore at2        # after retraining the estimator

Tasks (--suite): ``squad`` (default), from at2_lens/data/squad_v2/dev_subset.json (or --data), one per paragraph:
the paragraph is the context (split into sentences = sources), its first answerable question the query, SmolLM2's
own greedy answer the target. ``multidoc``: tasks the project generates from the same questions, the paragraph among
two distractor snippets of other held-out articles (``multi_document_split``), evaluated with the methods and
metrics that do not need hundreds of passes (MULTIDOC below: no ContextCite-256, IG or attention checks):

    python benchmarks/bench_faithfulness.py --suite multidoc --out benchmarks/results/faithfulness_multidoc.csv

Split (``at2_lens.evaluation.squad``): a paragraph is held out when int(sha256(question id), 16) % 5 == 0, else it
is in the training split (for training an estimator, e.g. ``at2-lens collect`` on it; never evaluated here).

AT2 (method ``at2``) uses --estimator, else the estimator shipped for the model (SmolLM2:
``at2_lens/estimators/smollm2-135m-instruct.safetensors``); a model with neither is represented by AT2's uniform-weight
start, labelled ``at2_uniform`` (exactly average attention), never as AT2. Costs are printed as passes and as wall
time divided by one forward pass over the same tokens measured in the same run, not as absolute seconds.
The settings recorded with a results file include the sha256 of the AT2 estimator's weights, so rows of two
estimators are never mixed; ``--rescore at2,at2_refined8`` recomputes only those methods' rows of every finished task
(the ground truth, the reference scores and the other methods' rows are the same for the same seed), resumably; a
re-scoring may add a method to a results file (its rows go after the method before it in the run's order).
One torch thread by default (--threads), which made timings stable on a shared CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

from at2_lens.at2.estimator import weights_sha256  # noqa: E402
from at2_lens.data import SQUAD_V2_DEV_SUBSET  # noqa: E402
from at2_lens.evaluation import METHOD_INDEPENDENT_METRICS  # noqa: E402
from at2_lens.evaluation.methods import build_methods  # noqa: E402
from at2_lens.evaluation.runner import evaluate, markdown_table, resolve_metrics, summarize  # noqa: E402
from at2_lens.evaluation.squad import HELD_OUT_MODULUS, multi_document_split, squad_split  # noqa: E402

from _resume import load_partial, replace_method_rows, save_partial  # noqa: E402

DEFAULT_DATA = SQUAD_V2_DEV_SUBSET
SMALL = {
    "limit": 3, "n_eval_masks": 16, "ks": (1, 3), "max_new_tokens": 12, "n_permutations": 8,
    "adversarial": {"steps": 6, "layers": [-1]},
    "methods": ["at2", "at2_refined8", "avg_attention", "last_layer_attention", "loo", "contextcite32", "gradxinput"],
    "metrics": ["lds", "topk_drop", "kendall_loo", "kendall_gradxinput", "attention_checks"],
}
FULL = {
    "limit": None, "n_eval_masks": 32, "ks": (1, 3, 5), "max_new_tokens": 32, "n_permutations": 32,
    "adversarial": {"steps": 30, "layers": None},
    "methods": ["at2", "at2_refined8", "avg_attention", "last_layer_attention", "loo", "loo_remove", "contextcite32",
                "contextcite256", "gradxinput", "ig20"],
    "metrics": ["all"],
}
MULTIDOC = {
    **FULL,
    "methods": ["at2", "at2_refined8", "avg_attention", "last_layer_attention", "loo", "loo_remove", "contextcite32",
                "gradxinput"],
    "metrics": ["lds", "topk_drop", "kendall_loo", "kendall_gradxinput"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="CI mode: 3 held-out tasks, 16 masks, cheap settings")
    ap.add_argument("--suite", default="squad", choices=["squad", "multidoc"],
                    help="held-out tasks: SQuAD paragraphs (default) or generated multi-document tasks")
    ap.add_argument("--model", default="smollm2", help="'smollm2' (default), 'tiny' (smoke run) or a model path")
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="SQuAD-format JSON file (default: the shipped subset)")
    ap.add_argument("--estimator", default=None,
                    help="AT2 estimator file for method 'at2' (default: the one shipped for the model, if any)")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N held-out tasks")
    ap.add_argument("--n-eval-masks", type=int, default=None, help="held-out ablations per task for LDS")
    ap.add_argument("--methods", default=None, help="comma-separated method names (see at2-lens evaluate --help)")
    ap.add_argument("--metrics", default=None, help="comma-separated metric names or aliases")
    ap.add_argument("--mode", default="mask", choices=["mask", "remove"], help="ground-truth ablation (default mask)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the held-out masks and checks (default 0)")
    ap.add_argument("--out", default=None,
                    help="tidy per-task results CSV, rewritten atomically after every task; when it exists, the "
                         "tasks it holds are kept and the run resumes with the next one (same settings required)")
    ap.add_argument("--tasks", default=None, metavar="START:STOP",
                    help="run only the held-out tasks with these indices (Python slice, e.g. 20:31), so that "
                         "several processes can share the run, each with its own --out")
    ap.add_argument("--merge", action="append", default=[], metavar="CSV",
                    help="fold the finished tasks of another results CSV, written with the same settings (e.g. by a "
                         "second process with --tasks), into --out before running; repeatable")
    ap.add_argument("--rescore", default=None, metavar="METHODS",
                    help="comma-separated methods of an existing --out file to recompute for every finished task, "
                         "keeping the other methods' rows (e.g. 'at2' after retraining its estimator); resumable")
    ap.add_argument("--table-only", action="store_true", help="print the table of an existing --out CSV and stop")
    ap.add_argument("--device", default="cpu", help="where the model runs (e.g. cuda); default cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: on a shared 2-core machine two threads spin-wait on each "
                         "other and a forward pass became ~15x slower and erratic; 0 = torch's own choice)")
    args = ap.parse_args()
    task_slice = _parse_task_range(args.tasks)
    if args.merge and not args.out:
        raise SystemExit("--merge needs --out (the file the merged results are written to)")
    rescore = [m for m in args.rescore.split(",") if m] if args.rescore else []
    if args.rescore is not None:
        if not rescore:
            raise SystemExit("--rescore: expected comma-separated method names, e.g. 'at2'")
        if not args.out or not Path(args.out).is_file():
            raise SystemExit(f"--rescore needs an existing --out results file, got {args.out!r}")
        if args.merge or args.tasks or args.table_only:
            raise SystemExit("--rescore re-scores every finished task of --out; it takes no --merge, --tasks or "
                             "--table-only")
    for other in args.merge:
        if not Path(other).is_file():
            raise SystemExit(f"--merge: {other} does not exist")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cfg = dict(SMALL if args.small else MULTIDOC if args.suite == "multidoc" else FULL)
    if not Path(args.data).is_file():
        raise SystemExit(f"data file {args.data} is absent")
    names = args.methods.split(",") if args.methods else list(cfg["methods"])
    if args.estimator:
        names = ["at2", *[n for n in names if n != "at2"]]
    not_run = [m for m in rescore if m not in names]
    if not_run:
        raise SystemExit(f"--rescore: {not_run} are not among this run's methods {names}")
    if args.model == "tiny":
        from at2_lens.models.tiny import load_tiny

        model = load_tiny("llama")
    else:
        from at2_lens.models import load_model

        model = load_model(args.model, device=args.device)
    methods = build_methods(model, names, estimator=args.estimator, mode=args.mode, seed=args.seed)
    metrics = resolve_metrics(args.metrics.split(",") if args.metrics else cfg["metrics"])
    adversarial = dict(cfg["adversarial"])
    if adversarial.get("layers") is not None:
        n_layers = int(model.cfg.n_layers)
        adversarial["layers"] = [layer % n_layers for layer in adversarial["layers"]]
    train, held = (multi_document_split if args.suite == "multidoc" else squad_split)(args.data)
    limit = args.limit if args.limit is not None else cfg["limit"]
    tasks = held[:limit] if limit is not None else held
    n_masks = args.n_eval_masks or cfg["n_eval_masks"]
    settings = {"model": args.model, "data": Path(args.data).name, "methods": list(methods), "metrics": metrics,
                "n_eval_masks": n_masks, "ks": list(cfg["ks"]), "mode": args.mode, "seed": args.seed,
                "max_new_tokens": cfg["max_new_tokens"], "n_permutations": cfg["n_permutations"],
                "adversarial": adversarial, "estimator": args.estimator}
    if args.suite != "squad":  # recorded only when not the default, so that earlier squad result files still resume
        settings["suite"] = args.suite
    if "at2" in methods:
        settings["estimator_sha256"] = weights_sha256(methods["at2"].estimator.weights)
    unknown = [m for m in rescore if m not in methods]
    if unknown:  # e.g. 'at2' on a model without an estimator, which is labelled 'at2_uniform'
        raise SystemExit(f"--rescore: {unknown} are not among this run's methods {list(methods)}")
    # what re-scoring may change (AT2's estimator; the method list, by the re-scored methods it adds); any other
    # setting must be the file's own
    uses_estimator = [m for m in methods if m == "at2" or m.startswith("at2_refined")]
    if any(m in rescore for m in uses_estimator) and not set(uses_estimator) <= set(rescore):
        raise SystemExit(f"--rescore: {uses_estimator} all use the AT2 estimator; re-score them together")
    may_differ = ("estimator", "estimator_sha256") if any(m in rescore for m in uses_estimator) else ()
    may_differ = (*may_differ, "methods") if rescore else may_differ

    def read_partial(path: str | None) -> tuple[pd.DataFrame, dict]:
        df, meta = load_partial(path, settings, may_differ=may_differ, rescoring=bool(rescore))
        if rescore and meta:
            old = list(meta.get("settings", {}).get("methods", []))
            stray = [m for m in old if m not in methods]
            added = [m for m in methods if m not in old]
            if stray or not set(added) <= set(rescore):
                raise SystemExit(f"--rescore: {path} was run with methods {old}; a re-scoring may only add methods "
                                 f"it re-scores (adding {added}, dropping {stray})")
        if df is None:
            return pd.DataFrame(columns=["task"]), meta
        return df.assign(k=df["k"].astype("Int64")), meta

    done, meta = read_partial(args.out)
    gt_passes = int(meta.get("ground_truth_forward_passes", 0))
    for other in args.merge:
        extra, extra_meta = read_partial(other)
        both = sorted(set(extra["task"]) & set(done["task"]))
        if both:
            raise SystemExit(f"--merge: tasks {both} are finished in both {args.out} and {other}; merge files with "
                             "disjoint tasks (--tasks gives each process its own)")
        done = extra if done.empty else pd.concat([done, extra], ignore_index=True)
        gt_passes += int(extra_meta.get("ground_truth_forward_passes", 0))
        print(f"merged {extra['task'].nunique()} tasks from {other}", file=sys.stderr)
    if args.merge:
        done = done.sort_values(["task"], kind="stable").reset_index(drop=True)
        save_partial(args.out, done, settings, ground_truth_forward_passes=gt_passes)
    finished = set(done["task"])
    selected = set(range(len(tasks))[task_slice])

    def evaluate_task(chosen: dict, ti: int, task_metrics: list[str]) -> pd.DataFrame:
        """One held-out task under this run's settings (seeded by the task, so a re-scoring sees the same truth)."""
        torch.manual_seed(ti)
        return evaluate(chosen, [tasks[ti]], task_metrics, model=model, n_eval_masks=n_masks, ks=cfg["ks"],
                        mode=args.mode, seed=args.seed, max_new_tokens=cfg["max_new_tokens"],
                        n_permutations=cfg["n_permutations"], adversarial=adversarial, task_ids=[ti], progress=True)

    if rescore:
        done = _rescore(done, meta, {name: methods[name] for name in rescore}, metrics, evaluate_task, settings,
                        gt_passes, args.out, order=list(methods))
        finished = set(range(len(tasks)))  # nothing new is evaluated in a re-scoring run
    for ti in range(len(tasks)):
        if args.table_only or ti in finished or ti not in selected:
            continue
        part = evaluate_task(methods, ti, metrics)
        done = part if done.empty else pd.concat([done, part], ignore_index=True)
        gt_passes += int(part.attrs["ground_truth_forward_passes"])
        if args.out:
            save_partial(args.out, done, settings, ground_truth_forward_passes=gt_passes)
    if done.empty:
        raise SystemExit("no finished task to report")
    df = done
    print(f"# Faithfulness benchmark ({'small' if args.small else 'full'}, {args.suite} suite)\n")
    print(f"model: {args.model}; data: {Path(args.data).name}; split: held out when sha256(question id) % "
          f"{HELD_OUT_MODULUS} == 0 -> {len(held)} held-out / {len(train)} train paragraphs; evaluated "
          f"{df['task'].nunique()} held-out tasks (sentences as sources, the model's greedy answer as target).")
    if args.suite == "multidoc":
        print("suite: multidoc - each held-out question over its paragraph among two distractor snippets of other "
              "held-out articles (tasks generated by at2_lens.evaluation.squad.multi_document_split).")
    print(f"ground truth: {n_masks} held-out random {args.mode} ablations per task (keep prob 0.5), shared by all "
          f"methods: {gt_passes} forward passes in all. LDS output: logit-prob; "
          "top-k drop: log-prob (nats).")
    if "at2" in methods:
        print(f"at2: estimator {args.estimator or 'shipped with at2_lens for this model'}")
    elif "at2_uniform" in methods:
        print("no AT2 estimator for this model: at2_uniform is AT2's uniform-weight start (= average attention).")
    print("costs: mean passes per task (sequences through the model) and wall time / one forward pass, same run.\n")
    print(markdown_table(summarize(df)))
    if args.out:
        print(f"\nper-task results: {Path(args.out).resolve()}")


def _rescore(done: pd.DataFrame, meta: dict, chosen: dict, metrics: list[str],
             evaluate_task: Callable[[dict, int, list[str]], pd.DataFrame], settings: dict, gt_passes: int,
             out: str, order: list[str]) -> pd.DataFrame:
    """Recompute the ``chosen`` methods' rows for every finished task of ``done``, saving ``out`` after each task; a
    killed run resumes from the ``rescore`` entry of the results' JSON."""
    rescore = list(chosen)
    pending = meta.get("rescore") or {}
    if pending and (pending.get("methods") != rescore or meta.get("settings") != json.loads(json.dumps(settings))):
        raise SystemExit(f"{out} is being re-scored with {pending.get('methods')} under other settings; finish "
                         "that first")
    left = list(pending.get("tasks_left", sorted(int(t) for t in set(done["task"]))))
    per_method = [m for m in metrics if m not in METHOD_INDEPENDENT_METRICS]  # the attention checks stay as they are
    while left:
        ti = left[0]
        part = evaluate_task(chosen, ti, per_method)
        part = part[part["method"].isin(rescore)]
        done = replace_method_rows(done, ti, part.assign(k=part["k"].astype("Int64")), rescore, order)
        left = left[1:]
        extra = {"rescore": {"methods": rescore, "tasks_left": left}} if left else {}
        save_partial(out, done, settings, ground_truth_forward_passes=gt_passes, **extra)
        print(f"re-scored {rescore} on task {ti}; {len(left)} left", file=sys.stderr)
    return done


def _parse_task_range(text: str | None) -> slice:
    """``"A:B"`` (either side may be empty) as a slice of held-out task indices; None means all tasks."""
    if text is None:
        return slice(None)
    parts = text.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        start, stop = (int(x) if x.strip() else None for x in parts)
    except ValueError:
        raise SystemExit(f"--tasks: expected START:STOP (e.g. 20:31), got {text!r}") from None
    return slice(start, stop)


if __name__ == "__main__":
    main()
