"""Collect AT2 training data for SmolLM2-135M-Instruct into the repo's resumable store.

    python scripts/collect_smollm2.py --limit 40        # collect (or resume) the first 40 tasks
    python scripts/collect_smollm2.py --limit 200 --shard-index 0 --shard-count 2   # one of two processes

Tasks, in a fixed interleaved order so that a larger --limit resumes a smaller one: the SQuAD 2.0 training-split
paragraphs (see ``at2_lens.evaluation.squad``; the held-out split is never used here) with their first question, and
generated multi-document tasks (a training-split paragraph among distractor snippets from other articles); then, from
task 292 on (v2), the same paragraphs with their second answerable question, and 150 more multi-document tasks
(seed 1); then, from task 575 on (v3), harder tasks shaped like AT2's failures: 200 multi-document tasks with 8-20
sentence sources (the question's paragraph among 4-6 three-sentence snippets of other articles) and 120 tasks whose
answer needs two sentences (two questions about paragraphs of two articles, plus a distractor paragraph). Each
version's list is a prefix of the next, so a store collected under v1 or v2 is a prefix of v3. Sources are
sentences (the granularity the demo attributes at); ablations mask sources' keys at every layer (positions kept).
The model's own greedy response (<= 32 new tokens) is the target; the output is its logit-probability.
"""

from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path

from at2_lens.data import SQUAD_V2_DEV_SUBSET

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

SQUAD = SQUAD_V2_DEV_SUBSET
STORE = ROOT / "data" / "at2_smollm2" / "store"
N_MULTI = 150
TASKS_V1 = "squad_v2 dev_subset train split + multi-document v1 (N_MULTI=150)"
TASKS_V2 = TASKS_V1 + "; from task 292 (v2): second questions + multi-document (N_MULTI=150, seed 1)"
N_HARD_MULTI = 200
N_TWO_QUESTIONS = 120
TASKS_V3 = TASKS_V2 + (
    f"; from task 575 (v3): {N_HARD_MULTI} multi-document tasks with 4-6 three-sentence distractors (seeds 100+i), "
    f"{N_TWO_QUESTIONS} two-question tasks over two articles' paragraphs and a distractor (random.Random(3))"
)


def build_tasks(squad_path: Path) -> list:
    """The store's fixed task list (v3, 895 tasks)."""
    return [task for _, task in build_task_kinds(squad_path)]


def build_task_kinds(squad_path: Path) -> list[tuple[str, object]]:
    """``(kind, task)`` for every task of the store's list: ``store_v2`` (v1 and v2), ``hard_multidoc``,
    ``two_questions``."""
    import random

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
    tasks = tasks + _interleave(second_tasks, multi_document_tasks(records, N_MULTI, seed=1))
    # v3: 8-20 sentence sources, and answers that need two sentences (both only from training-split paragraphs).
    rng = random.Random(3)
    hard = []
    for i in range(N_HARD_MULTI):
        hard += multi_document_tasks(records, 1, n_distractors=rng.randint(4, 6), distractor_sentences=3, seed=100 + i)
    by_title: dict[str, list[dict]] = {}
    for r in records:
        by_title.setdefault(r["title"], []).append(r)
    titles = sorted(by_title)
    two = []
    for _ in range(N_TWO_QUESTIONS):
        a, b, c = rng.sample(titles, 3)
        ra, rb = rng.choice(by_title[a]), rng.choice(by_title[b])
        docs = [ra["context"], rb["context"], rng.choice(by_title[c])["context"]]
        rng.shuffle(docs)
        query = f"Answer both questions briefly. 1) {ra['question']} 2) {rb['question']}"
        two.append(ContextTask(context=docs, query=query, sources="sentence"))
    return (
        [("store_v2", t) for t in tasks] + [("hard_multidoc", t) for t in hard] + [("two_questions", t) for t in two]
    )


def _interleave(a: list, b: list) -> list:
    out = []
    for i in range(max(len(a), len(b))):
        out.extend(x[i] for x in (a, b) if i < len(x))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=None, help="collect only the first N tasks of the fixed order")
    ap.add_argument("--store", default=str(STORE), help=f"store directory (default: {STORE.relative_to(ROOT)})")
    ap.add_argument("--squad", default=str(SQUAD), help="SQuAD 2.0 JSON file (default: the shipped subset)")
    ap.add_argument("--n-masks", type=int, default=32, help="random ablations per task (default 32)")
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
                    extra_settings={"tasks": TASKS_V3})
    print(f"{len(store)} examples in {store.root}")


if __name__ == "__main__":
    main()
