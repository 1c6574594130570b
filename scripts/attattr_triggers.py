"""Adversarial triggers from AttAttr on the MiniLM SST-2 classifier (Hao et al. 2021, §"Adversarial attack").

Mines top-attributed ``key → query`` token pairs on seeded samples of SST-2 training phrases (AttAttr over the
chosen layers, max over heads), counts them into patterns per class, inserts each pattern into SST-2 validation
sentences at the mined relative positions, and prints accuracy before/after per pattern as a markdown table
(optionally a CSV). Uses ``at2_lens.attattr.triggers``; one CPU thread by default.

Takes the fine-tuned classifier by default (``--classifier probe``: the frozen encoder with the linear probe).

With ``--stability``, ``--samples`` (default 4) disjoint seeded samples of ``--n-train`` phrases each are
attributed once (each example's best ``--keep`` pairs; with ``--pairs-dir`` every sample is saved as JSON when done,
so a stopped run resumes). Stability is the share of one sample's top ``--overlap-top`` patterns per class that the
other sample also ranks in its top ``--overlap-top`` (for key-pooled patterns: the same key tokens). The counting
rule (exact pairs or pooled by key token, pairs per example ``--top-ks``, ranked by count or by summed score) is
**chosen on samples A and B** and then **measured on C and D** (never chosen there), also for smaller prefixes of
C and D and, with more than four samples, for the unions C+E+G+... against D+F+H+..., to show how stability grows
with the number of phrases. The attack uses the chosen rule's patterns mined on all samples.

Run from the project root::

    python scripts/attattr_triggers.py --n-train 128 --n-eval 0 --csv triggers.csv
    python scripts/attattr_triggers.py --stability --n-train 512 --pairs-dir runs/trigger_pairs --md report.md
"""

from __future__ import annotations

import argparse
import json
import random
import time
import warnings
from pathlib import Path

import torch

