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
    if name.startswith(("sq:", "sqrt:", "share:")):
        how, base = name.split(":", 1)
        phi = family(task, base)
        if how == "share":  # each head's attention to the source as a share of its attention to all sources
            return phi / phi.sum(dim=0, keepdim=True).clamp_min(1e-12)
        return phi.square() if how == "sq" else phi.clamp_min(0).sqrt()
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


def _padded(tasks: list[dict], name: str) -> tuple[torch.Tensor, ...]:
    """Per-source inputs ``[task, source, feature]`` (features, their share over sources, log token count), signs
    ``[task, mask, source]`` (0 for padding sources), centred unit-norm outputs ``[task, mask]``."""
    s_max = max(t["masks"].shape[1] for t in tasks)
    m = tasks[0]["masks"].shape[0]
    feats = []
    for t in tasks:
        phi = family(t, name).reshape(t["masks"].shape[1], -1)
        share = phi / phi.sum(dim=0, keepdim=True).clamp_min(1e-12)
        feats.append(torch.cat([phi, share, t["source_lengths"].float().log1p()[:, None]], dim=1))
    x = torch.zeros(len(tasks), s_max, feats[0].shape[1])
    signs = torch.zeros(len(tasks), m, s_max)
    y = torch.zeros(len(tasks), m)
    for i, (t, f) in enumerate(zip(tasks, feats, strict=True)):
        x[i, : f.shape[0]] = f
        signs[i, :, : f.shape[0]] = t["masks"].float() * 2 - 1
        yc = t["outputs"] - t["outputs"].mean()
        y[i] = yc / yc.norm().clamp_min(1e-12)
    return x, signs, y


def mlp_cross_task(tasks: list[dict], name: str, *, hidden: int = 64, steps: int = 1500, seed: int = 0) -> dict:
    """A small per-source MLP scorer trained with AT2's loss (minus Pearson over each task's masks)."""
    torch.manual_seed(seed)
    train = [t for t in tasks if not is_validation(t["meta"]["index"])]
    val = [t for t in tasks if is_validation(t["meta"]["index"])]
    x, signs, y = _padded(train, name)
    mu, sd = x.reshape(-1, x.shape[-1]).mean(0), x.reshape(-1, x.shape[-1]).std(0).clamp_min(1e-6)
    net = torch.nn.Sequential(
        torch.nn.Linear(x.shape[-1], hidden), torch.nn.GELU(), torch.nn.Dropout(0.1), torch.nn.Linear(hidden, 1)
    )
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (128,), generator=gen)
        score = net((x[idx] - mu) / sd)[..., 0]
        pred = torch.einsum("bms,bs->bm", signs[idx], score)
        pred = pred - pred.mean(1, keepdim=True)
        loss = -((pred * y[idx]).sum(1) / pred.norm(dim=1).clamp_min(1e-12)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    xv, sv, _ = _padded(val, name)
    with torch.no_grad():
        pv = torch.einsum("bms,bs->bm", sv, net((xv - mu) / sd)[..., 0]).numpy()
    out: dict[str, list[float]] = {"all": []}
    for i, t in enumerate(val):
        score = spearman(pv[i], t["outputs"].numpy())
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
    ap.add_argument("--signed-families", default="", help="families to also train with unconstrained (signed) weights")
    ap.add_argument("--mlp", default="", help="comma-separated families to also score with a per-source MLP")
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
    variants += [(f, False) for f in filter(None, args.signed_families.split(","))]
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
    for name in filter(None, args.mlp.split(",")):
        ct = mlp_cross_task(tasks, name)
        row = f"| MLP over {name} (+ share, length) | – | – | {ct['all']:.3f} | " + " | ".join(
            f"{ct.get(k, float('nan')):.3f}" for k in kinds
        ) + " |"
        print(row, flush=True)
        rows.append(row)
    table = head + "\n".join(rows) + "\n"
    print(table)
    if args.out:
        Path(args.out).write_text(table)


if __name__ == "__main__":
    main()
