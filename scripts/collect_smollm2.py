"""Collect AT2 training data for SmolLM2-135M-Instruct into the repo's resumable store.

    python scripts/collect_smollm2.py --limit 40        # collect (or resume) the first 40 tasks
    python scripts/collect_smollm2.py --limit 200 --shard-index 0 --shard-count 2   # one of two processes

Tasks, in a fixed interleaved order so that a larger --limit resumes a smaller one: the SQuAD 2.0 training-split
paragraphs (see ``at2_lens.evaluation.squad``; the held-out split is never used here) with their first question, and
generated multi-document tasks (a training-split paragraph among distractor snippets from other articles); then, from
task 292 on (v2), the same paragraphs with their second answerable question, and 150 more multi-document tasks
(seed 1). The first 292 tasks are those of v1, so a store collected under v1 is a prefix of v2. Sources are
sentences (the granularity the demo attributes at); ablations mask sources' keys at every layer (positions kept).
The model's own greedy response (<= 32 new tokens) is the target; the output is its logit-probability.
"""

from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

SQUAD = ROOT.parent / "shared" / "data" / "squad_v2" / "dev_subset.json"
STORE = ROOT / "data" / "at2_smollm2" / "store"
N_MULTI = 150
TASKS_V1 = "squad_v2 dev_subset train split + multi-document v1 (N_MULTI=150)"
TASKS_V2 = TASKS_V1 + "; from task 292 (v2): second questions + multi-document (N_MULTI=150, seed 1)"


def build_tasks(squad_path: Path) -> list:
    from at2_lens.evaluation.squad import is_held_out, squad_split, squad_split_records
    from at2_lens.tasks import ContextTask
    from at2_lens.tasks.loaders import multi_document_tasks, squad_records

    train, _ = squad_split(squad_path, sources="sentence")
    everything = squad_records(squad_path)
    held_contexts = {r["context"] for r in everything if is_held_out(r["id"])}
    records = [r for r in everything if r["context"] not in held_contexts]
    tasks = _interleave(train, multi_document_tasks(records, N_MULTI, seed=0))
    # v2: each training paragraph's second answerable question (same order as the first ones), more multi-documents
    by_context: dict[str, list[dict]] = {}
    for r in everything:
        by_context.setdefault(r["context"], []).append(r)
    first, _ = squad_split_records(squad_path)
    second = [by_context[r["context"]][1] for r in first if len(by_context[r["context"]]) > 1]
    second_tasks = [ContextTask(context=r["context"], query=r["question"], sources="sentence") for r in second]
    return tasks + _interleave(second_tasks, multi_document_tasks(records, N_MULTI, seed=1))


def _interleave(a: list, b: list) -> list:
    out = []
    for i in range(max(len(a), len(b))):
        out.extend(x[i] for x in (a, b) if i < len(x))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=None, help="collect only the first N tasks of the fixed order")
    ap.add_argument("--store", default=str(STORE), help=f"store directory (default: {STORE.relative_to(ROOT)})")
    ap.add_argument("--squad", default=str(SQUAD), help="SQuAD 2.0 JSON file (default: ../shared/data/...)")
    ap.add_argument("--n-masks", type=int, default=16, help="random ablations per task (default 16)")
    ap.add_argument("--shard-index", type=int, default=0)
    ap.add_argument("--shard-count", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from at2_lens import load_model
    from at2_lens.at2.collect import collect

    tasks = build_tasks(Path(args.squad))
    if args.limit is not None:
        tasks = tasks[: args.limit]
    model = load_model("smollm2")
    store = collect(model, tasks, args.store, mode="mask", output="logit_prob", n_masks=args.n_masks,
                    keep_prob=0.5, seed=0, shard_index=args.shard_index, shard_count=args.shard_count,
                    batch_size=8, max_new_tokens=32,
                    extra_settings={"tasks": TASKS_V2})
    print(f"{len(store)} examples in {store.root}")


if __name__ == "__main__":
    main()