SETS = "ABCDEFGHIJKL"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None, help="directory holding sst2/ (default: the shipped data)")
    parser.add_argument("--n-train", type=int, default=64, help="training phrases per sample (seeded; default 64)")
    parser.add_argument("--min-words", type=int, default=6, help="only mine phrases of at least this many words")
    parser.add_argument("--n-eval", type=int, default=0, help="first N validation sentences attacked; 0 = all")
    parser.add_argument("--layers", default="3,4,5", help="layers searched for pairs (default: 3,4,5)")
    parser.add_argument("--n-patterns", type=int, default=3, help="patterns per class attacked (default: 3)")
    parser.add_argument("--top-k", type=int, default=1, help="pairs per example counted (without --stability)")
    parser.add_argument("--n-steps", type=int, default=8, help="AttAttr integration steps (default: 8)")
    parser.add_argument("--examples", default="other", choices=["all", "other", "same"],
                        help="attack the validation sentences of another class than the pattern's (default), all, "
                             "or the same class")
    parser.add_argument("--seed", type=int, default=0, help="seed of the training samples (default: 0)")
    parser.add_argument("--classifier", default="finetuned", choices=["finetuned", "probe"],
                        help="the fine-tuned MiniLM (default) or the frozen MiniLM with the linear probe")
    parser.add_argument("--stability", action="store_true",
                        help="four disjoint samples: choose the counting rule on A/B, measure it on C/D")
    parser.add_argument("--samples", type=int, default=4, help="disjoint samples (--stability; 4 to 12)")
    parser.add_argument("--keep", type=int, default=10, help="pairs stored per example (--stability; default 10)")
    parser.add_argument("--top-ks", default="1,3,5,10", help="pairs-per-example candidates (--stability)")
    parser.add_argument("--overlap-top", type=int, default=10,
                        help="patterns per class compared between two samples (default: 10)")
    parser.add_argument("--pairs-dir", default=None, help="save/reuse each sample's attributed pairs here (JSON)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    parser.add_argument("--csv", default=None, help="also write the attack table to this CSV file")
    parser.add_argument("--md", default=None, help="also write the printed report to this markdown file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")


    import pandas as pd

    from at2_lens.attattr.triggers import (
        ExamplePairs,
        attributed_pairs,
        count_patterns,
        pattern_overlap,
        trigger_attack,
    )
    from at2_lens.files import atomic_write_text
    from at2_lens.models.classifier import load_minilm_sst2, load_sst2
    from at2_lens.models.finetuned import load_minilm_sst2_finetuned

    top_ks = [int(x) for x in args.top_ks.split(",")] if args.stability else [args.top_k]
    keep = max([args.keep, *top_ks]) if args.stability else args.top_k
    train_texts, train_labels = load_sst2("train", data_dir=args.data_dir)
    pool = [i for i, t in enumerate(train_texts) if len(t.split()) >= args.min_words]
    if args.stability and not 4 <= args.samples <= len(SETS):
        parser.error(f"--samples: expected 4 to {len(SETS)}, got {args.samples}")
    names = tuple(SETS[: args.samples]) if args.stability else SETS[:1]
    # Set-based sampling from this large pool: the first samples are the same whatever the number of samples (the
    # saved phrase indices are compared before a saved sample is reused).
    sample = random.Random(args.seed).sample(pool, min(len(names) * args.n_train, len(pool)))
    sets = {name: sorted(sample[k * args.n_train:(k + 1) * args.n_train]) for k, name in enumerate(names)}
    eval_texts, eval_labels = load_sst2("validation", limit=args.n_eval or None, data_dir=args.data_dir)
    layers = [int(x) for x in args.layers.split(",")]
    settings = {"classifier": args.classifier, "seed": args.seed, "n_train": args.n_train, "layers": layers,
                "n_steps": args.n_steps, "keep": keep, "min_words": args.min_words}

    # Saved samples are read and checked before the model loads: a directory of other settings fails at once.
    pairs: dict[str, list[ExamplePairs]] = {}
    paths = {name: Path(args.pairs_dir) / f"pairs_{name}.json" if args.pairs_dir else None for name in sets}
    for name, path in paths.items():
        if path is not None and path.exists():
            saved = json.loads(path.read_text())
            if saved.get("settings") != settings or saved.get("phrases") != sets[name]:
                parser.error(f"--pairs-dir: {path} was mined with other settings or phrases "
                             f"({saved.get('settings')}, not {settings}); use another directory")
            pairs[name] = [ExamplePairs.from_dict(d) for d in saved["examples"]]
            print(f"sample {name}: {len(pairs[name])} examples read from {path}", flush=True)
    clf = load_minilm_sst2_finetuned() if args.classifier == "finetuned" else load_minilm_sst2()
    tokenizer = clf.backend.tokenizer
    t0 = time.perf_counter()
    for name, pick in sets.items():
        if name in pairs:
            continue
        pairs[name] = attributed_pairs(clf, [train_texts[i] for i in pick], [train_labels[i] for i in pick],
                                       layers=layers, top_k=keep, n_steps=args.n_steps)
        path = paths[name]
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps({"settings": settings, "phrases": pick,
                                                "examples": [e.to_dict() for e in pairs[name]]}))
        print(f"sample {name} ({len(pick)} phrases) attributed after {time.perf_counter() - t0:.0f} s", flush=True)
    t1 = time.perf_counter()

    report: list[str] = []
    top_k, rank_by, pool = args.top_k, "count", "pair"
    extra, left, right = False, "C", "D"
    if args.stability:
        def overlap(a: list[ExamplePairs], b: list[ExamplePairs], k: int, rank: str, how: str) -> float:
            pa = count_patterns(a, tokenizer, top_k=k, n_patterns=args.overlap_top, rank_by=rank, pool=how)
            pb = count_patterns(b, tokenizer, top_k=k, n_patterns=args.overlap_top, rank_by=rank, pool=how)
            return (pattern_overlap(pa, pb, by=how) + pattern_overlap(pb, pa, by=how)) / 2

        def union(keys: str) -> list[ExamplePairs]:
            return [e for name in keys for e in pairs[name]]

        extra = len(names) > 4
        left, right = "".join(names[2::2]), "".join(names[3::2])
        grid = []
        for how in ("pair", "key"):
            for k in top_ks:
                for rank in ("count", "score"):
                    row = {"pool": how, "top_k": k, "rank_by": rank,
                           "A/B": overlap(pairs["A"], pairs["B"], k, rank, how),
                           "C/D": overlap(pairs["C"], pairs["D"], k, rank, how)}
                    if extra:
                        row["more"] = overlap(union(left), union(right), k, rank, how)
                    grid.append(row)
        best = max(grid, key=lambda r: (r["A/B"], r["pool"] == "pair", -r["top_k"], r["rank_by"] == "count"))
        top_k, rank_by, pool = best["top_k"], best["rank_by"], best["pool"]
        report.append(f"Stability: share of one sample's top {args.overlap_top} patterns per class that the other "
                      f"sample also ranks in its top {args.overlap_top} (mean of both directions; key-pooled "
                      f"patterns: the same key tokens), {args.n_train} phrases per sample. The rule is chosen on "
                      "A/B; the other columns are the measurement.\n")
        more = f" {'+'.join(left)} / {'+'.join(right)} ({len(left) * args.n_train} each) |" if extra else ""
        report.append(f"| patterns | pairs per example | ranked by | A/B (selection) | C/D (measurement) |{more}")
        report.append("|---|---:|---|---:|---:|" + ("---:|" if extra else ""))
        for r in grid:
            mark = " **(chosen)**" if r is best else ""
            tail = f" {r['more'] * 100:.0f} % |" if extra else ""
            report.append(f"| {r['pool']} | {r['top_k']} | {r['rank_by']}{mark} | {r['A/B'] * 100:.0f} % | "
                          f"{r['C/D'] * 100:.0f} % |{tail}")
        report.append(f"\nChosen rule by phrases per sample ({pool} patterns, top {top_k} pairs, ranked by "
                      f"{rank_by}):\n")
        report.append("| phrases per sample | samples compared | overlap |")
        report.append("|---:|---|---:|")
        n = 32
        while n < args.n_train:
            report.append(f"| {n} | C/D (first {n}) | "
                          f"{overlap(pairs['C'][:n], pairs['D'][:n], top_k, rank_by, pool) * 100:.0f} % |")
            n *= 2
        report.append(f"| {args.n_train} | C/D | {overlap(pairs['C'], pairs['D'], top_k, rank_by, pool) * 100:.0f} % |")
        if extra:
            report.append(f"| {len(left) * args.n_train} | {'+'.join(left)} / {'+'.join(right)} | "
                          f"{overlap(union(left), union(right), top_k, rank_by, pool) * 100:.0f} % |")
    # The attack: the chosen rule's patterns mined on all samples and, with --stability, on each of the two disjoint
    # halves measured last (do triggers mined apart attack alike?).
    groups = {"+".join(names): list(names)}
    if args.stability:
        groups.update({"+".join(left): list(left), "+".join(right): list(right)})
    frames = []
    for mined_on, members in groups.items():
        patterns = count_patterns([e for name in members for e in pairs[name]], tokenizer, top_k=top_k,
                                  n_patterns=args.n_patterns, rank_by=rank_by, pool=pool)
        frames.append(trigger_attack(clf, patterns, eval_texts, eval_labels, examples=args.examples)
                      .assign(mined_on=mined_on))
    df = pd.concat(frames, ignore_index=True)
    t2 = time.perf_counter()
    header = (f"{clf.backend.describe()} ({args.classifier}): {len(names)} × {args.n_train} training phrases "
              f"attributed (layers {args.layers}, {args.n_steps} steps) in {t1 - t0:.0f} s; patterns: {pool}, top "
              f"{top_k} pairs per example, ranked by {rank_by}; attack on {len(eval_texts)} validation sentences "
              f"({args.examples} class) in {t2 - t1:.0f} s\n")
    report.insert(0, header)
    report.append("\n| mined on | pattern (key → query) | class | mined | n | acc. before | acc. after | drop "
                  "| flipped |")
    report.append("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in df.itertuples():
        report.append(f"| {r.mined_on} | {r.pattern} | {clf.labels[r.source_class]} | {r.mined_count} | "
                      f"{r.n_examples} | {r.accuracy_before * 100:.1f} | {r.accuracy_after * 100:.1f} | "
                      f"{r.drop * 100:+.1f} | {r.flipped * 100:.1f} |")
    if args.stability:
        means = df.groupby("mined_on", sort=False)[["drop", "flipped"]].mean()
        report.append("\nMean over each set's patterns: " + "; ".join(
            f"{name}: drop {r['drop'] * 100:+.1f} points, flipped {r['flipped'] * 100:.1f} %"
            for name, r in means.iterrows()))
    text = "\n".join(report)
    print(text)
    if args.csv:
        atomic_write_text(args.csv, df.to_csv(index=False))
    if args.md:
        atomic_write_text(args.md, text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
