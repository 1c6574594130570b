"""``at2-lens evaluate``: faithfulness of attribution methods on a set of tasks, as a CSV and a markdown summary.

Wire into a parser with ``add_evaluate_parser(subparsers)``; the command function is ``cmd_evaluate``. Heavy imports
happen inside ``cmd_evaluate`` so that ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from at2_lens._validate import check_int
from at2_lens.cli._args import (
    TASKS_HELP,
    add_max_new_tokens_arg,
    add_model_args,
    check_device,
    check_file,
    check_loaded_kind,
    check_model_kind,
    parse_ints,
    parse_tasks_spec,
)

_DEFAULT_METHODS = "at2,avg_attention,loo,contextcite32,gradxinput"
_DEFAULT_METRICS = "lds,topk_drop,kendall_loo,kendall_gradxinput"


def add_evaluate_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``evaluate`` sub-command to an ``argparse`` sub-parsers object and return its parser."""
    from at2_lens.evaluation._names import METHOD_HELP, METRIC_HELP

    methods = "\n".join(f"  {k}: {v}" for k, v in METHOD_HELP.items())
    metrics = "\n".join(f"  {k}: {v}" for k, v in METRIC_HELP.items())
    p = subparsers.add_parser(
        "evaluate",
        help="compare attribution methods by faithfulness (LDS, top-k drop, Kendall tau, attention checks)",
        description="Run every method on every task, score it against held-out source ablations of the same model "
                    "and print a method x metric table with each method's cost (forward/backward passes and wall "
                    "time as a multiple of one forward pass, measured in the same run).",
        epilog=f"methods:\n{methods}\n\nmetrics (aliases: topk_drop, kendall, attention_checks, all):\n{metrics}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p, default="smollm2", hooked_class="HookedTransformer",
                   model_help="'smollm2' (embedded, offline), a Hugging Face model id or a local model directory",
                   device_help="Under torchrun / accelerate launch each process evaluates tasks "
                               "i %% WORLD_SIZE == RANK on cuda:LOCAL_RANK with 'auto', and rank 0 gathers the "
                               "rows, prints and writes the results ")
    p.add_argument("--tasks", required=True,
                   help=f"{TASKS_HELP}. squad gives one task per paragraph; squad and hotpot tasks have the model's "
                        "own answer as target")
    p.add_argument("--split", default="held_out", choices=["held_out", "train", "all"],
                   help="for squad: and hotpot: tasks, which deterministic split to evaluate (held_out = tasks whose "
                        "question id hashes to 0 mod 5; default: held_out)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N tasks (default: all)")
    p.add_argument("--sources", default="sentence", choices=["token", "word", "sentence", "document"],
                   help="source granularity (default: sentence)")
    p.add_argument("--methods", default=_DEFAULT_METHODS,
                   help=f"comma-separated method names, see below (default: {_DEFAULT_METHODS})")
    p.add_argument("--estimator", default=None,
                   help="AT2 estimator file (.safetensors) for the 'at2' method (default: the one shipped for the "
                        "model; without one 'at2' is uniform weights and reported as 'at2_uniform')")
    p.add_argument("--metrics", default=_DEFAULT_METRICS,
                   help=f"comma-separated metric names or aliases, see below (default: {_DEFAULT_METRICS})")
    p.add_argument("--n-eval-masks", type=int, default=32,
                   help="held-out random ablations per task for LDS, shared by all methods (default: 32)")
    p.add_argument("--ks", default="1,3,5", help="the k of top-k drop, comma-separated (default: 1,3,5)")
    p.add_argument("--kendall-k", type=int, default=3, help="k of the top-k Kendall tau variant (default: 3)")
    p.add_argument("--mode", default="mask", choices=["mask", "remove"],
                   help="ablation for the LDS ground truth, leave-one-out and ContextCite without a suffix: 'mask' "
                        "the sources' keys in attention (positions kept, batched) or 'remove' their text and "
                        "re-tokenise (default: mask)")
    p.add_argument("--output", default="logit_prob", choices=["logit_prob", "log_prob"],
                   help="target output for LDS: log P - log(1 - P) or log P (default: logit_prob); top-k drop is "
                        "always in log P")
    p.add_argument("--n-permutations", type=int, default=16,
                   help="random attention permutations per task for attn_permutation (default: 16)")
    p.add_argument("--adversarial-steps", type=int, default=30,
                   help="Adam steps of the adversarial attention search (default: 30)")
    p.add_argument("--adversarial-layers", default=None,
                   help="comma-separated layers whose attention the adversary replaces (default: all)")
    p.add_argument("--tolerance", type=float, default=0.1,
                   help="adversarial attention: allowed |change| of the target log-prob, nats (default: 0.1)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the held-out masks, ContextCite's ablations and the attention checks (default: 0)")
    p.add_argument("--batch-size", type=int, default=8, help="ablations per forward call in mask mode (default: 8)")
    add_max_new_tokens_arg(p, "for each task's response when the task has none")
    p.add_argument("--out", default=None, help="write the tidy per-task results to this CSV file")
    p.add_argument("--summary", default=None, help="also write the markdown summary table to this file")
    p.add_argument("--quiet", action="store_true", help="no per-task progress on stderr")
    p.set_defaults(func=cmd_evaluate)
    return p


