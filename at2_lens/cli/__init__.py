"""The ``at2-lens`` command line: demo, attribute, prune, collect, train, convert-estimator, evaluate, heads, tree.

One module per command group, each with an ``add_<command>_parser(subparsers)`` that defines the options (and sets
the parser's ``func``) and a ``cmd_<command>(args) -> int`` that runs it:

- ``attribute``: ``demo`` and ``attribute`` (AT2 scores of a context's sources, terminal table and HTML report);
- ``prune``: prune a context to the sources the answer relies on and answer again (``at2_lens.pruning``);
- ``collect``: AT2 training data into a store; ``train``: an AT2 estimator from a store;
- ``convert``: ``convert-estimator``, a score estimator of the AT2 authors' package as an at2_lens estimator file;
- ``evaluate``: faithfulness of attribution methods (CSV and markdown summary);
- ``heads`` and ``tree``: AttAttr head study and attribution tree on an encoder classifier;
- ``_args``: options shared by several commands (``--model``/``--backend``/``--device``, ``--context``/
  ``--context-text``, ``--max-new-tokens``, the classifier options) and the checks every command runs before any
  model loads.

Every option is explained by ``at2-lens <command> --help``. Heavy imports happen inside the commands, so
``--help`` is instant. ``python -m at2_lens.cli`` runs the same ``main`` (for ``torchrun -m``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from at2_lens.cli.attribute import add_attribute_parser, add_demo_parser
from at2_lens.cli.collect import add_collect_parser
from at2_lens.cli.convert import add_convert_parser
from at2_lens.cli.evaluate import add_evaluate_parser
from at2_lens.cli.heads import add_heads_parser
from at2_lens.cli.prune import add_prune_parser
from at2_lens.cli.train import add_train_parser
from at2_lens.cli.tree import add_tree_parser
from at2_lens.errors import At2LensError

# In the order ``at2-lens --help`` lists them.
_PARSERS = (add_demo_parser, add_attribute_parser, add_prune_parser, add_collect_parser, add_train_parser,
            add_convert_parser, add_evaluate_parser, add_heads_parser, add_tree_parser)


def build_parser() -> argparse.ArgumentParser:
    """The ``at2-lens`` parser with every sub-command; each sub-parser's ``func`` default is its command."""
    parser = argparse.ArgumentParser(
        prog="at2-lens",
        description="Which context tokens, and which attention heads, made a TransformerLens model say this? "
                    "AT2 (learned attention attribution) and AttAttr on TransformerLens models.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_parser in _PARSERS:
        add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``at2-lens`` with ``argv`` (default: ``sys.argv[1:]``); a library input error is a message and exit 2."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except At2LensError as exc:
        print(f"at2-lens {args.command}: error: {exc}", file=sys.stderr)
        return 2


__all__ = ["build_parser", "main"]
