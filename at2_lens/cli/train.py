"""``at2-lens train``: fit an AT2 estimator on a store written by ``collect`` and report held-out LDS."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from at2_lens.errors import At2LensError


def add_train_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``train`` sub-command to an ``argparse`` sub-parsers object and return its parser."""
    p = subparsers.add_parser("train", help="train an AT2 estimator on a collected store",
                              description="Fit per-head weights so that predicted ablation effects correlate "
                                          "(Pearson, per task) with the measured ones; prints held-out LDS.")
    p.add_argument("--store", required=True, help="the store directory written by 'collect'")
    p.add_argument("--out", required=True, help="estimator file to write (.safetensors)")
    p.add_argument("--held-out", type=float, default=0.2,
                   help="fraction of examples (the highest indices) kept for held-out LDS (default: 0.2)")
    p.add_argument("--steps", type=int, default=1000, help="optimisation steps (default: 1000)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate, cosine-decayed (default: 1e-3)")
    p.add_argument("--batch-size", type=int, default=512, help="examples per step (default: 512)")
    p.add_argument("--non-negative", action="store_true", help="constrain head weights to be >= 0")
    p.add_argument("--seed", type=int, default=0, help="training seed (default: 0)")
    p.set_defaults(func=cmd_train)
    return p


def cmd_train(args: argparse.Namespace) -> int:
    """Train on all but the last ``--held-out`` fraction of the store's examples, save, and print the LDS."""
    from at2_lens.at2.store import AblationStore
    from at2_lens.at2.training import train_estimator

    # A half-open interval ([0, 1): 0 = no held-out part), which at2_lens._validate.check_fraction does not offer.
    if not 0.0 <= args.held_out < 1.0:
        raise At2LensError(f"--held-out: expected a fraction in [0, 1), got {args.held_out}")
    store = AblationStore(args.store)
    examples = store.load()
    if len(examples) < 2:
        raise At2LensError(f"--store: {args.store} holds {len(examples)} examples; need at least 2")
    n_held = round(len(examples) * args.held_out)
    train, held = examples[: len(examples) - n_held], examples[len(examples) - n_held:]
    estimator, summary = train_estimator(
        train, held_out=held or None, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
        non_negative=args.non_negative, seed=args.seed, settings=store.settings,
    )
    estimator.save(args.out)
    print(f"estimator written to {Path(args.out).resolve()}")
    print(f"LDS train {summary.lds_train_init:.3f} -> {summary.lds_train:.3f}"
          + (f"; held-out {summary.lds_held_out_init:.3f} -> {summary.lds_held_out:.3f}"
             if summary.lds_held_out is not None else ""))
    return 0


__all__ = ["add_train_parser", "cmd_train"]
