"""Train the SST-2 sentiment head shipped as ``at2_lens/classifier_heads/minilm_sst2.safetensors``.

The frozen all-MiniLM-L6-v2 encoder (a TransformerLens model) embeds a seeded random subset of
``data/sst2/train.tsv`` (mean pooling of the final hidden states over real tokens); a scikit-learn
``LogisticRegression`` is fitted on standardised embeddings, with ``C`` (and, with ``--pooling auto``, the
pooling) chosen on a held-out part of that subset, then refitted on the whole subset. The standardisation is folded
into the linear head, so the shipped head is just ``weight [2, 384]`` and ``bias [2]``. The validation accuracy on
``sst2/validation.tsv`` (872 sentences) is measured with the finished :class:`SentimentClassifier` and recorded in
the file, with the model fingerprint, the data, the seed and the command that reproduces it. No timings are
stored: rerunning the command with the same library versions and thread count writes a byte-identical file.

Measured here (TL 3.9 HookedEncoder, one CPU thread): embedding the 20,000 phrases takes about 3 minutes, the
14 held-out fits and the refit about 1 minute, the validation pass about 15 s.

Run from the project root::

    python scripts/train_minilm_sst2.py --out at2_lens/classifier_heads/minilm_sst2.safetensors
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import sys
import time
import warnings
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch

DEFAULT_CS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)


def seeded_order(n: int, seed: int) -> list[int]:
    """A permutation of ``range(n)`` fixed by ``seed`` alone (sha256-keyed, portable across library versions)."""
    return sorted(range(n), key=lambda i: hashlib.sha256(f"sst2-train:{seed}:{i}".encode()).digest())


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def constant_dims(x: np.ndarray) -> np.ndarray:
    """Feature columns that are constant up to float noise (std below 1e-4 of the median std).

    all-MiniLM-L6-v2's final LayerNorm leaves a few such dimensions; standardising them would blow float noise up
    into weights of order 1e7, making the head fragile to 1e-7 differences between backends.
    """
    sigma = x.std(axis=0)
    return np.flatnonzero(sigma < 1e-4 * np.median(sigma))


def fit_standardised(
    x: np.ndarray, y: np.ndarray, c: float, max_iter: int, drop: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Logistic regression on standardised ``x``; returns ``(weight [2, d], bias [2])`` for the *raw* features.

    The columns ``drop`` are left out (their weights are 0). The binary model's direction ``w`` becomes the two
    rows ``[-w/2, w/2]`` (softmax of those equals the sigmoid), and the standardisation ``(x - mu) / sigma`` is
    folded in.
    """
    from sklearn.linear_model import LogisticRegression

    keep = np.setdiff1d(np.arange(x.shape[1]), drop)
    xk = x[:, keep]
    mu = xk.mean(axis=0)
    sigma = xk.std(axis=0)
    clf = LogisticRegression(C=c, max_iter=max_iter)
    clf.fit((xk - mu) / sigma, y)
    w = np.zeros(x.shape[1])
    w[keep] = clf.coef_[0] / sigma
    b = float(clf.intercept_[0]) - float(w[keep] @ mu)
    weight = np.stack([-w / 2, w / 2])
    bias = np.array([-b / 2, b / 2])
    return weight, bias


def accuracy_of(weight: np.ndarray, bias: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    return float(((x @ weight.T + bias).argmax(axis=1) == y).mean())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from at2_lens.models.classifier import MINILM_SST2_HEAD

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=MINILM_SST2_HEAD, help="where to write the head (safetensors)")
    p.add_argument("--backend", choices=("auto", "hooked", "bridge"), default="auto", help="TransformerLens class")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="directory holding sst2/ (default: the shipped data, at2_lens.data)")
    p.add_argument("--n-train", type=int, default=20000, help="training phrases drawn from sst2/train.tsv")
    p.add_argument("--holdout", type=float, default=0.2, help="fraction of them held out to choose C and pooling")
    p.add_argument("--seed", type=int, default=0, help="seed of the subset and the held-out split")
    p.add_argument("--pooling", choices=("auto", "mean", "mean_l2"), default="auto",
                   help="mean pooling, L2-normalised or not ('auto': the better on the held-out part)")
    p.add_argument("--C", dest="cs", default=",".join(f"{c:g}" for c in DEFAULT_CS),
                   help="comma-separated inverse regularisation strengths to try")
    p.add_argument("--max-iter", type=int, default=5000, help="LogisticRegression max_iter")
    p.add_argument("--batch-size", type=int, default=128, help="texts per forward pass while embedding")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    args.cs = [float(c) for c in args.cs.split(",") if c.strip()]
    if not args.cs or any(c <= 0 for c in args.cs):
        p.error("--C: expected positive numbers")
    if args.n_train < 100 or not 0.05 <= args.holdout <= 0.5:
        p.error("--n-train must be >= 100 and --holdout in [0.05, 0.5]")
    return args


