"""``at2-lens demo`` and ``at2-lens attribute``: score the sources of a context for a response with AT2.

``demo`` is ``attribute`` on a built-in question (or ``--context``/``--question`` of your own); both print the top
sources and write an HTML report (and optionally the scores as JSON).

The context: ``--context PATH`` reads a UTF-8 text file (``-`` reads standard input) and a path that names no file
is an error, never text; ``--context-text TEXT`` takes the text itself. All options are checked before the model
loads (a mistyped file name or ``--target`` costs no loading time).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from at2_lens._validate import check_int
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

DEFAULT_REPORT = "at2_lens_report.html"


def _add_common_args(p: argparse.ArgumentParser) -> None:
    """The model and attribution options that ``demo`` and ``attribute`` share."""
    add_model_args(p, default="smollm2", hooked_class="HookedTransformer",
                   model_help="'smollm2' or 'minilm' (embedded, offline), a Hugging Face model id, or a local model "
                              "directory")
    p.add_argument("--estimator", default=None,
                   help="AT2 estimator file (.safetensors). Default: the estimator shipped for the model if there "
                        "is one, else uniform weights (average attention)")
    p.add_argument("--sources", default="sentence", choices=["token", "word", "sentence", "document"],
                   help="source granularity: what the context is cut into and scored (default: sentence)")
    p.add_argument("--top", type=int, default=None,
                   help="how many top sources to print (default: 5); with --per-sentence, how many each sentence "
                        "cites (default: 3)")
    p.add_argument("--per-sentence", action="store_true",
                   help="attribute every sentence of the response on its own (one feature pass in all) and show the "
                        "response as a citation view: each sentence followed by [n] markers naming its top sources")
    add_max_new_tokens_arg(p, "when the response is generated")
    p.add_argument("--html", default=DEFAULT_REPORT,
                   help=f"where to write the HTML report (default: {DEFAULT_REPORT}); '' to skip")
    p.add_argument("--json", default=None, help="also write the scores as JSON to this path")
    p.add_argument("--save", default=None,
                   help="also save the whole result (SourceAttribution.save: safetensors + JSON metadata) to this "
                        "path; read it back with SourceAttribution.load")


def add_demo_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``demo`` sub-command to an ``argparse`` sub-parsers object and return its parser."""
    p = subparsers.add_parser("demo",
                              help="answer a built-in question with SmolLM2 and attribute the answer (offline)",
                              description="The main job: the model answers a question over a multi-paragraph "
                                          "context; AT2 scores each context sentence; the terminal shows the top "
                                          "sources highlighted and an HTML report is written.")
    _add_common_args(p)
    add_context_args(p, required=False, default=" (default: the built-in context)")
    p.add_argument("--question", default=None, help="your own question (default: the built-in one)")
    p.set_defaults(func=cmd_demo)
    return p


