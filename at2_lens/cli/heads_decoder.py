"""``at2-lens heads --study decoder``: decoder head finders on training tasks, causal checks on held-out tasks.

Finds heads four ways on TRAINING tasks (needle tasks from the training split's SQuAD paragraphs, SQuAD training
paragraphs), then ablates each ranking's top-k heads and random k-head sets on HELD-OUT tasks (held-out needle tasks,
held-out SQuAD paragraphs) and reports the change of the answer's log-probability; writes a CSV of every ablation and a
markdown summary. The library calls behind it are in :mod:`at2_lens.heads`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from at2_lens._validate import check_int
from at2_lens.errors import InputError

FINDERS = ("retrieval", "query_focus", "attattr", "at2")
FINDERS_HELP = (
    "comma-separated head finders (default: all): "
    "retrieval = Wu et al. 2024's copy-paste score, the share of the needle code's tokens for which the head's most "
    "attended key is the needle token being copied (training needle tasks); "
    "query_focus = QRHead-style attention mass from the query tokens to the relevant context (the needle, or the "
    "sentence holding SQuAD's gold answer), minus the same under the content-free query 'N/A' (training needle "
    "tasks and SQuAD paragraphs); "
    "attattr = AttAttr head importance (integrated gradients over attention) for the answer's log-probability "
    "(short training needle tasks; costly: n-steps forward+backward passes per layer and task); "
    "at2 = the shipped AT2 estimator's per-head weights (free)"
)
HOW_HELP = (
    "comma-separated ablation modes (default: zero,mean,resample): zero = the heads' outputs (hook_z) set to 0; "
    "mean = set to their mean over every token of training tasks; resample = set to their activations on a training "
    "task (a donor whose prompt is at least as long), aligned at the start of the answer"
)


def add_decoder_args(p: argparse.ArgumentParser) -> None:
    """The options of the decoder study (``--study decoder``); the encoder study ignores them."""
    g = p.add_argument_group("decoder study (--study decoder)")
    g.add_argument("--finders", default=",".join(FINDERS), help=FINDERS_HELP)
    g.add_argument("--how", default="zero,mean,resample", help=HOW_HELP)
    g.add_argument("--k", type=int, default=10, help="heads ablated per set (default: 10)")
    g.add_argument("--n-random", type=int, default=100,
                   help="random k-head sets in all, spread evenly over the held-out tasks (default: 100)")
    g.add_argument("--n-needle-train", type=int, default=16, help="training needle tasks (default: 16)")
    g.add_argument("--n-squad-train", type=int, default=16, help="training SQuAD paragraphs (default: 16)")
    g.add_argument("--n-attattr", type=int, default=2, help="short training needle tasks for AttAttr (default: 2)")
    g.add_argument("--n-needle", type=int, default=10, help="held-out needle tasks checked (default: 10)")
    g.add_argument("--n-squad", type=int, default=31, help="held-out SQuAD paragraphs checked (default: all 31)")
    g.add_argument("--n-sentences", type=int, default=6, help="haystack sentences per needle task (default: 6)")
    g.add_argument("--n-reference", type=int, default=8,
                   help="training tasks behind mean and resample ablation (default: 8)")
    g.add_argument("--answer-tokens", type=int, default=24,
                   help="budget of the model's own answer on SQuAD, its target there (default: 24)")
    g.add_argument("--ablation-batch-size", type=int, default=8,
                   help="ablated sequences per forward pass (default: 8)")
    g.add_argument("--out", default="heads_decoder",
                   help="output prefix: writes OUT.csv (every ablation) and OUT.md (summary) (default: heads_decoder)")


def _split(value: str, allowed: tuple[str, ...], name: str) -> list[str]:
    items = [x.strip() for x in value.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if not items or bad or len(set(items)) != len(items):
        raise InputError(f"{name}: expected a comma-separated subset of {allowed}, got {value!r}")
    return items


def check_decoder_args(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """Everything checkable before the model loads; returns the finders and ablation modes."""
    from at2_lens.cli._args import check_device, check_model_kind

    finders = _split(args.finders, FINDERS, "--finders")
    hows = _split(args.how, ("zero", "mean", "resample"), "--how")
    for name in ("k", "n_random", "n_needle_train", "n_squad_train", "n_attattr", "n_sentences", "n_reference",
                 "answer_tokens", "ablation_batch_size", "n_steps", "threads"):
        check_int(f"--{name.replace('_', '-')}", getattr(args, name), minimum=1)
    for name in ("n_needle", "n_squad"):
        check_int(f"--{name.replace('_', '-')}", getattr(args, name), minimum=0)
    if args.n_needle + args.n_squad == 0:
        raise InputError("--n-needle/--n-squad: expected at least one held-out task")
    if args.n_squad > 31:
        raise InputError(f"--n-squad: the held-out split has 31 paragraphs, got {args.n_squad}")
    if not str(args.out).strip():
        raise InputError("--out: expected an output prefix")
    check_model_kind(args.model, decoder=True, command="heads --study decoder")
    check_device(args.device)
    return finders, hows


def cmd_heads_decoder(args: argparse.Namespace) -> int:
    """Run the decoder head study configured by ``args``; prints the markdown summary."""
    finders, hows = check_decoder_args(args)
    from tqdm.auto import tqdm

    from at2_lens.at2.pretrained import default_estimator_for
    from at2_lens.backends import get_backend
    from at2_lens.cli._args import check_loaded_kind, resolve_device, set_threads
    from at2_lens.data import SQUAD_V2_DEV_SUBSET
    from at2_lens.evaluation.squad import squad_split_records
    from at2_lens.files import atomic_write_text
    from at2_lens.head_ablation import top_heads
    from at2_lens.heads import (
        ablation_reference,
        at2_head_importance,
        attattr_head_importance,
        causal_check,
        compare_rankings,
        query_focus_scores,
        retrieval_scores,
    )
    from at2_lens.models import load_model
    from at2_lens.tasks import ContextTask, prepare_task
    from at2_lens.tasks.needle import needle_tasks
    from at2_lens.tasks.spans import source_holding

    set_threads(args.threads)
    model = load_model(args.model, backend=args.backend, device=resolve_device(args.device))
    check_loaded_kind(model, decoder=True, command="heads --study decoder", name=args.model)
    backend = get_backend(model)
    train_rec, held_rec = squad_split_records(SQUAD_V2_DEV_SUBSET)
    n_train = max(args.n_needle_train, args.n_reference)
    needle_train = needle_tasks(n_train, seed=args.seed, split="train", n_sentences=args.n_sentences)
    squad_train_rec = train_rec[: args.n_squad_train]
    squad_train = [ContextTask(context=r["context"], query=r["question"]) for r in squad_train_rec]
    rankings = {}
    for name in tqdm(finders, desc="head finders", unit="finder"):
        if name == "retrieval":
            rankings[name] = retrieval_scores(model, needle_train[: args.n_needle_train])
        elif name == "query_focus":
            tokenized = [t.tokenize(backend.tokenizer) for t in squad_train]
            gold = [source_holding(t.context, t.source_spans, r["answers"])
                    for t, r in zip(tokenized, squad_train_rec, strict=True)]
            relevant: list[Any] = [[g] if g is not None else None for g in gold] + [None] * args.n_needle_train
            rankings[name] = query_focus_scores(model, [*squad_train, *needle_train[: args.n_needle_train]],
                                                relevant=relevant)
        elif name == "attattr":
            short = needle_tasks(args.n_attattr, seed=args.seed + 7, split="train", n_sentences=3)
            rankings[name] = attattr_head_importance(model, short, n_steps=args.n_steps, progress=True)
        else:
            est = default_estimator_for(model)
            if est is None:
                raise InputError(f"--finders: no shipped AT2 estimator fits {args.model!r}; leave 'at2' out")
            rankings[name] = at2_head_importance(est)
    held: list[Any] = list(needle_tasks(args.n_needle, seed=args.seed + 1, split="held_out",
                                        n_sentences=args.n_sentences)) if args.n_needle else []
    suites = ["needle"] * len(held)
    for r in tqdm(held_rec[: args.n_squad], desc="held-out SQuAD answers", unit="task"):
        held.append(prepare_task(backend, ContextTask(context=r["context"], query=r["question"]),
                                 max_new_tokens=args.answer_tokens))
        suites.append("squad")
    needs_ref = any(h != "zero" for h in hows)
    reference = ablation_reference(model, [*needle_train[: args.n_reference // 2],
                                           *squad_train[: args.n_reference - args.n_reference // 2]]
                                   ) if needs_ref else None
    res = causal_check(model, rankings, held, k=args.k, how=hows, n_random=args.n_random, reference=reference,
                       seed=args.seed, batch_size=args.ablation_batch_size, progress=True)
    rows = res.rows.assign(suite=[suites[t] for t in res.rows["task"]])
    lines = [f"# Decoder head study: {backend.describe()}", "",
             "Top-10 heads (layer.head) of each ranking, found on training tasks:", ""]
    lines += [f"- {n}: " + ", ".join(f"{a}.{b}" for a, b in top_heads(r, 10)) for n, r in rankings.items()]
    if len(rankings) > 1:
        cmp = compare_rankings(rankings, k=args.k)
        lines += ["", f"| a | b | Spearman | top-{args.k} overlap |", "|---|---|---:|---:|"]
        lines += [f"| {r.a} | {r.b} | {r.spearman:+.2f} | {r.overlap} |" for r in cmp.itertuples()]
    lines += ["", f"Causal check on {len(held)} held-out tasks ({suites.count('needle')} needle, "
              f"{suites.count('squad')} SQuAD; target: the needle's gold code, SmolLM2's own answer on SQuAD), "
              f"{res.n_random_per_task} random sets per task; change of the target's log-probability (nats):", "",
              res.to_markdown()]
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_name(out.name + ".csv"), rows.to_csv(index=False))
    atomic_write_text(out.with_name(out.name + ".md"), text)
    print(text)
    print(f"written: {out.with_name(out.name + '.csv').resolve()}, {out.with_name(out.name + '.md').resolve()}")
    return 0


__all__ = ["FINDERS", "add_decoder_args", "check_decoder_args", "cmd_heads_decoder"]
