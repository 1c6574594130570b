"""``at2-lens heads``: head importance by AttAttr, attention score, Taylor expansion and at random on SST-2 training
phrases, then a pruning sweep (accuracy on SST-2 validation with the least important heads masked), written as a CSV
and a PNG plot and printed as a markdown table.

Takes the fine-tuned MiniLM SST-2 classifier by default (``--classifier probe``: the frozen encoder with the linear
probe), or ``--model DIR --head FILE`` for another encoder classifier (a linear head file written by
``at2_lens.models.classifier.write_head``). The importance examples are split in two disjoint halves and each
method's ranking is compared across them (Spearman; ``--stability-csv``); the pruning uses all of them. Random
pruning is repeated ``--random-draws`` times and reported as the mean (and spread) of the draws.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path
from typing import Any

from at2_lens._optional import require
from at2_lens._validate import check_int
from at2_lens.cli._args import add_classifier_args, check_classifier_args, load_classifier, set_threads
from at2_lens.cli.heads_decoder import add_decoder_args, cmd_heads_decoder
from at2_lens.errors import InputError

_DEFAULT_METHODS = "attattr,attention,taylor,random"


def add_heads_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``heads`` sub-command to an ``argparse`` sub-parsers object and return its parser."""
    heads = subparsers.add_parser(
        "heads",
        help="AttAttr head study: head importance by four methods and a head-pruning sweep on SST-2",
        description="Score every attention head by AttAttr (integrated gradients over attention), attention score, "
                    "Taylor expansion and at random on SST-2 training phrases, then mask the least important "
                    "heads (0 %, 10 %, ..., 100 %) and measure accuracy on SST-2 validation. Writes a CSV and a "
                    "PNG plot; prints a markdown table (fraction pruned x method).",
    )
    heads.add_argument("--study", default="encoder", choices=["encoder", "decoder"],
                       help="encoder (default): the head-pruning study above; decoder: head finders (retrieval, "
                            "query focus, AttAttr, AT2 weights) on SmolLM2 and causal checks on held-out tasks (see "
                            "the decoder options below; --model then defaults to smollm2)")
    add_classifier_args(heads, default_classifier="finetuned")
    heads.set_defaults(model=None)  # resolved per study in cmd_heads
    heads.add_argument("--data-dir", default=None,
                       help="directory holding sst2/train.tsv and sst2/validation.tsv (default: the shipped data; "
                            "$AT2_LENS_DATA first when set)")
    heads.add_argument("--n-importance", type=int, default=128,
                       help="SST-2 training phrases (seeded random sample) scored for head importance (default: 128)")
    heads.add_argument("--n-eval", type=int, default=0,
                       help="first N validation sentences to evaluate on; 0 = all 872 (default: 0)")
    heads.add_argument("--methods", default=_DEFAULT_METHODS,
                       help=f"comma-separated importance methods (default: {_DEFAULT_METHODS})")
    heads.add_argument("--n-fractions", type=int, default=10,
                       help="pruning steps: fractions 0, 1/N, ..., 1 of all heads (default: 10, i.e. 10 %% steps)")
    heads.add_argument("--n-steps", type=int, default=16,
                       help="integration steps of AttAttr (Gauss-Legendre; default: 16)")
    heads.add_argument("--target", default="predicted", choices=["predicted", "gold"],
                       help="AttAttr's F: probability of the predicted or of the gold class (default: predicted)")
    heads.add_argument("--batch-size", type=int, default=8,
                       help="examples per AttAttr batch (each runs n_steps rows; default: 8)")
    heads.add_argument("--seed", type=int, default=0, help="seed of the training sample and of 'random' (default 0)")
    heads.add_argument("--csv", default="heads_pruning.csv", help="where to write the sweep (default: "
                                                                  "heads_pruning.csv)")
    heads.add_argument("--plot", default="heads_pruning.png",
                       help="where to write the accuracy plot (default: heads_pruning.png); '' to skip")
    heads.add_argument("--importance-json", default=None,
                       help="also write the [layer, head] importance of each method as JSON to this path")
    heads.add_argument("--random-draws", type=int, default=5,
                       help="random head orders for the 'random' method; the table shows their mean (default: 5)")
    heads.add_argument("--stability-csv", default=None,
                       help="also write the ranking stability (Spearman between the two halves of the importance "
                            "examples, per method) to this CSV")
    heads.add_argument("--no-progress", action="store_true", help="no progress bars (they go to stderr)")
    add_decoder_args(heads)
    heads.set_defaults(func=cmd_heads)
    return heads


