"""Ceiling study of AT2 feature families: what can a linear estimator over each family reach?

    python scripts/at2_feature_ceiling.py --data DIR [--out benchmarks/results/at2_feature_ceiling.md]

``DIR`` holds the files written by ``scripts/collect_feature_study.py`` (one per training task: several feature
families read in one forward pass, 32 mask-mode ablations). For each family it reports

- the per-task oracle: non-negative head weights fitted (NNLS) to each task's first 16 ablations alone, scored by
  LDS on those same 16 (in-sample) and on the task's other 16 (held-out masks of the same task);
- the LDS of one estimator trained across tasks (the library's trainer, non-negative weights as shipped) on the
  training part of the tasks and scored on a validation part (one task in five, chosen by a hash of its index).
  The benchmark's held-out SQuAD tasks are never used here.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from scipy.optimize import nnls
from scipy.stats import spearmanr

VALIDATION_MODULUS = 5


def is_validation(index: int) -> bool:
    """The validation part of the study tasks: ``sha256("at2-study-<index>") % 5 == 0``."""
    return int(hashlib.sha256(f"at2-study-{index}".encode()).hexdigest(), 16) % VALIDATION_MODULUS == 0


def load_study(data: Path) -> list[dict]:
    """Every task file of the study directory, in index order."""
    tasks = []
    for path in sorted(data.glob("[0-9]*.safetensors")):
        with safe_open(str(path), "pt") as fh:
            meta = json.loads(fh.metadata()["meta"])
        tensors = load_file(str(path))
        tasks.append({"meta": meta, **tensors})
    return tasks


def family(task: dict, name: str) -> torch.Tensor:
    """Features ``[source, layer, head]`` of one family; ``+``-joined names concatenate families along layers;
    ``mean.<w>`` is ``sum.<w>`` divided by the source's token count."""
    if "+" in name:
        return torch.cat([family(task, part) for part in name.split("+")], dim=1)
    if name.startswith("mean."):
        lengths = task["source_lengths"].float().clamp_min(1)
        return family(task, "sum." + name.split(".", 1)[1]) / lengths[:, None, None]
    return task[f"feat.{name}"].float()


def design(task: dict, name: str) -> tuple[np.ndarray, np.ndarray]:
    """``Ψ[m] = Σ_s (2 m_s − 1) φ[s]`` per mask, and the outputs."""
    phi = family(task, name)
    signs = task["masks"].float() * 2 - 1
    return (signs @ phi.reshape(phi.shape[0], -1)).numpy().astype(np.float64), task["outputs"].numpy().astype(
        np.float64
    )


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def oracle(task: dict, name: str, n_fit: int = 16) -> tuple[float, float]:
    """Per-task NNLS fit on the first ``n_fit`` masks: (LDS in-sample, LDS on the remaining masks)."""
    x, y = design(task, name)
    xf, yf = x[:n_fit], y[:n_fit]
    scale = np.abs(xf).max() or 1.0
    w, _ = nnls((xf - xf.mean(0)) / scale, yf - yf.mean(), maxiter=2000)
    pred = x @ w
    return spearman(pred[:n_fit], yf), spearman(pred[n_fit:], y[n_fit:])


def to_examples(tasks: list[dict], name: str) -> list:
    from at2_lens.at2.store import AblationExample

    return [
        AblationExample(
            t["meta"]["index"], family(t, name).contiguous(), t["masks"].bool(), t["outputs"].float(),
            float(t["full_output"][0]), {},
        )
        for t in tasks
    ]


def cross_task(tasks: list[dict], name: str, *, non_negative: bool = True, steps: int = 1000) -> dict[str, float]:
    """Train on the training part, score mean LDS on the validation part (overall and per task kind)."""
    from at2_lens.at2.training import train_estimator

    train = [t for t in tasks if not is_validation(t["meta"]["index"])]
    val = [t for t in tasks if is_validation(t["meta"]["index"])]
    est, _ = train_estimator(
        to_examples(train, name), steps=steps, non_negative=non_negative, progress=False, num_threads=1
    )
    w = est.weights.reshape(-1).double().numpy()
    out: dict[str, list[float]] = {"all": []}
    for t in val:
        x, y = design(t, name)
        score = spearman(x @ w, y)
        if not np.isnan(score):
            out["all"].append(score)
            out.setdefault(t["meta"]["kind"], []).append(score)
    return {k: float(np.mean(v)) for k, v in out.items()}


FAMILIES = [
    "sum.uniform", "mean.uniform", "max.uniform", "sum.surprisal", "sum.entropy",
    "vsum.uniform", "vsum.surprisal", "vsum.entropy", "sum_renorm.uniform", "sum_renorm.surprisal",
    "sum_renorm.entropy",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--signed", action="store_true", help="also train unconstrained (signed) weights")
    ap.add_argument("--out", default=None, help="write the markdown table here")
    args = ap.parse_args()
    tasks = load_study(Path(args.data))
    kinds = sorted({t["meta"]["kind"] for t in tasks})
    counts = {k: sum(t["meta"]["kind"] == k for t in tasks) for k in kinds}
    n_val = sum(is_validation(t["meta"]["index"]) for t in tasks)
    head = (
        f"{len(tasks)} tasks ({', '.join(f'{k}: {counts[k]}' for k in kinds)}), "
        f"{len(tasks) - n_val} train / {n_val} validation, 32 masks each\n\n"
        "| family | oracle LDS in-sample | oracle LDS held-out masks | trained LDS (validation) | "
        + " | ".join(f"trained ({k})" for k in kinds)
        + " |\n|---|---:|---:|---:|" + "---:|" * len(kinds) + "\n"
    )
    rows = []
    variants = [(f, True) for f in args.families.split(",")]
    if args.signed:
        variants += [(f, False) for f in args.families.split(",")]
    for name, nonneg in variants:
        ins, hos = zip(*(oracle(t, name) for t in tasks), strict=True)
        ct = cross_task(tasks, name, non_negative=nonneg)
        label = name if nonneg else f"{name} (signed)"
        row = (
            f"| {label} | {np.nanmean(ins):.3f} | {np.nanmean(hos):.3f} | {ct['all']:.3f} | "
            + " | ".join(f"{ct.get(k, float('nan')):.3f}" for k in kinds)
            + " |"
        )
        print(row, flush=True)
        rows.append(row)
    table = head + "\n".join(rows) + "\n"
    print(table)
    if args.out:
        Path(args.out).write_text(table)


if __name__ == "__main__":
    main()
