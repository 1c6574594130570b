"""Train the AT2 estimator shipped for SmolLM2-135M-Instruct from the repo's collected store.

    python scripts/train_smollm2_estimator.py          # writes at2_lens/estimators/smollm2-135m-instruct.safetensors
    python scripts/train_smollm2_estimator.py --learning-curve   # held-out LDS vs the number of training tasks

Reads the examples of data/at2_smollm2/store with index below ``--tasks`` (collected by scripts/collect_smollm2.py;
default SHIPPED_TASKS, the store's whole v3 task list; 0 = every example), holds out 20 % of them (seeded) for LDS,
trains with non-negative head weights (the model card's ceiling study: signed weights, other feature families and a
small MLP scorer did worse on validation tasks), calibrates the scores on the training part (a scale fitted by least
squares, so that a score is the predicted fall in the target's logit-probability when the source is removed; no
offset, which lowered validation LDS) and records the settings, LDS and calibration in the file.
``--learning-curve`` writes nothing: it trains
on random subsets (3 seeded draws per size, sizes halving from the whole training split) with the same settings and
prints the mean LDS on the same held-out examples, to show how much more data would help.
"""

from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STORE = ROOT / "data" / "at2_smollm2" / "store"
OUT = ROOT / "at2_lens" / "estimators" / "smollm2-135m-instruct.safetensors"
SHIPPED_TASKS = 895  # the shipped estimator's training data: store examples 0..894 (task list v3)
SETTINGS = {"lr": 1e-3, "batch_size": 512, "non_negative": True, "progress": False}


def learning_curve(examples: list, held_out: float, steps: int, draws: int = 3) -> None:
    import numpy as np
    import torch

    from at2_lens.at2.training import split_held_out, train_estimator

    train, held = split_held_out(examples, held_out, seed=0)
    sizes = []
    n = len(train)
    while n >= 12:
        sizes.append(n)
        n //= 2
    print(f"{len(train)} training / {len(held)} held-out examples; held-out LDS by training-set size "
          f"(mean of {draws} draws; the whole split is one draw)")
    print("| training tasks | held-out LDS |\n|---:|---:|")
    for size in reversed(sizes):
        runs = 1 if size == len(train) else draws
        lds = []
        for draw in range(runs):
            pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(1000 + draw))[:size].tolist()
            _, summary = train_estimator([train[i] for i in sorted(pick)], held_out=held, steps=steps, seed=0,
                                         **SETTINGS)
            lds.append(summary.lds_held_out)
        print(f"| {size} | {np.mean(lds):.3f} |", flush=True)


def _chat_prompt_format() -> dict[str, object]:
    """The store predates recorded prompt formats; its tasks (collect_smollm2.py, prompt_format="auto") were all
    rendered with SmolLM2's chat template."""
    from transformers import AutoTokenizer

    from at2_lens.at2.estimator import prompt_format_record
    from at2_lens.models.embedded import smollm2_hf_dir

    return prompt_format_record(True, AutoTokenizer.from_pretrained(str(smollm2_hf_dir()), local_files_only=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default=str(STORE))
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--held-out", type=float, default=0.2)
    ap.add_argument("--tasks", type=int, default=SHIPPED_TASKS,
                    help=f"use the store's examples with index < N (default {SHIPPED_TASKS}: the shipped estimator's; "
                         "0: all)")
    ap.add_argument("--learning-curve", action="store_true", help="print held-out LDS vs training-set size instead")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)  # the trainer's result is then independent of the machine's thread count
    from at2_lens.at2.store import AblationStore
    from at2_lens.at2.training import calibrate, split_held_out, train_estimator

    store = AblationStore(args.store)
    examples = store.load()
    if args.tasks:
        first = [e for e in examples if e.index < args.tasks]
        if len(first) < args.tasks:
            raise SystemExit(f"--tasks {args.tasks}: the store {args.store} holds only {len(first)} of its first "
                             f"{args.tasks} examples")
        examples = first
    if args.learning_curve:
        learning_curve(examples, args.held_out, args.steps)
        return
    train, held = split_held_out(examples, args.held_out, seed=0)
    est, summary = train_estimator(train, held_out=held, steps=args.steps, seed=0, settings=store.settings,
                                   prompt_format=_chat_prompt_format(), **SETTINGS)
    est = calibrate(est, train)
    est.save(args.out)
    print(f"{len(examples)} examples; held-out LDS {summary.lds_held_out_init:.4f} (uniform weights = average "
          f"attention) -> {summary.lds_held_out:.4f} (trained); train LDS {summary.lds_train_init:.4f} -> "
          f"{summary.lds_train:.4f}; calibration scale {est.calibration['scale']:.4g}; written to {args.out}")


if __name__ == "__main__":
    main()
