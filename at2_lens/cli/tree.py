"""``at2-lens tree``: one sentence → AttAttr over every layer → the attribution tree, drawn to a PNG, edges printed.

Takes the MiniLM SST-2 classifier by default, or ``--model DIR --head FILE`` for another encoder classifier (a
linear head file written by ``at2_lens.models.classifier.write_head``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from at2_lens._optional import require
from at2_lens._validate import check_int
from at2_lens.cli._args import add_classifier_args, check_classifier_args, load_classifier, set_threads
from at2_lens.errors import InputError


def add_tree_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``tree`` sub-command to an ``argparse`` sub-parsers object and return its parser."""
    p = subparsers.add_parser(
        "tree",
        help="attribution tree of one sentence (AttAttr over every layer): PNG and printed edges",
        description="Attribute the classifier's predicted class to every layer's attention (integrated gradients), "
                    "sum over heads, normalise each layer by its maximum, keep interactions above the threshold "
                    "and build the tree top-down from the tokens the output reads. Draws it (layers as rows, "
                    "tokens as columns) and prints the edges.",
    )
    add_classifier_args(p)
    p.add_argument("--text", required=True, help="the sentence to explain")
    p.add_argument("--threshold", type=float, default=0.4,
                   help="keep interactions whose per-layer max-normalised score exceeds this (default: 0.4)")
    p.add_argument("--n-steps", type=int, default=20, help="integration steps of AttAttr (default: 20)")
    p.add_argument("--roots", default="all",
                   help="top-layer token positions the tree starts from: 'all' (every real token; right for "
                        "the mean-pooled classifier), 'cls' (position 0) or comma-separated positions "
                        "(default: all)")
    p.add_argument("--out", default="attribution_tree.png",
                   help="where to write the drawing (default: attribution_tree.png); '' to skip")
    p.add_argument("--save", default=None,
                   help="also save the AttAttr result (AttAttrResult.save: safetensors + JSON metadata) to this "
                        "path; read it back with AttAttrResult.load")
    p.set_defaults(func=cmd_tree)
    return p


def parse_roots(spec: str) -> int | list[int] | None:
    """``--roots`` as ``attribution_tree`` takes it: ``None`` (all), ``0`` (cls) or a list of positions."""
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
    check_int("--n-steps", args.n_steps, minimum=1)
    roots = parse_roots(args.roots)
    # A half-open interval ([0, 1)), which at2_lens._validate.check_fraction does not offer.
    if not 0.0 <= args.threshold < 1.0:
        raise InputError(f"--threshold: expected a number in [0, 1), got {args.threshold}")
    check_classifier_args(args, "tree")
    require("networkx", "graph", "at2-lens tree")  # optional packages: fail before loading the model
    if args.out:
        require("matplotlib", "plot", "at2-lens tree (drawing to --out; --out '' skips it)")
    set_threads(args.threads)
    clf = load_classifier(args.model, args.head, args.backend, args.device,
                          finetuned=args.classifier == "finetuned")
    tokens, mask = clf.tokenize([args.text])
    result = AttentionAttribution(clf.backend, classifier_output_func(clf)).attribute(
        tokens, attention_mask=mask, n_steps=args.n_steps
    )
    if args.save:
        print(f"AttAttr result saved to {result.save(args.save, model=clf.backend).resolve()}")
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


__all__ = ["add_tree_parser", "cmd_tree", "parse_roots"]
