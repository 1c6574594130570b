"""How many ablations does AT2Refined need, and how strongly should it lean on AT2? Measured on the training store.

    python scripts/at2_refined_study.py [--store data/at2_smollm2/store]

The store's tasks are split as in ``scripts/at2_feature_ceiling.py`` (one in five for validation, by a hash of the
index; the benchmark's held-out SQuAD tasks are never used). An estimator is trained and calibrated on the training
part; for each task AT2's calibrated scores are the prior, the first k of its 32 ablations are what AT2Refined would
run, and LDS is scored on masks 16-31. The shrinkage is chosen on training tasks (every second one), then the
validation tasks are scored once with it; ContextCite's LASSO on the same k ablations is the reference.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
STORE = ROOT / "data" / "at2_smollm2" / "store"
SHRINKAGES = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
KS = (4, 8, 16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default=str(STORE))
    args = ap.parse_args()
    torch.set_num_threads(1)
    from at2_feature_ceiling import is_validation, spearman

    from at2_lens.at2.refined import fit_shrunk_surrogate
    from at2_lens.at2.store import AblationStore
    from at2_lens.at2.training import calibrate, train_estimator
    from at2_lens.baselines import fit_lasso_surrogate

    examples = AblationStore(args.store).load()
    train = [e for e in examples if not is_validation(e.index)]
    val = [e for e in examples if is_validation(e.index)]
    est, _ = train_estimator(train, steps=1000, non_negative=True, progress=False, num_threads=1)
    est = calibrate(est, train)

    def lds(ex: object, scores: torch.Tensor) -> float:
        held = ex.masks[16:].double()  # type: ignore[attr-defined]
        return spearman((held @ scores.double()).numpy(), ex.outputs[16:].numpy())  # type: ignore[attr-defined]

    def refined(ex: object, k: int, shrinkage: float, prior_scale: float | None) -> float:
        prior = est.calibrated(est.score(ex.features))  # type: ignore[attr-defined]
        w, _, _ = fit_shrunk_surrogate(ex.masks[:k], ex.outputs[:k], prior, shrinkage, prior_scale)  # type: ignore[attr-defined]
        return lds(ex, w)

    def mean(xs: list[float]) -> float:
        return float(np.nanmean(xs))

    print(f"{len(train)} training / {len(val)} validation tasks; LDS on masks 16-31 of each task\n")
    print("| shrinkage | scale | " + " | ".join(f"k={k} (train)" for k in KS) + " |")
    print("|---:|---|" + "---:|" * len(KS))
    best: dict[tuple[int, str], tuple[float, float]] = {}
    for prior_scale, label in ((None, "fitted per task"), (1.0, "pulled to calibration")):
        for shrinkage in SHRINKAGES:
            row = []
            for k in KS:
                score = mean([refined(e, k, shrinkage, prior_scale) for e in train[::2]])
                row.append(score)
                if score > best.get((k, label), (-2.0, 0.0))[0]:
                    best[(k, label)] = (score, shrinkage)
            print(f"| {shrinkage} | {label} | " + " | ".join(f"{r:.3f}" for r in row) + " |", flush=True)
    at2 = mean([lds(e, est.score(e.features)) for e in val])
    print(f"\nvalidation ({len(val)} tasks): AT2 alone {at2:.3f}")
    print("| k | AT2Refined (shrinkage 0.5, pulled to calibration) | best on train: shrinkage | its validation LDS | "
          "LASSO on the same k |")
    print("|---:|---:|---:|---:|---:|")
    for k in KS:
        default = mean([refined(e, k, 0.5, 1.0) for e in val])
        _, s_best = best[(k, "pulled to calibration")]
        chosen = mean([refined(e, k, s_best, 1.0) for e in val])
        lasso = mean([lds(e, fit_lasso_surrogate(e.masks[:k], e.outputs[:k])[0]) for e in val])
        print(f"| {k} | {default:.3f} | {s_best} | {chosen:.3f} | {lasso:.3f} |", flush=True)


if __name__ == "__main__":
    main()
