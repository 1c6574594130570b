"""Merge ``at2-lens heads`` outputs run in parts (``--methods`` subsets, random draws split by ``--seed``) into one
sweep CSV, one stability CSV, one PNG and a markdown summary.

The parts must share the importance sample (same ``--n-importance`` and ``--seed`` for the scored methods); random
draws from runs with ``--seed s --random-draws n`` are the draws of seeds ``s .. s+n-1`` and are renumbered by
seed, so the merge equals one run with every method (the mask cache only skips repeated evaluations). Usage::

    python scripts/heads_study_report.py --sweeps a.csv b.csv --random-seeds 0 3 --stability sa.csv sb.csv \\
        --out benchmarks/results/minilm_sst2_finetuned_head_pruning --title "..."
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sweeps", nargs="+", required=True, help="sweep CSVs written by at2-lens heads --csv")
    p.add_argument("--random-seeds", nargs="*", type=int, default=None,
                   help="the --seed of each sweep CSV (draw d of a run with seed s is random seed s + d)")
    p.add_argument("--stability", nargs="*", default=[], help="stability CSVs (at2-lens heads --stability-csv)")
    p.add_argument("--out", required=True, help="output prefix: writes PREFIX.csv, PREFIX_stability.csv, PREFIX.png")
    p.add_argument("--title", default="head pruning, 872 SST-2 validation sentences")
    args = p.parse_args()

    import pandas as pd

    from at2_lens.attattr.head_importance import plot_pruning
    from at2_lens.cli.heads import markdown_stability, markdown_sweep
    from at2_lens.files import atomic_write_text

    seeds = args.random_seeds or [0] * len(args.sweeps)
    if len(seeds) != len(args.sweeps):
        p.error("--random-seeds: give one seed per sweep CSV")
    frames = []
    for path, seed in zip(args.sweeps, seeds, strict=True):
        df = pd.read_csv(path)
        rnd = df["method"] == "random"
        df.loc[rnd, "draw"] = df.loc[rnd, "draw"] + seed
        frames.append(df)
    df = pd.concat(frames, ignore_index=True)
    order = [m for m in ("attattr", "attention", "taylor", "random") if m in set(df["method"])]
    df["method"] = pd.Categorical(df["method"], order, ordered=True)
    df = df.sort_values(["method", "draw", "fraction"], kind="stable").reset_index(drop=True)
    df["method"] = df["method"].astype(str)
    out = Path(args.out)
    atomic_write_text(out.with_suffix(".csv"), df.to_csv(index=False))
    plot_pruning(df, str(out.with_suffix(".png")), title=args.title)
    print(markdown_sweep(df))
    if args.stability:
        st = pd.concat([pd.read_csv(s) for s in args.stability], ignore_index=True)
        atomic_write_text(Path(f"{out}_stability.csv"), st.to_csv(index=False))
        print()
        print(markdown_stability(st))
    rnd = df[df["method"] == "random"]
    if len(rnd):
        summary = rnd.groupby("fraction")["accuracy"].agg(["mean", "std", "min", "max", "count"])
        print("\nrandom draws (accuracy):")
        print(summary.to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
