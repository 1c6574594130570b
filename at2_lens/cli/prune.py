"""``at2-lens prune``: keep only the sources of a context that the model's answer relies on, and ask again.

The model answers the query over the whole context; an attribution method (AT2 with the shipped estimator by
default) scores the sources for that answer; the context is pruned to the best sources by ``--k N`` or ``--mass
SHARE`` (default: ``DEFAULT_MASS`` of the positive score mass); the model answers again over the pruned context.
The terminal shows the context with the removed sources struck through, the sources' scores, both answers and,
with ``--gold``, their SQuAD exact match and F1. All options are checked before the model loads.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from at2_lens._defaults import DEFAULT_MASS
from at2_lens._validate import check_fraction, check_int
from at2_lens.cli._args import (
    add_context_args,
    add_max_new_tokens_arg,
    add_model_args,
    check_device,
    check_file,
    check_loaded_kind,
    check_model_kind,
    check_output_path,
    paragraphs,
    read_context,
    resolve_device,
)
from at2_lens.errors import InputError

_ESTIMATOR_METHODS = ("at2", "at2_refined")
_MAX_ROWS = 30  # sources listed in the score table; --json holds every one


def add_prune_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``prune`` sub-command to an ``argparse`` sub-parsers object and return its parser."""
    from at2_lens.evaluation._names import METHOD_HELP

    methods = "\n".join(f"  {k}: {v}" for k, v in METHOD_HELP.items())
    p = subparsers.add_parser(
        "prune", help="prune a context to the sources the answer relies on and answer again",
        description="Answer the query over the whole context, score the context's sources for that answer, keep "
                    "the best sources (--k or --mass) and answer again over the pruned context. Prints the "
                    "context with the removed sources struck through, the scores and both answers.",
        epilog=f"methods (--method):\n{methods}", formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, default="smollm2", hooked_class="HookedTransformer",
                   model_help="'smollm2' (embedded, offline), a Hugging Face model id, or a local model directory")
    add_context_args(p, required=True, default="")
    p.add_argument("--query", required=True, help="the question or instruction about the context")
    p.add_argument("--sources", default="sentence", choices=["token", "word", "sentence", "document"],
                   help="source granularity: what the context is cut into, scored and pruned (default: sentence; "
                        "document = paragraphs separated by blank lines)")
    p.add_argument("--method", default="at2",
                   help="attribution method that scores the sources, one name of the list below (default: at2, "
                        "with the estimator shipped for the model)")
    p.add_argument("--estimator", default=None,
                   help="AT2 estimator file (.safetensors) for --method at2 or at2_refined{K} (default: the one "
                        "shipped for the model, else uniform weights)")
    rule = p.add_mutually_exclusive_group()
    rule.add_argument("--k", type=int, default=None, metavar="N", help="keep the N highest-scoring sources")
    rule.add_argument("--mass", type=float, default=None, metavar="SHARE",
                      help="keep the fewest highest-scoring sources holding this share (0 < SHARE <= 1) of the "
                           f"positive score mass (the default rule, share {DEFAULT_MASS})")
    p.add_argument("--gold", action="append", default=None, metavar="ANSWER",
                   help="a correct answer (repeat for several): print SQuAD exact match and F1 of both answers")
    add_max_new_tokens_arg(p, "for each answer")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write the result (both answers, the scores, what was kept and removed) as JSON")
    p.set_defaults(func=cmd_prune)
    return p


def _check_args(args: argparse.Namespace) -> Any:
    """Every check that needs no model; returns the task (a ``ContextTask``)."""
    from at2_lens.evaluation.methods import check_method_names

    check_model_kind(args.model, decoder=True, command="prune")
    check_device(args.device)
    check_file(args.estimator, "--estimator")
    try:
        check_method_names([args.method])
    except InputError as exc:
        raise InputError(f"--method: {str(exc).removeprefix('methods: ')}") from None
    if args.estimator and not args.method.strip().lower().startswith(_ESTIMATOR_METHODS):
        raise InputError(f"--estimator: only --method at2 or at2_refined{{K}} use an estimator, not {args.method!r}")
    if args.k is not None:
        check_int("--k", args.k, minimum=1)
    if args.mass is not None and check_fraction("--mass", args.mass, closed=True) == 0.0:
        raise InputError("--mass: expected a share in (0, 1], got 0")
    for gold in args.gold or []:
        if not gold.strip():
            raise InputError("--gold: expected a non-empty answer")
    check_int("--max-new-tokens", args.max_new_tokens, minimum=1)
    check_output_path(args.json, "--json")
    return _task(args)


def _task(args: argparse.Namespace) -> Any:
    from at2_lens.tasks import ContextTask
    from at2_lens.tasks.sources import partition

    text = read_context(args)
    assert text is not None  # the parser requires --context or --context-text
    task = ContextTask(context=paragraphs(text) if args.sources == "document" else text, query=args.query,
                       sources=args.sources)
    if args.k is not None and args.sources != "token":  # the number of token sources needs the tokenizer
        n = len(partition(task.context, args.sources, separator=task.separator))
        if args.k > n:
            raise InputError(f"--k: expected at most {n} (the number of sources: --sources {args.sources} cuts the "
                             f"context into {n}), got {args.k}")
    return task


