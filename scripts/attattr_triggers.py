"""Adversarial triggers from AttAttr on the MiniLM SST-2 classifier (Hao et al. 2021, §"Adversarial attack").

Mines the most frequent top-attributed ``key → query`` token pairs of each class on a seeded sample of SST-2
training phrases (AttAttr over the chosen layers, max over heads), inserts each pattern into SST-2 validation
sentences at the mined relative positions, and prints accuracy before/after per pattern as a markdown table
(optionally a CSV). Uses ``at2_lens.attattr.triggers``; one CPU thread by default.

Run from the project root::

    python scripts/attattr_triggers.py --n-train 64 --n-eval 872 --csv triggers.csv
"""

from __future__ import annotations

import argparse
import random
import time
import warnings

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None, help="directory holding sst2/ (default: the shipped data)")
    parser.add_argument("--n-train", type=int, default=64, help="training phrases mined (seeded sample; default 64)")
    parser.add_argument("--min-words", type=int, default=6, help="only mine phrases of at least this many words")
    parser.add_argument("--n-eval", type=int, default=0, help="first N validation sentences attacked; 0 = all")
    parser.add_argument("--layers", default="3,4,5", help="layers searched for pairs (default: 3,4,5)")
    parser.add_argument("--n-patterns", type=int, default=3, help="patterns per class (default: 3)")
    parser.add_argument("--n-steps", type=int, default=8, help="AttAttr integration steps (default: 8)")
    parser.add_argument("--examples", default="other", choices=["all", "other", "same"],
                        help="attack the validation sentences of another class than the pattern's (default), all, "
                             "or the same class")
    parser.add_argument("--seed", type=int, default=0, help="seed of the training sample (default: 0)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    parser.add_argument("--csv", default=None, help="also write the table to this CSV file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    from at2_lens.attattr.triggers import mine_trigger_patterns, trigger_attack
    from at2_lens.files import atomic_write_text
    from at2_lens.models.classifier import load_minilm_sst2, load_sst2

    train_texts, train_labels = load_sst2("train", data_dir=args.data_dir)
    pool = [i for i, t in enumerate(train_texts) if len(t.split()) >= args.min_words]
    pick = sorted(random.Random(args.seed).sample(pool, min(args.n_train, len(pool))))
    eval_texts, eval_labels = load_sst2("validation", limit=args.n_eval or None, data_dir=args.data_dir)
    clf = load_minilm_sst2()
    t0 = time.perf_counter()
    patterns = mine_trigger_patterns(
        clf, [train_texts[i] for i in pick], [train_labels[i] for i in pick],
        layers=[int(x) for x in args.layers.split(",")], n_patterns=args.n_patterns, n_steps=args.n_steps,
    )
    t1 = time.perf_counter()
    df = trigger_attack(clf, patterns, eval_texts, eval_labels, examples=args.examples)
    t2 = time.perf_counter()
    print(f"{clf.backend.describe()}: {len(pick)} training phrases mined (layers {args.layers}, {args.n_steps} steps) "
          f"in {t1 - t0:.0f} s; attack on {len(eval_texts)} validation sentences ({args.examples} class) in "
          f"{t2 - t1:.0f} s\n")
    print("| pattern (key → query) | class | mined | n | acc. before | acc. after | drop | flipped |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in df.itertuples():
        print(f"| {r.pattern} | {clf.labels[r.source_class]} | {r.mined_count} | {r.n_examples} | "
              f"{r.accuracy_before * 100:.1f} | {r.accuracy_after * 100:.1f} | {r.drop * 100:+.1f} | "
              f"{r.flipped * 100:.1f} |")
    if args.csv:
        atomic_write_text(args.csv, df.to_csv(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