def add_attribute_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``attribute`` sub-command to an ``argparse`` sub-parsers object and return its parser."""
    p = subparsers.add_parser("attribute", help="attribute a response to the sources of a context",
                              description="Score every source of a context for a (generated or given) response.")
    _add_common_args(p)
    add_context_args(p, required=True, default="")
    p.add_argument("--query", required=True, help="the question or instruction about the context")
    p.add_argument("--response", default=None, help="the response to attribute (default: generated greedily)")
    p.add_argument("--target", default=None,
                   help="character range START:END of the response to attribute (default: whole response)")
    p.set_defaults(func=cmd_attribute)
    return p


def parse_target(text: str | None) -> tuple[int, int] | None:
    """``--target START:END`` as a character range (None when not given); anything else is an InputError."""
    if text is None:
        return None
    parts = text.split(":")
    try:
        start, end = (int(x) for x in parts) if len(parts) == 2 else (None, None)
    except ValueError:
        start = end = None
    if start is None or end is None or not 0 <= start < end:
        raise InputError(f"--target: expected START:END character offsets with 0 <= START < END, got {text!r}")
    return start, end


def _check_common(args: argparse.Namespace, command: str) -> None:
    """The checks of the options ``demo`` and ``attribute`` share (before any model loads)."""
    check_model_kind(args.model, decoder=True, command=command)
    check_device(args.device)
    check_file(args.estimator, "--estimator")
    for option in ("html", "json", "save"):
        check_output_path(getattr(args, option), f"--{option}")
    if args.top is None:
        args.top = 3 if args.per_sentence else 5
    check_int("--top", args.top, minimum=1)
    if args.per_sentence and args.save:
        raise InputError("--save: saves one SourceAttribution and cannot be used with --per-sentence "
                         "(use --json for every sentence's scores)")
    if args.per_sentence and getattr(args, "target", None) is not None:
        raise InputError("--target: cannot be used with --per-sentence (every sentence is a target)")
    check_int("--max-new-tokens", args.max_new_tokens, minimum=1)


def _print_result(result: Any, top: int) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    console.print(f"[bold]Response:[/bold] {result.response.strip()}")
    console.print(f"[bold]Method:[/bold] {escape(result.method)} (scores: {escape(result.units)})\n")
    console.print(result)
    table = Table(title=f"Top {min(top, result.n_sources)} sources")
    table.add_column("rank", justify="right")
    table.add_column("score", justify="right")
    table.add_column("source")
    for r, (i, text, score) in enumerate(result.top_k(min(top, result.n_sources)), start=1):
        table.add_row(str(r), f"{score:.4f}", f"[{i}] {text.strip()}")
    console.print(table)


def _print_sentences(result: Any, k: int) -> None:
    from rich.console import Console
    from rich.markup import escape

    console = Console()
    method = result.sentences[0].attribution.method
    console.print(f"[bold]Method:[/bold] {escape(method)} (each sentence cites its top {k} sources)\n")
    console.print(result.to_rich(k))


def _sentences_json(result: Any) -> dict[str, Any]:
    return {
        "response": result.response, "method": result.sentences[0].attribution.method,
        "sources": list(result.source_texts),
        "sentences": [{"text": text, "span": list(span), "scores": att.scores.tolist()} for text, span, att in result],
    }


def _attribute(args: argparse.Namespace, task: Any) -> int:
    """Attribute ``task`` with AT2 as configured by ``args``; print the top sources, write the report and JSON."""
    from at2_lens import load_model
    from at2_lens.at2.attribution import AT2Attribution
    from at2_lens.at2.pretrained import default_estimator_for
    from at2_lens.report import write_report

    model = load_model(args.model, backend=args.backend, device=resolve_device(args.device))
    check_loaded_kind(model, decoder=True, command=args.command, name=args.model)
    estimator = args.estimator if args.estimator else default_estimator_for(model)
    at2 = AT2Attribution(model, estimator=estimator)
    if args.per_sentence:
        sentences = at2.attribute_sentences(task, max_new_tokens=args.max_new_tokens)
        _print_sentences(sentences, args.top)
        if args.html:
            path = write_report(args.html, sentences, at2.head_weights, title="at2_lens: AT2 citations",
                                query=task.query, citations=args.top)
            print(f"HTML report written to {path.resolve()}")
        if args.json:
            from at2_lens.files import atomic_write_text

            atomic_write_text(args.json, json.dumps(_sentences_json(sentences), indent=2, ensure_ascii=False))
            print(f"JSON scores written to {Path(args.json).resolve()}")
        return 0
    result = at2.attribute(task, max_new_tokens=args.max_new_tokens)
    _print_result(result, args.top)
    if args.html:
        path = write_report(args.html, result, at2.head_weights, title="at2_lens: AT2 attribution", query=task.query)
        print(f"HTML report written to {path.resolve()}")
    if args.json:
        from at2_lens.files import atomic_write_text

        atomic_write_text(args.json, json.dumps({
            "response": result.response, "target": result.target_text, "method": result.method,
            "sources": [{"index": i, "text": t, "score": float(s)}
                        for i, (t, s) in enumerate(zip(result.source_texts, result.scores.tolist(), strict=True))],
        }, indent=2, ensure_ascii=False))
        print(f"JSON scores written to {Path(args.json).resolve()}")
    if args.save:
        print(f"Result saved to {result.save(args.save, model=model).resolve()}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Attribute the model's answer to the built-in question (or ``--context``/``--question``)."""
    from at2_lens.tasks import ContextTask
    from at2_lens.tasks.loaders import DEMO_CONTEXT, DEMO_QUESTION

    _check_common(args, "demo")
    text = read_context(args)
    context = paragraphs(text) if text is not None else DEMO_CONTEXT
    question = args.question or DEMO_QUESTION
    task = ContextTask(context=context, query=question, sources=args.sources)
    print(f"Question: {question}")
    return _attribute(args, task)


def cmd_attribute(args: argparse.Namespace) -> int:
    """Attribute a given or generated response to the sources of ``--context``."""
    from at2_lens.tasks import ContextTask

    _check_common(args, "attribute")
    target = parse_target(args.target)
    context = read_context(args)
    assert context is not None  # the parser requires --context or --context-text
    task = ContextTask(context=paragraphs(context) if args.sources == "document" else context, query=args.query,
                       response=args.response, sources=args.sources, target=target)
    return _attribute(args, task)


__all__ = ["DEFAULT_REPORT", "add_attribute_parser", "add_demo_parser", "cmd_attribute", "cmd_demo", "parse_target",
           "read_context"]
