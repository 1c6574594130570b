"""Collect the data of the AT2 feature-family study (issue: break the ceiling of linear raw attention).

    python scripts/collect_feature_study.py --out /tmp/study --limit 8                       # a few tasks
    python scripts/collect_feature_study.py --out DIR --shard-index 0 --shard-count 8        # one of 8 processes

For every training task (the estimator store's 575-task list, then harder tasks generated here) it generates
SmolLM2's greedy response, reads in ONE forward pass several candidate feature families, and runs 32 random
mask-mode ablations (the ground truth). Each task is one atomically written safetensors file, so a killed run
resumes, and shards split the work between processes. Only training-split SQuAD paragraphs are used.

Feature families (every one is a function of the same forward pass; ``[source, layer, head]`` after pooling):
- source pooling of the attention from a target row to a source's tokens: ``sum`` (AT2's), ``max`` (one token),
  ``vsum`` (value-norm weighted, ``Σ_k A[t,k]·‖v_k W_O‖``, Kobayashi et al. 2020), ``sum_renorm`` (``sum``
  divided by the row's total attention to all sources: the attention-sink mass on BOS/template tokens removed);
- target-row weighting: ``uniform`` (AT2's), ``surprisal`` (``-log p`` of the target token) and ``entropy`` (of the
  next-token distribution), both known from the same pass.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from at2_lens.data import SQUAD_V2_DEV_SUBSET

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
SQUAD = SQUAD_V2_DEV_SUBSET
FAMILIES = ("sum", "max", "vsum", "sum_renorm")
WEIGHTINGS = ("uniform", "surprisal", "entropy")


def build_all_tasks(squad: Path) -> list[tuple[str, Any]]:
    """``(kind, task)`` pairs of the estimator store's task list (v3; ``scripts/collect_smollm2.py``)."""
    from collect_smollm2 import build_task_kinds  # scripts/ is on sys.path when a script here runs

    return build_task_kinds(squad)


@torch.no_grad()
def feature_families(backend: Any, ids: torch.Tensor, sources: list[tuple[int, int]], target: tuple[int, int]) -> dict:
    """Per-row attention features of every family, and each target token's log-prob and entropy, in one pass."""
    from at2_lens.ablation import membership, query_rows
    from at2_lens.ablation.features import value_norms

    n = ids.shape[-1]
    member = membership(sources, n).to(backend.device)
    rows = query_rows(target, True)
    L = backend.n_layers
    w_o = backend.model.W_O.detach()  # [layer, head, d_head, d_model]
    vnorm: dict[int, torch.Tensor] = {}
    out: dict[str, list[torch.Tensor]] = {f: [] for f in ("sum", "max", "vsum")}

    def v_hook(layer: int) -> Any:
        def hook(v: torch.Tensor, hook: Any) -> None:
            vnorm[layer] = value_norms(v[0], w_o[layer])  # [pos, head]

        return hook

    def pattern_hook(layer: int) -> Any:
        def hook(pattern: torch.Tensor, hook: Any) -> None:
            a = pattern[0, :, rows, :].float()  # [head, row, key]
            out["sum"].append(torch.einsum("hrk,ks->rsh", a, member))
            out["vsum"].append(torch.einsum("hrk,kh,ks->rsh", a, vnorm[layer], member))
            out["max"].append(torch.stack([a[:, :, s0:s1].amax(-1) for s0, s1 in sources], dim=-1).permute(1, 2, 0))

        return hook

    hooks = []
    for layer in range(L):
        hooks.append((backend.v_hook(layer), v_hook(layer)))
        hooks.append((backend.pattern_hook(layer), pattern_hook(layer)))
    logits = backend.run(ids[None], hooks)
    t0, t1 = target
    lp = torch.log_softmax(logits[0, rows].double(), dim=-1)
    token_lp = lp.gather(-1, ids[t0:t1, None].to(lp.device))[:, 0]
    entropy = -(lp.exp() * lp).sum(-1)
    fam = {k: torch.stack(v, dim=2) for k, v in out.items()}  # [row, source, layer, head]
    total = fam["sum"].sum(dim=1, keepdim=True)
    fam["sum_renorm"] = torch.where(total > 0, fam["sum"] / total.clamp_min(1e-12), torch.zeros_like(fam["sum"]))
    return {"rows": fam, "token_logprobs": token_lp.float().cpu(), "entropy": entropy.float().cpu()}


