"""Context pruning on held-out SQuAD paragraphs (the AT2 paper's application): keep the top-k sentences by an
attribution of the model's own answer, re-ask, and see how the gold answer fares.

    python benchmarks/bench_context_pruning.py                    # all 31 held-out paragraphs, ks 1,2,3 (CPU)
    python benchmarks/bench_context_pruning.py --limit 3 --ks 1   # smoke run
    python benchmarks/bench_context_pruning.py --out runs/pruning.csv   # resumable: finished tasks are kept
                                                  # (under the same settings, the estimator's weights included)

Per held-out paragraph (``at2_lens.evaluation.squad``; the estimator never saw these): SmolLM2 answers the question
greedily over the whole paragraph; AT2 (the shipped estimator, or --estimator) and average attention score the
paragraph's sentences for that answer; the context is pruned to each method's top-k sentences (and to k random
ones, seeded) by cutting the other sentences out of the text. Measured: the log-probability of the gold SQuAD answer
(first listed) under the pruned context minus that under the full context (nats; higher is better, > 0 means pruning
helped), the share of tasks where it did not fall, and whether the model's re-answer with the top-k context contains
a gold answer (normalised text), against its answer with the full context.
"""

from __future__ import annotations

import argparse
import os
import re
import string
import sys
import warnings
from pathlib import Path

import pandas as pd
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

from at2_lens.ablation import ablation_fn  # noqa: E402
from at2_lens.at2.attribution import AT2Attribution  # noqa: E402
from at2_lens.at2.estimator import weights_sha256  # noqa: E402
from at2_lens.backends import get_backend  # noqa: E402
from at2_lens.baselines import AverageAttention  # noqa: E402
from at2_lens.data import SQUAD_V2_DEV_SUBSET  # noqa: E402
from at2_lens.evaluation.squad import squad_split_records  # noqa: E402
from at2_lens.pruning import prune_context, top_k_mask  # noqa: E402
from at2_lens.tasks import ContextTask, prepare_task  # noqa: E402

from _resume import load_partial, save_partial  # noqa: E402

DEFAULT_DATA = SQUAD_V2_DEV_SUBSET
COLUMNS = ["task", "n_sources", "k", "method", "delta_log_prob", "full_log_prob", "reanswer_has_gold",
           "full_answer_has_gold"]


def normalise(text: str) -> str:
    """SQuAD-style answer normalisation: lower case, no punctuation, articles or extra spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def has_gold(answer: str, golds: list[str]) -> bool:
    a = normalise(answer)
    return any(normalise(g) and normalise(g) in a for g in golds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="SQuAD-format JSON (default: the shipped subset)")
    ap.add_argument("--estimator", default=None, help="AT2 estimator file (default: the one shipped for SmolLM2)")
    ap.add_argument("--ks", default="1,2,3", help="comma-separated numbers of sentences kept (default 1,2,3)")
    ap.add_argument("--reanswer-k", type=int, default=2, help="k at which the model re-answers (default 2; 0: skip)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N held-out paragraphs")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="answer length budget (default 32)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random-k baseline (default 0)")
    ap.add_argument("--out", default=None,
                    help="per-task CSV (+ .json of its settings), rewritten atomically after each task; resumes "
                         "under the same settings")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if not Path(args.data).is_file():
        raise SystemExit(f"data file {args.data} is absent")
    ks = [int(k) for k in args.ks.split(",")]
    from at2_lens.at2.pretrained import default_estimator_for
    from at2_lens.models import load_model

    model = load_model("smollm2")
    backend = get_backend(model)
    estimator = args.estimator or default_estimator_for(model)
    methods = {"at2": AT2Attribution(model, estimator=estimator), "avg_attention": AverageAttention(model)}
    _, held = squad_split_records(args.data)
    held = held[: args.limit] if args.limit is not None else held
    settings = {"data": Path(args.data).name, "estimator": args.estimator,
                "estimator_sha256": weights_sha256(methods["at2"].estimator.weights), "ks": ks,
                "reanswer_k": args.reanswer_k, "max_new_tokens": args.max_new_tokens, "seed": args.seed}
    done, _ = load_partial(args.out, settings)
    rows: list[dict] = [] if done is None else done.to_dict("records")
    finished = {r["task"] for r in rows}
    for ti, rec in enumerate(held):
        if ti in finished:
            continue
        task = ContextTask(context=rec["context"], query=rec["question"], sources="sentence")
        answered = prepare_task(backend, task, args.max_new_tokens)
        full_has = has_gold(answered.response or "", rec["answers"])
        gold = prepare_task(backend, ContextTask(context=rec["context"], query=rec["question"],
                                                 response=rec["answers"][0], sources="sentence"))
        assert gold.source_spans == answered.source_spans  # the same sentences are scored and pruned
        n = answered.n_sources
        log_prob = ablation_fn(model, gold, mode="remove", output="log_prob")
        full = float(log_prob(torch.ones(1, n, dtype=torch.bool))[0])
        results = {name: m.attribute(answered) for name, m in methods.items()}
        gen = torch.Generator().manual_seed(args.seed * 100_003 + ti)
        rand_scores = torch.rand(n, generator=gen)
        print(f"task {ti}: {n} sentences, answer {answered.response!r}, gold {rec['answers'][0]!r}", file=sys.stderr)
        for k in ks:
            if k >= n:
                continue
            scored = {**{name: r.scores for name, r in results.items()}, "random": rand_scores}
            masks = torch.stack([top_k_mask(s, k) for s in scored.values()])
            values = log_prob(masks).tolist()
            for (name, _), v in zip(scored.items(), values, strict=True):
                re_has = None
                if k == args.reanswer_k and name in results:
                    pruned = prepare_task(backend, prune_context(task, results[name], k), args.max_new_tokens)
                    re_has = has_gold(pruned.response or "", rec["answers"])
                rows.append({"task": ti, "n_sources": n, "k": k, "method": name, "delta_log_prob": v - full,
                             "full_log_prob": full, "reanswer_has_gold": re_has, "full_answer_has_gold": full_has})
        if args.out:
            save_partial(args.out, pd.DataFrame(rows, columns=COLUMNS), settings)
    df = pd.DataFrame(rows, columns=COLUMNS)
    print(report(df, n_held=len(held)))


def report(df: pd.DataFrame, n_held: int) -> str:
    """Markdown: per k and method, mean change of the gold answer's log-prob, share not worse, re-answer accuracy."""
    lines = [f"Context pruning on {df['task'].nunique()} of {n_held} held-out SQuAD paragraphs (SmolLM2, sentences; "
             "a k is used on the paragraphs with more than k sentences).", "",
             "| k | method | tasks | mean Δ log P(gold) | median Δ | share Δ ≥ 0 | re-answer has gold |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for (k, method), g in df.groupby(["k", "method"], sort=True):
        re = g["reanswer_has_gold"].dropna()
        re_cell = f"{re.astype(bool).mean():.2f}" if len(re) else "–"
        lines.append(f"| {k} | {method} | {len(g)} | {g.delta_log_prob.mean():+.3f} | "
                     f"{g.delta_log_prob.median():+.3f} | {(g.delta_log_prob >= 0).mean():.2f} | {re_cell} |")
    full = df.drop_duplicates("task")["full_answer_has_gold"].astype(bool).mean()
    lines.append("")
    lines.append(f"With the full paragraph the model's answer contains a gold answer in {full:.2f} of the tasks.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
