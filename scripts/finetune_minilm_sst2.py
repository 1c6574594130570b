"""Fine-tune all-MiniLM-L6-v2 on SST-2 with a parameter-efficient method; writes the shipped adapter
``at2_lens/classifier_heads/minilm_sst2_finetuned.safetensors`` (see ``at2_lens.models.finetuned``).

The classifier is the one ``SentimentClassifier`` computes: mean pooling of the final hidden states over real
tokens, then a linear head. Trained here on the plain Hugging Face ``BertModel`` (faster than through hooks) with

- ``--method lora`` (default): LoRA updates of the attention query and value weights of every layer (rank
  ``--rank``, scale ``--alpha / --rank``; ``at2_lens.models.finetuned.LoRALinear``) plus the head;
- ``--method bitfit``: every bias of the encoder (LayerNorm biases included) plus the head.

Data: the phrases of ``data/sst2/train.tsv`` in a seeded order (sha256-keyed, as ``train_minilm_sst2.py``); the
first ``--holdout`` of them are held out and are the only data used to choose anything (the checkpoint kept is
the one with the best held-out accuracy, evaluated every ``--eval-every`` steps). The SST-2 validation sentences
are only measured, after training, with the merged TransformerLens classifier (``load_minilm_sst2_finetuned``),
and recorded in the file together with the accuracy with every attention head masked.

Seeded throughout (order, batches, dropout, LoRA init); one CPU thread by default. ``--no-write`` runs a ceiling
measurement without writing the file. Run from the project root::

    PYTHONPATH=. python scripts/finetune_minilm_sst2.py --method lora
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
import warnings
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


def seeded_order(n: int, seed: int) -> list[int]:
    """A permutation of ``range(n)`` fixed by ``seed`` alone (sha256-keyed, portable across library versions)."""
    return sorted(range(n), key=lambda i: hashlib.sha256(f"sst2-train:{seed}:{i}".encode()).digest())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from at2_lens.models.finetuned import MINILM_SST2_FINETUNED

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--method", choices=("lora", "bitfit"), default="lora", help="what is trained (default: lora)")
    p.add_argument("--out", type=Path, default=MINILM_SST2_FINETUNED, help="where to write the adapter")
    p.add_argument("--data-dir", type=Path, default=Path("data"), help="directory holding sst2/ (default: data)")
    p.add_argument("--holdout", type=int, default=1000, help="training phrases held out for checkpoint choice")
    p.add_argument("--steps", type=int, default=400, help="optimiser steps (default: 400)")
    p.add_argument("--batch-size", type=int, default=32, help="phrases per step (default: 32)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 2e-3 lora, 3e-3 bitfit)")
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps, then linear decay to 0")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (default: 8)")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha; scale = alpha / rank (default: 16)")
    p.add_argument("--eval-every", type=int, default=100, help="held-out evaluation interval in steps")
    p.add_argument("--seed", type=int, default=0, help="seed of the order, batches, dropout and init")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    p.add_argument("--n-val", type=int, default=0, help="validation sentences measured at the end; 0 = all 872")
    p.add_argument("--no-write", action="store_true", help="measure only; do not write the adapter")
    args = p.parse_args(argv)
    if args.lr is None:
        args.lr = 2e-3 if args.method == "lora" else 3e-3
    if args.steps < 1 or args.batch_size < 1 or args.holdout < 100 or args.eval_every < 1:
        p.error("--steps, --batch-size, --eval-every must be >= 1 and --holdout >= 100")
    return args


def batches(order: list[int], lengths: list[int], batch_size: int, gen: torch.Generator) -> list[list[int]]:
    """Shuffled batches of similar length: shuffle, sort chunks of 50 batches by length, split, shuffle batches."""
    perm = [order[i] for i in torch.randperm(len(order), generator=gen).tolist()]
    chunk = batch_size * 50
    out: list[list[int]] = []
    for s in range(0, len(perm), chunk):
        part = sorted(perm[s : s + chunk], key=lambda i: lengths[i])
        out.extend(part[j : j + batch_size] for j in range(0, len(part), batch_size))
    return [out[i] for i in torch.randperm(len(out), generator=gen).tolist()]


def mean_pooled(encoder: nn.Module, enc: dict[str, Tensor]) -> Tensor:
    hidden = encoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    m = enc["attention_mask"].to(hidden.dtype)[..., None]
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


@torch.no_grad()
def accuracy(
    encoder: nn.Module, head: nn.Linear, tok: Any, texts: list[str], labels: list[int], bs: int = 128
) -> float:
    was = encoder.training
    encoder.eval()
    correct = 0
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths together: little padding
    for s in range(0, len(texts), bs):
        idx = order[s : s + bs]
        enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=256, return_tensors="pt")
        pred = head(mean_pooled(encoder, enc)).argmax(-1)
        correct += int((pred == torch.tensor([labels[i] for i in idx])).sum())
    encoder.train(was)
    return correct / len(texts)


def reproduce_command(args: argparse.Namespace) -> str:
    out = Path(os.path.relpath(Path(args.out).resolve(), Path(__file__).resolve().parents[1])).as_posix()
    return (f"PYTHONPATH=. python scripts/finetune_minilm_sst2.py --method {args.method} --holdout {args.holdout} "
            f"--steps {args.steps} --batch-size {args.batch_size} --lr {args.lr:g} --warmup {args.warmup} "
            f"--rank {args.rank} --alpha {args.alpha:g} --eval-every {args.eval_every} --seed {args.seed} "
            f"--threads {args.threads} --out {out}")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    from transformers import AutoTokenizer, BertModel

    from at2_lens.attattr.head_importance import pruning_sweep
    from at2_lens.models._cache import sha256_file
    from at2_lens.models.classifier import SST2_LABELS, ClassifierHead, load_sst2, minilm_fingerprint
    from at2_lens.models.embedded import minilm_dir
    from at2_lens.models.finetuned import ClassifierAdapter, LoRALinear, load_minilm_sst2_finetuned, write_adapter

    t_start = time.perf_counter()
    train_texts, train_labels = load_sst2("train", data_dir=args.data_dir)
    val_texts, val_labels = load_sst2("validation", limit=args.n_val or None)
    order = seeded_order(len(train_texts), args.seed)
    hold, fit = order[: args.holdout], order[args.holdout :]
    hold_texts, hold_labels = [train_texts[i] for i in hold], [train_labels[i] for i in hold]

    directory = minilm_dir()
    tok = AutoTokenizer.from_pretrained(str(directory))
    encoder = BertModel.from_pretrained(str(directory), attn_implementation="eager", add_pooling_layer=False)
    base = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    for p in encoder.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(args.seed)
    lora: dict[str, LoRALinear] = {}
    if args.method == "lora":
        for i, layer in enumerate(encoder.encoder.layer):
            for name in ("query", "value"):
                wrapped = LoRALinear(getattr(layer.attention.self, name), args.rank, args.alpha, generator=gen)
                setattr(layer.attention.self, name, wrapped)
                lora[f"encoder.layer.{i}.attention.self.{name}.weight"] = wrapped
        trainable = [p for m in lora.values() for p in (m.lora_A, m.lora_B)]
    else:
        trainable = [p for n, p in encoder.named_parameters() if n.endswith("bias")]
        for p in trainable:
            p.requires_grad_(True)
    head = nn.Linear(encoder.config.hidden_size, len(SST2_LABELS))
    with torch.no_grad():
        head.weight.normal_(0.0, 0.02, generator=gen)
        head.bias.zero_()
    params = [*trainable, *head.parameters()]
    n_trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / args.warmup, max(0.0, (args.steps - s) / max(1, args.steps - args.warmup)))
    )
    lengths = [len(t.split()) for t in train_texts]
    print(f"{args.method}: {n_trainable} trainable parameters; {len(fit)} training phrases, {len(hold)} held out",
          flush=True)

    def snapshot() -> dict[str, Tensor]:
        if args.method == "lora":
            snap = {}
            for name, m in lora.items():
                snap[name + ".lora_A"] = m.lora_A.detach().clone()
                snap[name + ".lora_B"] = m.lora_B.detach().clone()
        else:
            state = encoder.state_dict()
            snap = {n + ".delta": (state[n] - base[n]).clone() for n in base if n.endswith("bias")}
        snap["head.weight"] = head.weight.detach().clone()
        snap["head.bias"] = head.bias.detach().clone()
        return snap

    encoder.train()
    step, epoch, best, history = 0, 0, (-1.0, 0, {}), []
    t0 = time.perf_counter()
    loss_sum, loss_n = 0.0, 0
    while step < args.steps:
        for idx in batches(fit, lengths, args.batch_size, gen):
            enc = tok([train_texts[i] for i in idx], padding=True, truncation=True, max_length=256,
                      return_tensors="pt")
            y = torch.tensor([train_labels[i] for i in idx])
            loss = nn.functional.cross_entropy(head(mean_pooled(encoder, enc)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            loss_sum, loss_n = loss_sum + float(loss), loss_n + 1
            if step % args.eval_every == 0 or step == args.steps:
                acc = accuracy(encoder, head, tok, hold_texts, hold_labels)
                history.append({"step": step, "train_loss": round(loss_sum / loss_n, 5), "holdout_accuracy": acc})
                print(f"step {step:5d} epoch {epoch} loss {loss_sum / loss_n:.4f} held-out {acc:.4f} "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
                loss_sum, loss_n = 0.0, 0
                if acc > best[0]:
                    best = (acc, step, snapshot())
            if step >= args.steps:
                break
        epoch += 1
    train_s = time.perf_counter() - t0
    best_acc, best_step, snap = best
    print(f"best held-out accuracy {best_acc:.4f} at step {best_step}; training took {train_s:.0f} s", flush=True)
    if args.no_write:
        return 0

    train_file = Path(args.data_dir) / "sst2" / "train.tsv"
    head_w, head_b = snap.pop("head.weight"), snap.pop("head.bias")
    meta: dict[str, Any] = {
        "labels": list(SST2_LABELS),
        "pooling": "mean",
        "method": args.method,
        "model": None,
        "training": {
            "data": "sst2/train.tsv",
            "data_sha256": sha256_file(train_file),
            "rows_in_file": len(train_texts),
            "holdout_rows": len(hold),
            "subset": "phrases in the order of sha256('sst2-train:{seed}:{index}'); the first holdout_rows are held "
                      "out and choose the checkpoint (best held-out accuracy); the rest are trained on",
            "seed": args.seed,
            "steps": args.steps,
            "chosen_step": best_step,
            "holdout_accuracy": round(best_acc, 6),
            "batch_size": args.batch_size,
            "optimizer": f"AdamW(lr={args.lr:g}, weight_decay=0), {args.warmup} warm-up steps, linear decay",
            "trainable_parameters": n_trainable,
            "dropout": "BERT's own (0.1) during training",
            "history": history,
            "versions": {pkg: version(pkg) for pkg in ("torch", "transformers")},
        },
        "command": reproduce_command(args),
    }
    if args.method == "lora":
        meta["lora"] = {"rank": args.rank, "alpha": args.alpha, "targets": ["attention.self.query.weight",
                                                                          "attention.self.value.weight"]}
    adapter = ClassifierAdapter(ClassifierHead(head_w, head_b, {}), snap, meta)
    # First write (no validation numbers yet) so the loader can read it; then measure and rewrite with them.
    clf = None
    from at2_lens.models import load_model

    model = load_model("minilm")
    meta["model"] = minilm_fingerprint(model)
    del model
    write_adapter(args.out, ClassifierAdapter(adapter.head, snap, meta))
    clf = load_minilm_sst2_finetuned(path=args.out)
    t1 = time.perf_counter()
    df = pruning_sweep(clf, val_texts, val_labels, torch.zeros(6, 12), fractions=[0.0, 1.0])
    acc, masked = float(df["accuracy"].iloc[0]), float(df["accuracy"].iloc[1])
    print(f"{clf.backend.describe()}: validation accuracy {acc:.4f} ({round(acc * len(val_texts))}/{len(val_texts)}); "
          f"every head masked {masked:.4f} ({time.perf_counter() - t1:.0f} s)", flush=True)
    meta["validation"] = {"data": "sst2/validation.tsv", "rows": len(val_texts), "accuracy": round(acc, 6),
                          "accuracy_all_heads_masked": round(masked, 6), "backend": clf.backend.kind}
    meta["validation_accuracy"] = round(acc, 6)
    path = write_adapter(args.out, ClassifierAdapter(adapter.head, snap, meta))
    print(f"wrote {path} (sha256 {sha256_file(path)}; total {time.perf_counter() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