def row_weights(token_logprobs: torch.Tensor, entropy: torch.Tensor) -> dict[str, torch.Tensor]:
    """Weights over the target rows (each sums to 1): uniform, by surprisal, by entropy (the library's rule)."""
    from at2_lens.ablation.features import target_row_weights

    out = {}
    for name in WEIGHTINGS:
        w = target_row_weights(name, token_logprobs, entropy)  # type: ignore[arg-type]
        w = torch.ones(token_logprobs.shape[0]) if w is None else w
        out[name] = w / w.sum()
    return out


def collect_one(backend: Any, kind: str, task: Any, index: int, n_masks: int, batch_size: int) -> dict:
    from at2_lens.ablation import mask_mode_outputs, output_from_logprob, random_masks
    from at2_lens.tasks import prepare_task

    tt = prepare_task(backend, task, 32)
    sources = list(tt.source_token_ranges)
    target = tt.target_token_range
    ids = tt.input_ids.to(backend.device)
    fams = feature_families(backend, ids, sources, target)
    weights = row_weights(fams["token_logprobs"], fams["entropy"])
    tensors: dict[str, torch.Tensor] = {}
    for f, rows in fams["rows"].items():
        for wname, w in weights.items():
            if f == "max" and wname != "uniform":
                continue  # max pooling is kept only with uniform rows (keeps the returned data small)
            tensors[f"feat.{f}.{wname}"] = torch.einsum("r,rslh->slh", w.to(rows.device), rows).half().cpu()
    masks = random_masks(len(sources), n_masks, 0.5, seed=0, index=index)
    outputs = mask_mode_outputs(backend.model, ids, sources, target, masks, output="logit_prob", batch_size=batch_size)
    tensors["masks"] = masks.to(torch.uint8)
    tensors["outputs"] = outputs.float()
    tensors["full_output"] = output_from_logprob(fams["token_logprobs"].sum()).reshape(1)
    tensors["token_logprobs"] = fams["token_logprobs"]
    tensors["entropy"] = fams["entropy"]
    tensors["source_lengths"] = torch.tensor([b - a for a, b in sources], dtype=torch.int32)
    meta = {"index": index, "kind": kind, "response": tt.response, "query": task.query, "n_tokens": int(tt.seq_len)}
    return {"tensors": tensors, "meta": meta}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--squad", default=str(SQUAD))
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--indices", default=None, help="comma-separated task indices (overrides --limit)")
    ap.add_argument("--n-masks", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--shard-index", type=int, default=0)
    ap.add_argument("--shard-count", type=int, default=1)
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tasks = build_all_tasks(Path(args.squad))
    (out / "tasks.json").write_text(json.dumps({"n_tasks": len(tasks)}))
    todo = list(range(len(tasks))) if args.limit is None else list(range(min(args.limit, len(tasks))))
    if args.indices:
        todo = [int(i) for i in args.indices.split(",")]
    todo = [i for i in todo if i % args.shard_count == args.shard_index and not (out / f"{i:05d}.safetensors").exists()]
    from at2_lens import load_model
    from at2_lens.backends import get_backend

    model = load_model("smollm2", **({"device": args.device} if args.device else {}))
    backend = get_backend(model)
    for done, i in enumerate(todo):
        kind, task = tasks[i]
        try:
            ex = collect_one(backend, kind, task, i, args.n_masks, args.batch_size)
        except Exception as e:  # a task that cannot be prepared (too long, empty response) is recorded and skipped
            (out / f"{i:05d}.error.json").write_text(json.dumps({"index": i, "kind": kind, "error": repr(e)}))
            continue
        tmp = out / f".{i:05d}.{os.getpid()}.tmp"
        save_file(ex["tensors"], str(tmp), metadata={"meta": json.dumps(ex["meta"])})
        load_file(str(tmp))  # refuse to rename a file that does not read back
        os.replace(tmp, out / f"{i:05d}.safetensors")
        if done % 20 == 0:
            print(f"shard {args.shard_index}: {done + 1}/{len(todo)} (task {i}, {kind})", flush=True)


if __name__ == "__main__":
    main()
