"""``at2-lens heads`` and ``at2-lens tree``: AttAttr head studies and attribution trees from the command line.

Wire into the main parser with ``add_attattr_parsers(subparsers)``. Heavy imports happen inside the command
functions, so ``--help`` stays instant.

- ``heads``: head importance by AttAttr, attention score, Taylor expansion and at random on SST-2 training
  phrases, then a pruning sweep (accuracy on SST-2 validation with the least important heads masked), written as a
  CSV and a PNG plot and printed as a markdown table.
- ``tree``: one sentence → AttAttr over every layer → the attribution tree, drawn to a PNG, edges printed.

Both take the MiniLM SST-2 classifier by default, or ``--model DIR --head FILE`` for another encoder classifier
(a linear head file written by ``at2_lens.models.classifier.write_head``).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from typing import Any

from at2_lens._cli_args import add_model_args
from at2_lens.errors import InputError

_DEFAULT_METHODS = "attattr,attention,taylor,random"


def _add_classifier_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p, default="minilm", hooked_class="HookedEncoder",
                   model_help="'minilm' (embedded all-MiniLM-L6-v2, offline) or a local BERT-type model directory")
    p.add_argument("--head", default=None,
                   help="classifier head file (.safetensors from write_head); default: the shipped SST-2 head "
                        "for minilm (required for any other model)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")


def add_attattr_parsers(subparsers: Any) -> None:
    """Add the ``heads`` and ``tree`` sub-commands to an ``argparse`` sub-parsers object."""
    heads = subparsers.add_parser(
        "heads",
        help="AttAttr head study: head importance by four methods and a head-pruning sweep on SST-2",
        description="Score every attention head by AttAttr (integrated gradients over attention), attention score, "
                    "Taylor expansion and at random on SST-2 training phrases, then mask the least important "
                    "heads (0 %%, 10 %%, ..., 100 %%) and measure accuracy on SST-2 validation. Writes a CSV and a "
                    "PNG plot; prints a markdown table (fraction pruned x method).",
    )
    _add_classifier_args(heads)
    heads.add_argument("--data-dir", default=None,
                       help="directory holding sst2/train.tsv and sst2/validation.tsv (default: $AT2_LENS_DATA or "
                            "../shared/data)")
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
    heads.set_defaults(func=cmd_heads)

    tree = subparsers.add_parser(
        "tree",
        help="attribution tree of one sentence (AttAttr over every layer): PNG and printed edges",
        description="Attribute the classifier's predicted class to every layer's attention (integrated gradients), "
                    "sum over heads, normalise each layer by its maximum, keep interactions above the threshold "
                    "and build the tree top-down from the tokens the output reads. Draws it (layers as rows, "
                    "tokens as columns) and prints the edges.",
    )
    _add_classifier_args(tree)
    tree.add_argument("--text", required=True, help="the sentence to explain")
    tree.add_argument("--threshold", type=float, default=0.4,
                      help="keep interactions whose per-layer max-normalised score exceeds this (default: 0.4)")
    tree.add_argument("--n-steps", type=int, default=20, help="integration steps of AttAttr (default: 20)")
    tree.add_argument("--roots", default="all",
                      help="top-layer token positions the tree starts from: 'all' (every real token; right for "
                           "the mean-pooled classifier), 'cls' (position 0) or comma-separated positions "
                           "(default: all)")
    tree.add_argument("--out", default="attribution_tree.png",
                      help="where to write the drawing (default: attribution_tree.png); '' to skip")
    tree.set_defaults(func=cmd_tree)


# ------------------------------------------------------------------------------------------------------ helpers
def load_classifier(model: str, head: str | None, backend: str) -> Any:
    """The MiniLM SST-2 classifier, or ``SentimentClassifier(load_model(model), read_head(head))``."""
    from at2_lens.models.classifier import SentimentClassifier, load_minilm_sst2, read_head

    if model.strip().lower() == "minilm":
        return load_minilm_sst2(backend, head_path=head)
    if head is None:
        raise InputError("--head: a model other than 'minilm' needs a classifier head file (.safetensors)")
    from at2_lens.models import load_model

    return SentimentClassifier(load_model(model, backend=backend), read_head(head))  # type: ignore[arg-type]


def _set_threads(n: int) -> None:
    import torch

    if n < 1:
        raise InputError(f"--threads: expected >= 1, got {n}")
    torch.set_num_threads(n)


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
        cells = [f"{float(a.iloc[0]) * 100:.1f}" if len(a) else "" for a in accs]
        lines.append(f"| {f * 100:.0f} % | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------- commands
def cmd_heads(args: argparse.Namespace) -> int:
    """Run the head study configured by ``args``; prints the markdown table."""
    import json

    from at2_lens._io import atomic_write_text
    from at2_lens.attattr.head_importance import IMPORTANCE_METHODS as METHODS
    from at2_lens.attattr.head_importance import compare_pruning, plot_pruning
    from at2_lens.models.classifier import load_sst2

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if not methods or bad:
        raise InputError(f"--methods: expected a comma-separated subset of {METHODS}, got {args.methods!r}")
    for name in ("n_importance", "n_fractions", "n_steps", "batch_size"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(args, name)}")
    if args.n_eval < 0:
        raise InputError(f"--n-eval: expected >= 0 (0 = all), got {args.n_eval}")
    _set_threads(args.threads)
    train_texts, train_labels = load_sst2("train", data_dir=args.data_dir)
    eval_texts, eval_labels = load_sst2("validation", limit=args.n_eval or None, data_dir=args.data_dir)
    if args.n_importance > len(train_texts):
        raise InputError(f"--n-importance: the training split has {len(train_texts)} phrases, got {args.n_importance}")
    pick = sorted(random.Random(args.seed).sample(range(len(train_texts)), args.n_importance))
    imp_texts = [train_texts[i] for i in pick]
    imp_labels = [train_labels[i] for i in pick]
    clf = load_classifier(args.model, args.head, args.backend)
    fractions = [i / args.n_fractions for i in range(args.n_fractions + 1)]
    t0 = time.perf_counter()
    df = compare_pruning(
        clf, imp_texts, imp_labels, eval_texts, eval_labels, methods=methods, fractions=fractions, seed=args.seed,
        method_kwargs={"attattr": {"n_steps": args.n_steps, "batch_size": args.batch_size, "target": args.target}},
    )
    elapsed = time.perf_counter() - t0
    table = markdown_sweep(df)
    print(f"{clf.backend.describe()}: importance from {len(imp_texts)} SST-2 training phrases (seed {args.seed}, "
          f"AttAttr {args.n_steps} steps), accuracy (%) on {len(eval_texts)} validation sentences; {elapsed:.0f} s\n")
    print(table)
    Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.csv, df.to_csv(index=False))
    print(f"\nsweep written to {Path(args.csv).resolve()}")
    if args.plot:
        plot_pruning(df, args.plot, title=f"head pruning, {len(eval_texts)} SST-2 validation sentences")
        print(f"plot written to {Path(args.plot).resolve()}")
    if args.importance_json:
        atomic_write_text(args.importance_json, json.dumps(df.attrs["importance"], indent=1))
        print(f"importance written to {Path(args.importance_json).resolve()}")
    return 0


def _parse_roots(spec: str) -> int | list[int] | None:
    spec = spec.strip().lower()
    if spec == "all":
        return None
    if spec == "cls":
        return 0
    try:
        return [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"--roots: expected 'all', 'cls' or comma-separated positions, got {spec!r}") from None


def cmd_tree(args: argparse.Namespace) -> int:
    """Attribute one sentence, build its attribution tree, draw it and print its edges."""
    from at2_lens.attattr.attribution import AttentionAttribution
    from at2_lens.attattr.readouts import classifier_output_func
    from at2_lens.attattr.tree import attribution_tree, draw_attribution_tree, tree_edges

    if not args.text.strip():
        raise InputError("--text: expected a non-empty sentence")
    if args.n_steps < 1:
        raise InputError(f"--n-steps: expected >= 1, got {args.n_steps}")
    roots = _parse_roots(args.roots)
    if not 0.0 <= args.threshold < 1.0:
        raise InputError(f"--threshold: expected a number in [0, 1), got {args.threshold}")
    _set_threads(args.threads)
    clf = load_classifier(args.model, args.head, args.backend)
    tokens, mask = clf.tokenize([args.text])
    result = AttentionAttribution(clf.backend, classifier_output_func(clf)).attribute(
        tokens, attention_mask=mask, n_steps=args.n_steps
    )
    texts = clf.tokenizer.convert_ids_to_tokens(tokens[0].tolist())
    graph = attribution_tree(result, texts, threshold=args.threshold, roots=roots)
    probs = clf.forward(tokens, mask)[0].detach()
    pred = int(probs.argmax())
    label = clf.labels[pred] if pred < len(clf.labels) else str(pred)
    print(f"{args.text!r} -> {label} (p = {float(probs[pred]):.3f}); {graph.number_of_nodes()} nodes, "
          f"{graph.number_of_edges()} edges above {args.threshold:g}")
    for e in tree_edges(graph):
        print(f"layer {e['layer']}: {e['key_token']} ({e['key_position']}) -> {e['query_token']} "
              f"({e['query_position']})  {e['weight']:.2f}")
    if args.out:
        ax = draw_attribution_tree(graph, title=f"{args.text[:60]} -> {label}")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        ax.figure.savefig(args.out)
        print(f"tree drawn to {Path(args.out).resolve()}", file=sys.stdout)
    return 0


__all__ = ["add_attattr_parsers", "cmd_heads", "cmd_tree", "load_classifier", "markdown_sweep"]
