"""Adversarial triggers from AttAttr on the MiniLM SST-2 classifier (Hao et al. 2021, §"Adversarial attack").

Mines the most frequent top-attributed ``key → query`` token pairs of each class on a seeded sample of SST-2
training phrases (AttAttr over the chosen layers, max over heads), inserts each pattern into SST-2 validation
sentences at the mined relative positions, and prints accuracy before/after per pattern as a markdown table
(optionally a CSV). Uses ``at2_lens.attattr.triggers``; one CPU thread by default.

Takes the fine-tuned classifier by default (``--classifier probe``: the frozen encoder with the linear probe).
With ``--stability``, two disjoint seeded samples of ``--n-train`` phrases each are mined separately; the script
prints the share of each set's top ``--overlap-top`` patterns per class that the other set also mined, and attacks
with the patterns of both sets (column ``mined_on``).

Run from the project root::

    python scripts/attattr_triggers.py --n-train 128 --n-eval 0 --stability --csv triggers.csv
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
    parser.add_argument("--classifier", default="finetuned", choices=["finetuned", "probe"],
                        help="the fine-tuned MiniLM (default) or the frozen MiniLM with the linear probe")
    parser.add_argument("--stability", action="store_true",
                        help="mine two disjoint samples of --n-train phrases and compare their patterns")
    parser.add_argument("--overlap-top", type=int, default=10,
                        help="patterns per class compared between the two samples (default: 10)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    parser.add_argument("--csv", default=None, help="also write the table to this CSV file")
    parser.add_argument("--md", default=None, help="also write the printed report to this markdown file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    import pandas as pd

    from at2_lens.attattr.triggers import mine_trigger_patterns, pattern_overlap, trigger_attack
    from at2_lens.files import atomic_write_text
    from at2_lens.models.classifier import load_minilm_sst2, load_sst2
    from at2_lens.models.finetuned import load_minilm_sst2_finetuned

    train_texts, train_labels = load_sst2("train", data_dir=args.data_dir)
    pool = [i for i, t in enumerate(train_texts) if len(t.split()) >= args.min_words]
    n_sets = 2 if args.stability else 1
    sample = random.Random(args.seed).sample(pool, min(n_sets * args.n_train, len(pool)))
    sets = {name: sorted(sample[k * args.n_train:(k + 1) * args.n_train])
            for k, name in enumerate(["A", "B"][:n_sets])}
    eval_texts, eval_labels = load_sst2("validation", limit=args.n_eval or None, data_dir=args.data_dir)
    clf = load_minilm_sst2_finetuned() if args.classifier == "finetuned" else load_minilm_sst2()
    layers = [int(x) for x in args.layers.split(",")]
    n_mined = max(args.n_patterns, args.overlap_top) if args.stability else args.n_patterns
    report: list[str] = []
    frames, mined = [], {}
    t0 = time.perf_counter()
    for name, pick in sets.items():
        mined[name] = mine_trigger_patterns(
            clf, [train_texts[i] for i in pick], [train_labels[i] for i in pick],
            layers=layers, n_patterns=n_mined, n_steps=args.n_steps,
        )
        print(f"mined set {name} ({len(pick)} phrases) after {time.perf_counter() - t0:.0f} s", flush=True)
    t1 = time.perf_counter()
    for name, patterns in mined.items():
        seen: dict[int, int] = {}
        attack = []
        for p in patterns:  # the first n_patterns of each class
            seen[p.source_class] = seen.get(p.source_class, 0) + 1
            if seen[p.source_class] <= args.n_patterns:
                attack.append(p)
        frames.append(trigger_attack(clf, attack, eval_texts, eval_labels, examples=args.examples)
                      .assign(mined_on=name))
    t2 = time.perf_counter()
    df = pd.concat(frames, ignore_index=True)
    report.append(f"{clf.backend.describe()} ({args.classifier}): {n_sets} × {args.n_train} training phrases mined "
                  f"(layers {args.layers}, {args.n_steps} steps) in {t1 - t0:.0f} s; attack on {len(eval_texts)} "
                  f"validation sentences ({args.examples} class) in {t2 - t1:.0f} s\n")
    report.append("| mined on | pattern (key → query) | class | mined | n | acc. before | acc. after | drop "
                  "| flipped |")
    report.append("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in df.itertuples():
        report.append(f"| {r.mined_on} | {r.pattern} | {clf.labels[r.source_class]} | {r.mined_count} | "
                      f"{r.n_examples} | {r.accuracy_before * 100:.1f} | {r.accuracy_after * 100:.1f} | "
                      f"{r.drop * 100:+.1f} | {r.flipped * 100:.1f} |")
    if args.stability:
        ab = pattern_overlap(mined["A"], mined["B"], top=args.overlap_top)
        ba = pattern_overlap(mined["B"], mined["A"], top=args.overlap_top)
        top3 = pattern_overlap(mined["A"], mined["B"], top=args.n_patterns)
        report.append(f"\nstability: of set A's top {args.overlap_top} patterns per class, {ab * 100:.0f} % are "
                      f"among set B's top {args.overlap_top} (B in A: {ba * 100:.0f} %); of A's top "
                      f"{args.n_patterns}, {top3 * 100:.0f} % are among B's top {args.n_patterns}.")
        for name, patterns in mined.items():
            listing = ", ".join(f"{p.name} ({clf.labels[p.source_class]}, {p.count})" for p in patterns)
            report.append(f"\nset {name} patterns (class, count): {listing}")
    text = "\n".join(report)
    print(text)
    if args.csv:
        atomic_write_text(args.csv, df.to_csv(index=False))
    if args.md:
        atomic_write_text(args.md, text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