def reproduce_command(args: argparse.Namespace) -> str:
    """The command line that rebuilds the same file (paths relative to the project root)."""
    out = args.out
    with contextlib.suppress(ValueError):  # another drive on Windows: keep the path as given
        out = Path(os.path.relpath(Path(args.out).resolve(), Path(__file__).resolve().parents[1]))
    parts = [
        "PYTHONPATH=. python scripts/train_minilm_sst2.py",
        f"--backend {args.backend}",
        f"--n-train {args.n_train}",
        f"--holdout {args.holdout:g}",
        f"--seed {args.seed}",
        f"--pooling {args.pooling}",
        "--C " + ",".join(f"{c:g}" for c in args.cs),
        f"--max-iter {args.max_iter}",
        f"--batch-size {args.batch_size}",
        f"--threads {args.threads}",
        f"--out {out.as_posix()}",
    ]
    return " ".join(parts)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    from at2_lens.backends import get_backend
    from at2_lens.models import load_model
    from at2_lens.models.classifier import (
        SST2_LABELS,
        ClassifierHead,
        SentimentClassifier,
        embed_texts,
        final_hidden_hook,
        load_sst2,
        minilm_fingerprint,
        write_head,
    )

    data_dir = args.data_dir
    t_start = time.perf_counter()
    train_texts, train_labels = load_sst2("train", data_dir=data_dir)
    val_texts, val_labels = load_sst2("validation", data_dir=data_dir)
    if args.n_train > len(train_texts):
        raise SystemExit(f"--n-train {args.n_train} exceeds the {len(train_texts)} training phrases")
    chosen = seeded_order(len(train_texts), args.seed)[: args.n_train]
    n_hold = round(args.holdout * args.n_train)
    texts = [train_texts[i] for i in chosen]
    y = np.array([train_labels[i] for i in chosen])

    model = load_model("minilm", backend=args.backend)
    backend = get_backend(model)
    print(f"model: {backend.describe()}; final hidden state at {final_hidden_hook(backend)}", flush=True)

    t0 = time.perf_counter()
    emb = embed_texts(model, texts, pooling="mean", batch_size=args.batch_size)
    embed_s = time.perf_counter() - t0
    print(f"embedded {len(texts)} training phrases in {embed_s:.1f} s", flush=True)

    features = {
        "mean": emb.double().numpy(),
        "mean_l2": torch.nn.functional.normalize(emb, dim=-1).double().numpy(),
    }
    poolings = ["mean", "mean_l2"] if args.pooling == "auto" else [args.pooling]
    t0 = time.perf_counter()
    selection: list[dict[str, Any]] = []
    dropped = {pooling: constant_dims(features[pooling]) for pooling in poolings}
    for pooling in poolings:
        x = features[pooling]
        for c in args.cs:
            w, b = fit_standardised(x[n_hold:], y[n_hold:], c, args.max_iter, dropped[pooling])
            acc = accuracy_of(w, b, x[:n_hold], y[:n_hold])
            selection.append({"pooling": pooling, "C": c, "holdout_accuracy": round(acc, 6)})
            print(f"  pooling={pooling:8s} C={c:<6g} held-out accuracy {acc:.4f}", flush=True)
    # Best held-out accuracy; ties go to the earlier entry (plain mean pooling, smaller C: stronger regularisation).
    best = max(selection, key=lambda r: r["holdout_accuracy"])
    weight, bias = fit_standardised(features[best["pooling"]], y, best["C"], args.max_iter, dropped[best["pooling"]])
    fit_s = time.perf_counter() - t0
    train_acc = accuracy_of(weight, bias, features[best["pooling"]], y)
    print(f"chose pooling={best['pooling']} C={best['C']:g}; refitted on {len(y)} phrases ({fit_s:.1f} s)", flush=True)

    meta: dict[str, Any] = {
        "labels": list(SST2_LABELS),
        "pooling": best["pooling"],
        "pooling_description": "mean of the final hidden states over attention_mask == 1 tokens"
        + (", then L2-normalised" if best["pooling"] == "mean_l2" else ""),
        "hook": {
            "hooked_encoder": "blocks.{L-1}.hook_normalized_resid_post",
            "bridge": "blocks.{L-1}.hook_resid_post",
            "equals": "transformers BertModel last_hidden_state",
        },
        "model": minilm_fingerprint(model),
        "training": {
            "data": "sst2/train.tsv",
            "data_sha256": file_sha256(Path(data_dir) / "sst2" / "train.tsv"),
            "rows_in_file": len(train_texts),
            "rows_used": args.n_train,
            "holdout_rows": n_hold,
            "seed": args.seed,
            "subset": "first n-train indices sorted by sha256('sst2-train:{seed}:{index}'); the first holdout_rows "
            "of them are the held-out part",
            "estimator": "sklearn LogisticRegression(lbfgs, L2) on standardised embeddings, folded into the head; "
            "dimensions constant up to float noise get weight 0",
            "C": best["C"],
            "constant_dims_dropped": [int(i) for i in dropped[best["pooling"]]],
            "selection": selection,
            "train_accuracy": round(train_acc, 6),
            "backend": backend.kind,
            "versions": {
                pkg: version(pkg) for pkg in ("torch", "transformers", "transformer-lens", "scikit-learn")
            },
        },
        "command": reproduce_command(args),
    }
    head = ClassifierHead(torch.from_numpy(weight).float(), torch.from_numpy(bias).float(), meta)
    classifier = SentimentClassifier(model, head)
    t0 = time.perf_counter()
    val_acc = classifier.accuracy(val_texts, val_labels)
    print(f"validation accuracy {val_acc:.4f} on {len(val_texts)} sentences ({time.perf_counter() - t0:.1f} s)")
    meta["validation"] = {
        "data": "sst2/validation.tsv",
        "data_sha256": file_sha256(Path(data_dir) / "sst2" / "validation.tsv"),
        "rows": len(val_texts),
        "accuracy": round(val_acc, 6),
    }
    meta["validation_accuracy"] = round(val_acc, 6)
    path = write_head(args.out, ClassifierHead(head.weight, head.bias, meta))
    print(f"wrote {path} (total {time.perf_counter() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