def _context_text(outcome: Any) -> Any:
    """The original context with the removed sources struck through."""
    from rich.text import Text

    result = outcome.attribution
    removed = set(outcome.pruned.removed)
    text, at = Text(), 0
    for i, (start, end) in enumerate(result.source_spans):
        text.append(result.context[at:start])
        text.append(result.context[start:end], style="strike dim red" if i in removed else "bold")
        at = end
    text.append(result.context[at:])
    return text


def _print(outcome: Any, label: str, golds: list[str]) -> None:
    from rich.console import Console
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    console = Console()
    pruned, result = outcome.pruned, outcome.attribution
    n = result.n_sources
    rule = f"top {int(pruned.value)}" if pruned.rule == "top_k" else f"mass {pruned.value:g}"
    console.print(Text.assemble(("Query: ", "bold"), pruned.task.query))
    console.print(Text.assemble(("Method: ", "bold"), f"{label} ({result.units}); ", ("rule: ", "bold"),
                                f"{rule}: kept {len(pruned.kept)} of {n} sources, removed {len(pruned.removed)}"))
    console.print(Panel(_context_text(outcome), title="context (removed sources struck through)", expand=False))
    if pruned.removed:
        console.print(Text.assemble(("Removed sources: ", "bold"), ", ".join(f"[{i}]" for i in pruned.removed)))
    rows = min(n, _MAX_ROWS)
    table = Table(title="Sources by score" + (f" (top {rows} of {n})" if rows < n else ""))
    table.add_column("rank", justify="right")
    table.add_column("score", justify="right")
    table.add_column("kept")
    table.add_column("source")
    kept = set(pruned.kept)
    for r, i in enumerate(result.ranking()[:rows], start=1):
        source = Text(f"[{i}] {result.source_texts[i].strip()}", style="" if i in kept else "strike dim")
        table.add_row(str(r), f"{float(result.scores[i]):.4f}", "yes" if i in kept else "no", source)
    console.print(table)
    console.print(Text.assemble(("Old answer (full context): ", "bold"), outcome.old_answer.strip()))
    console.print(Text.assemble(("New answer (pruned context): ", "bold"), outcome.new_answer.strip()))
    if golds:
        scores = outcome.answer_scores(golds)
        gold_table = Table(title="Against the gold answer" + ("s" if len(golds) > 1 else ""))
        for column in ("answer", "exact match", "F1", "contains"):
            gold_table.add_column(column, justify="left" if column == "answer" else "right")
        for name in ("old", "new"):
            s = scores[name]
            gold_table.add_row(name, f"{s['exact_match']:.0f}", f"{s['f1']:.3f}", "yes" if s["contains"] else "no")
        console.print(gold_table)


def _json(outcome: Any, label: str, golds: list[str], args: argparse.Namespace) -> dict[str, Any]:
    pruned, result = outcome.pruned, outcome.attribution
    kept = set(pruned.kept)
    data: dict[str, Any] = {
        "model": args.model, "method": label, "query": pruned.task.query, "sources_granularity": args.sources,
        "rule": pruned.rule, "value": int(pruned.value) if pruned.rule == "top_k" else pruned.value,
        "n_sources": result.n_sources,
        "kept": list(pruned.kept), "removed": list(pruned.removed),
        "sources": [{"index": i, "text": t, "score": float(s), "kept": i in kept}
                    for i, (t, s) in enumerate(zip(result.source_texts, result.scores.tolist(), strict=True))],
        "context": result.context, "pruned_context": pruned.context,
        "old_answer": outcome.old_answer, "new_answer": outcome.new_answer,
        "max_new_tokens": args.max_new_tokens,
    }
    if golds:
        data["golds"] = golds
        data["answer_scores"] = outcome.answer_scores(golds)
    return data


def cmd_prune(args: argparse.Namespace) -> int:
    """Answer, attribute, prune and answer again, as configured by the parsed arguments."""
    task = _check_args(args)
    golds = list(args.gold or [])
    from rich.console import Console

    from at2_lens import load_model
    from at2_lens.evaluation.methods import build_method
    from at2_lens.pruning import prune_and_reanswer

    err = Console(stderr=True)
    with err.status(f"loading {args.model}") as status:
        def step(line: str) -> None:
            status.update(line)
            err.print(f"[dim]{line}[/dim]")

        step(f"loading {args.model}")
        model = load_model(args.model, backend=args.backend, device=resolve_device(args.device))
        check_loaded_kind(model, decoder=True, command="prune", name=args.model)
        label, method = build_method(model, args.method, estimator=args.estimator)
        outcome = prune_and_reanswer(model, task, method, k=args.k, mass=args.mass,
                                     max_new_tokens=args.max_new_tokens, progress=step)
    _print(outcome, label, golds)
    if args.json:
        from at2_lens.files import atomic_write_text

        atomic_write_text(args.json, json.dumps(_json(outcome, label, golds, args), indent=2, ensure_ascii=False))
        print(f"JSON result written to {Path(args.json).resolve()}")
    return 0


__all__ = ["add_prune_parser", "cmd_prune"]