def load_eval_tasks(spec: str, split: str, sources: str, limit: int | None) -> list[Any]:
    """Tasks for ``--tasks`` (see ``TASKS_HELP``): a SQuAD or HotpotQA split, in source order, or a JSON Lines file."""
    from at2_lens.evaluation.squad import is_held_out, squad_split
    from at2_lens.tasks.hotpot import hotpot_records, hotpot_task
    from at2_lens.tasks.loaders import load_jsonl_tasks

    if limit is not None:
        check_int("--limit", limit, minimum=1)
    kind, source = parse_tasks_spec(spec)
    if kind == "squad":
        train, held = squad_split(source, sources=sources)
    elif kind == "hotpot":
        records = hotpot_records(source)
        train = [hotpot_task(r, sources) for r in records if not is_held_out(r["id"])]
        held = [hotpot_task(r, sources) for r in records if is_held_out(r["id"])]
    else:
        tasks = load_jsonl_tasks(source, sources=sources)
        return tasks[:limit] if limit is not None else tasks
    tasks = {"held_out": held, "train": train, "all": train + held}[split]
    return tasks[:limit] if limit is not None else tasks


def _rows(df: Any) -> list[dict[str, Any]]:
    """A result frame as JSON-able row dicts (missing ``k`` as None); floats keep every bit through JSON."""
    import pandas as pd

    rows = []
    for rec in df.to_dict(orient="records"):
        rows.append({key: (None if value is pd.NA or (key == "k" and pd.isna(value)) else
                           value.item() if hasattr(value, "item") else value) for key, value in rec.items()})
    return rows


def _frame(rows: list[dict[str, Any]], attrs: dict[str, Any]) -> Any:
    """Rebuild the result frame of ``evaluate`` from gathered rows (same columns and dtypes)."""
    import pandas as pd

    from at2_lens.evaluation.runner import COLUMNS

    df = pd.DataFrame(rows, columns=COLUMNS)
    df["k"] = df["k"].astype("Int64")
    df.attrs.update(attrs)
    return df


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Run ``evaluate`` as configured by the parsed arguments; prints the summary table.

    Under ``torchrun`` each process evaluates the tasks ``i % WORLD_SIZE == RANK`` with their global task ids (the
    seeds of their held-out masks), and rank 0 merges the rows in task order: the same table as one process.
    """
    from at2_lens import load_model
    from at2_lens.distributed import DataParallel
    from at2_lens.evaluation.methods import build_methods, check_method_names
    from at2_lens.evaluation.runner import evaluate, markdown_table, resolve_metrics, summarize
    from at2_lens.files import atomic_write_text

    metrics = resolve_metrics([m.strip() for m in args.metrics.split(",") if m.strip()])
    ks = parse_ints(args.ks, "--ks")
    adv_layers = parse_ints(args.adversarial_layers, "--adversarial-layers") if args.adversarial_layers else None
    method_names = [m for m in args.methods.split(",") if m.strip()]
    check_method_names(method_names)
    check_model_kind(args.model, decoder=True, command="evaluate")
    check_device(args.device)
    check_file(args.estimator, "--estimator")
    for name in ("n_eval_masks", "kendall_k", "n_permutations", "batch_size", "max_new_tokens"):
        check_int(f"--{name.replace('_', '-')}", getattr(args, name), minimum=1)
    check_int("--adversarial-steps", args.adversarial_steps, minimum=0)
    for k in ks:
        check_int("--ks", k, minimum=1)
    with DataParallel() as dp:
        device = dp.device(args.device)
        tasks = load_eval_tasks(args.tasks, args.split, args.sources, args.limit)
        mine = dp.shard(len(tasks))
        model = load_model(args.model, backend=args.backend, device=device)
        check_loaded_kind(model, decoder=True, command="evaluate", name=args.model)
        methods = build_methods(model, method_names, estimator=args.estimator,
                                mode=args.mode, batch_size=args.batch_size, seed=args.seed)
        rows: list[dict[str, Any]] = []
        attrs: dict[str, Any] = {"ground_truth_forward_passes": 0}
        if mine:  # a rank can be idle when there are fewer tasks than processes
            part = evaluate(methods, [tasks[i] for i in mine], metrics, model=model, n_eval_masks=args.n_eval_masks,
                            ks=ks, kendall_k=args.kendall_k, mode=args.mode, output=args.output, seed=args.seed,
                            batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                            n_permutations=args.n_permutations,
                            adversarial={"steps": args.adversarial_steps, "layers": adv_layers,
                                         "tolerance": args.tolerance},
                            task_ids=mine, progress=not args.quiet)
            rows, attrs = _rows(part), dict(part.attrs)
        gathered = dp.gather_json({"rows": rows, "attrs": attrs})
        if not dp.is_main:
            return 0
    merged_attrs = next(g["attrs"] for g in gathered if g["rows"])
    merged_attrs.update(n_tasks=len(tasks),
                        ground_truth_forward_passes=sum(g["attrs"]["ground_truth_forward_passes"] for g in gathered))
    # Rows of one task stay in their order; tasks come in the order of the task list, as in a single process.
    df = _frame(sorted((r for g in gathered for r in g["rows"]), key=lambda r: r["task"]), merged_attrs)
    table = markdown_table(summarize(df))
    workers = f", {dp.world_size} processes" if dp.is_distributed else ""
    print(f"{len(tasks)} tasks{workers}; ground truth: {df.attrs['ground_truth_forward_passes']} forward passes "
          f"({args.n_eval_masks} held-out {args.mode} ablations + 1 per task)\n")
    print(table)
    if args.out:
        df.to_csv(args.out, index=False)
        print(f"\nper-task results written to {Path(args.out).resolve()}")
    if args.summary:
        atomic_write_text(args.summary, table + "\n")
    return 0


__all__ = ["add_evaluate_parser", "cmd_evaluate", "load_eval_tasks"]