# ------------------------------------------------------------------------------------------------------ helpers
def markdown_sweep(df: Any) -> str:
    """The sweep as a markdown table: one row per fraction pruned, one accuracy column per method."""
    methods = list(dict.fromkeys(df["method"]))
    fractions = sorted(set(df["fraction"]))
    head = "| pruned | heads | " + " | ".join(methods) + " |"
    sep = "|---:|---:|" + "---:|" * len(methods)
    lines = [head, sep]
    for f in fractions:
        part = df[df["fraction"] == f]
        n = int(part["n_pruned"].iloc[0])
        accs = [part[part["method"] == m]["accuracy"] for m in methods]
        cells = [_cell(a) for a in accs]
        lines.append(f"| {f * 100:.0f} % | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(acc: Any) -> str:
    """One accuracy in %, or the mean ± standard deviation of several draws."""
    if not len(acc):
        return ""
    if len(acc) == 1:
        return f"{float(acc.iloc[0]) * 100:.1f}"
    return f"{float(acc.mean()) * 100:.1f} ± {float(acc.std()) * 100:.1f}"


def markdown_stability(df: Any) -> str:
    """The stability table: per method, Spearman between the two halves and the overlap of the 50 % pruned."""
    lines = ["| method | Spearman (set A vs set B) | heads pruned at 50 % by both |", "|---|---:|---:|"]
    lines += [f"| {r.method} | {r.spearman:.3f} | {r.pruned_overlap * 100:.0f} % |" for r in df.itertuples()]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------- commands
def cmd_heads(args: argparse.Namespace) -> int:
    """Run the head study configured by ``args``; prints the markdown tables."""
    if getattr(args, "study", "encoder") == "decoder":
        args.model = args.model or "smollm2"
        return cmd_heads_decoder(args)
    args.model = args.model or "minilm"
    import json

    import torch

    from at2_lens.attattr.head_importance import IMPORTANCE_METHODS as METHODS
    from at2_lens.attattr.head_importance import importance_stability, plot_pruning, pruning_sweep, random_pruning
    from at2_lens.files import atomic_write_text
    from at2_lens.models.classifier import load_sst2

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if not methods or bad:
        raise InputError(f"--methods: expected a comma-separated subset of {METHODS}, got {args.methods!r}")
    for name in ("n_importance", "n_fractions", "n_steps", "batch_size", "random_draws"):
        check_int(f"--{name.replace('_', '-')}", getattr(args, name), minimum=1)
    check_int("--n-eval", args.n_eval, minimum=0)
    check_classifier_args(args, "heads")
    scored = [m for m in methods if m != "random"]
    if scored and args.n_importance < 2:
        raise InputError("--n-importance: expected at least 2 (the examples are split in two halves)")
    if args.plot:  # optional package: fail before the sweep, not after it
        require("matplotlib", "plot", "at2-lens heads (the --plot PNG; --plot '' skips it)")
    set_threads(args.threads)
    train_texts, train_labels = load_sst2("train", data_dir=args.data_dir)
    eval_texts, eval_labels = load_sst2("validation", limit=args.n_eval or None, data_dir=args.data_dir)
    if args.n_importance > len(train_texts):
        raise InputError(f"--n-importance: the training split has {len(train_texts)} phrases, got {args.n_importance}")
    # A seeded random sample in random order: its two halves are two disjoint random sets.
    pick = random.Random(args.seed).sample(range(len(train_texts)), args.n_importance)
    imp_texts = [train_texts[i] for i in pick]
    imp_labels = [train_labels[i] for i in pick]
    finetuned = args.classifier == "finetuned"
    clf = load_classifier(args.model, args.head, args.backend, args.device, finetuned=finetuned)
    fractions = [i / args.n_fractions for i in range(args.n_fractions + 1)]
    progress = not args.no_progress
    t0 = time.perf_counter()
    stability = importance_stability(
        clf, imp_texts, imp_labels, scored, progress=progress,
        method_kwargs={"attattr": {"n_steps": args.n_steps, "batch_size": args.batch_size, "target": args.target}},
    ) if scored else None
    scores = {m: v["all"] for m, v in stability.attrs["importance"].items()} if stability is not None else {}
    cache: dict[bytes, float] = {}
    frames = []
    for method in methods:
        if method == "random":
            rnd = random_pruning(clf, eval_texts, eval_labels, fractions, n_draws=args.random_draws, seed=args.seed,
                                 progress=progress, cache=cache)
            frames.append(rnd)
            continue
        frames.append(pruning_sweep(clf, eval_texts, eval_labels, torch.tensor(scores[method]), fractions,
                                    method=method, progress=progress, cache=cache).assign(draw=0))
    import pandas as pd

    df = pd.concat(frames, ignore_index=True)
    elapsed = time.perf_counter() - t0
    print(f"{clf.backend.describe()} ({args.classifier if args.head is None else 'head ' + args.head}): importance "
          f"from {len(imp_texts)} SST-2 training phrases (seed {args.seed}, AttAttr {args.n_steps} steps), accuracy "
          f"(%) on {len(eval_texts)} validation sentences"
          f"{f'; random: mean of {args.random_draws} draws' if 'random' in methods else ''}; {elapsed:.0f} s\n")
    print(markdown_sweep(df))
    if stability is not None:
        print(f"\nranking stability: importance from two disjoint halves ({int(stability['n_a'].iloc[0])} and "
              f"{int(stability['n_b'].iloc[0])} phrases)\n")
        print(markdown_stability(stability))
    Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.csv, df.to_csv(index=False))
    print(f"\nsweep written to {Path(args.csv).resolve()}")
    if args.stability_csv and stability is not None:
        atomic_write_text(args.stability_csv, stability.to_csv(index=False))
        print(f"stability written to {Path(args.stability_csv).resolve()}")
    if args.plot:
        plot_pruning(df, args.plot, title=f"head pruning, {len(eval_texts)} SST-2 validation sentences")
        print(f"plot written to {Path(args.plot).resolve()}")
    if args.importance_json:
        record = dict(scores)
        if stability is not None:
            record["halves"] = {m: {k: v[k] for k in ("a", "b")} for m, v in stability.attrs["importance"].items()}
        atomic_write_text(args.importance_json, json.dumps(record, indent=1))
        print(f"importance written to {Path(args.importance_json).resolve()}")
    return 0


__all__ = ["add_heads_parser", "cmd_heads", "markdown_stability", "markdown_sweep"]
