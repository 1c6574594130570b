"""The ``at2-lens`` command line: demo, attribute, collect, train, evaluate, heads, tree.

Every option is explained by ``at2-lens <command> --help``. Heavy imports happen inside the commands, so
``--help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from at2_lens._cli_args import add_model_args
from at2_lens.errors import At2LensError

DEFAULT_REPORT = "at2_lens_report.html"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p, default="smollm2", hooked_class="HookedTransformer",
                   model_help="'smollm2' or 'minilm' (embedded, offline), a Hugging Face model id, or a local model "
                              "directory")


def _add_attribution_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--estimator", default=None,
                   help="AT2 estimator file (.safetensors). Default: the estimator shipped for the model if there "
                        "is one, else uniform weights (average attention)")
    p.add_argument("--sources", default="sentence", choices=["token", "word", "sentence", "document"],
                   help="source granularity: what the context is cut into and scored (default: sentence)")
    p.add_argument("--top", type=int, default=5, help="how many top sources to print (default: 5)")
    p.add_argument("--max-new-tokens", type=int, default=48,
                   help="generation budget when the response is generated (default: 48)")
    p.add_argument("--html", default=DEFAULT_REPORT,
                   help=f"where to write the HTML report (default: {DEFAULT_REPORT}); '' to skip")
    p.add_argument("--json", default=None, help="also write the scores as JSON to this path")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="at2-lens",
        description="Which context tokens, and which attention heads, made a TransformerLens model say this? "
                    "AT2 (learned attention attribution) and AttAttr on TransformerLens models.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="answer a built-in question with SmolLM2 and attribute the answer (offline)",
                          description="The main job: the model answers a question over a multi-paragraph "
                                      "context; AT2 scores each context sentence; the terminal shows the top "
                                      "sources highlighted and an HTML report is written.")
    _add_model_args(demo)
    _add_attribution_args(demo)
    demo.add_argument("--context", default=None,
                      help="your own context: a text file path (paragraphs separated by blank lines become "
                           "documents) or the text itself (default: the built-in context)")
    demo.add_argument("--question", default=None, help="your own question (default: the built-in one)")

    att = sub.add_parser("attribute", help="attribute a response to the sources of a context",
                         description="Score every source of a context for a (generated or given) response.")
    _add_model_args(att)
    _add_attribution_args(att)
    att.add_argument("--context", required=True, help="a text file path, or the context text itself")
    att.add_argument("--query", required=True, help="the question or instruction about the context")
    att.add_argument("--response", default=None, help="the response to attribute (default: generated greedily)")
    att.add_argument("--target", default=None,
                     help="character range START:END of the response to attribute (default: whole response)")

    col = sub.add_parser("collect", help="collect AT2 training data (resumable, shardable)",
                         description="Generate responses, read attention features and run random source "
                                     "ablations for every task; each finished example is written atomically to "
                                     "the store, so an interrupted run resumes where it stopped.")
    _add_model_args(col)
    col.add_argument("--tasks", required=True,
                     help="a .jsonl file of tasks ({'context', 'query', ['response']} per line) or 'squad:PATH' "
                          "for a SQuAD-format JSON file")
    col.add_argument("--store", required=True, help="the store directory (created, or resumed if it exists)")
    col.add_argument("--sources", default="sentence", choices=["token", "word", "sentence", "document"],
                     help="source granularity of the ablations (default: sentence)")
    col.add_argument("--mode", default="mask", choices=["mask", "remove"],
                     help="'mask' = ablate by masking the sources' keys in attention (positions kept, batched; "
                          "AT2's default) or 'remove' = delete the text and re-tokenise (default: mask)")
    col.add_argument("--output", default="logit_prob", choices=["logit_prob", "log_prob"],
                     help="target output measured under each ablation (default: logit_prob)")
    col.add_argument("--n-masks", type=int, default=32, help="random ablations per task (default: 32)")
    col.add_argument("--keep-prob", type=float, default=0.5, help="probability of keeping each source (default 0.5)")
    col.add_argument("--seed", type=int, default=0, help="seed of the masks and of the task order (default: 0)")
    col.add_argument("--limit", type=int, default=None, help="use only the first N tasks")
    col.add_argument("--shard-index", type=int, default=0, help="this process's shard (default: 0)")
    col.add_argument("--shard-count", type=int, default=1, help="number of shards splitting the tasks (default: 1)")
    col.add_argument("--batch-size", type=int, default=8, help="ablations per forward pass in mask mode (default 8)")
    col.add_argument("--max-new-tokens", type=int, default=48, help="generation budget per task (default: 48)")
    col.add_argument("--device", default="auto",
                     help="'auto' (cuda:LOCAL_RANK when CUDA is available, else cpu), 'cpu', 'cuda' or 'cuda:N'. "
                          "Under torchrun / accelerate launch each process collects its own shard of the tasks "
                          "(shard i %% WORLD_SIZE) into the shared store (default: auto)")

    tr = sub.add_parser("train", help="train an AT2 estimator on a collected store",
                        description="Fit per-head weights so that predicted ablation effects correlate "
                                    "(Pearson, per task) with the measured ones; prints held-out LDS.")
    tr.add_argument("--store", required=True, help="the store directory written by 'collect'")
    tr.add_argument("--out", required=True, help="estimator file to write (.safetensors)")
    tr.add_argument("--held-out", type=float, default=0.2,
                    help="fraction of examples (the highest indices) kept for held-out LDS (default: 0.2)")
    tr.add_argument("--steps", type=int, default=1000, help="optimisation steps (default: 1000)")
    tr.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate, cosine-decayed (default: 1e-3)")
    tr.add_argument("--batch-size", type=int, default=512, help="examples per step (default: 512)")
    tr.add_argument("--non-negative", action="store_true", help="constrain head weights to be >= 0")
    tr.add_argument("--seed", type=int, default=0, help="training seed (default: 0)")

    from at2_lens.evaluation.cli import add_evaluate_parser

    add_evaluate_parser(sub)

    from at2_lens.attattr.cli import add_attattr_parsers

    add_attattr_parsers(sub)
    return parser


def _read_text_arg(value: str) -> str:
    p = Path(value)
    if len(value) < 4096 and p.is_file():
        return p.read_text(encoding="utf-8")
    return value


def _documents(text: str) -> list[str]:
    docs = [d.strip() for d in text.replace("\r\n", "\n").split("\n\n") if d.strip()]
    return docs


def _print_result(result: Any, top: int) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]Response:[/bold] {result.response.strip()}")
    console.print(f"[bold]Method:[/bold] {result.method}\n")
    console.print(result)
    table = Table(title=f"Top {min(top, result.n_sources)} sources")
    table.add_column("rank", justify="right")
    table.add_column("score", justify="right")
    table.add_column("source")
    for r, (i, text, score) in enumerate(result.top_k(min(top, result.n_sources)), start=1):
        table.add_row(str(r), f"{score:.4f}", f"[{i}] {text.strip()}")
    console.print(table)


def _attribute(args: argparse.Namespace, task: Any) -> int:
    from at2_lens import load_model
    from at2_lens.at2.attribution import AT2Attribution
    from at2_lens.report import write_report

    model = load_model(args.model, backend=args.backend)
    from at2_lens.at2.pretrained import default_estimator_for

    estimator = args.estimator if args.estimator else default_estimator_for(model)
    at2 = AT2Attribution(model, estimator=estimator)
    target = None
    if getattr(args, "target", None):
        try:
            a, b = (int(x) for x in args.target.split(":"))
        except ValueError:
            raise At2LensError(f"--target: expected START:END character offsets, got {args.target!r}") from None
        target = (a, b)
    result = at2.attribute(task, target=target, max_new_tokens=args.max_new_tokens)
    _print_result(result, args.top)
    if args.html:
        path = write_report(args.html, result, at2.head_weights, title="at2_lens: AT2 attribution", query=task.query)
        print(f"HTML report written to {path.resolve()}")
    if args.json:
        from at2_lens._io import atomic_write_text

        atomic_write_text(args.json, json.dumps({
            "response": result.response, "target": result.target_text, "method": result.method,
            "sources": [{"index": i, "text": t, "score": float(s)}
                        for i, (t, s) in enumerate(zip(result.source_texts, result.scores.tolist(), strict=True))],
        }, indent=2, ensure_ascii=False))
        print(f"JSON scores written to {Path(args.json).resolve()}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from at2_lens.tasks import ContextTask
    from at2_lens.tasks.loaders import DEMO_CONTEXT, DEMO_QUESTION

    context = _documents(_read_text_arg(args.context)) if args.context else DEMO_CONTEXT
    question = args.question or DEMO_QUESTION
    print(f"Question: {question}")
    return _attribute(args, ContextTask(context=context, query=question, sources=args.sources))


def cmd_attribute(args: argparse.Namespace) -> int:
    from at2_lens.tasks import ContextTask

    context = _read_text_arg(args.context)
    task = ContextTask(context=_documents(context) if args.sources == "document" else context, query=args.query,
                       response=args.response, sources=args.sources)
    return _attribute(args, task)


def _load_tasks(spec: str, sources: str, limit: int | None, seed: int) -> list[Any]:
    from at2_lens.tasks.loaders import load_jsonl_tasks, squad_tasks

    if spec.startswith("squad:"):
        return squad_tasks(spec[len("squad:"):], limit=limit, seed=seed, sources=sources)
    tasks = load_jsonl_tasks(spec, sources=sources)
    return tasks[:limit] if limit is not None else tasks


def cmd_collect(args: argparse.Namespace) -> int:
    """Collect AT2 training data; under torchrun each process takes its shard and rank 0 reports when all are done."""
    from at2_lens import load_model
    from at2_lens.at2.collect import collect
    from at2_lens.distributed import DataParallel

    with DataParallel() as dp:
        shard_index, shard_count = dp.compose(args.shard_index, args.shard_count)
        device = dp.device(args.device)
        tasks = _load_tasks(args.tasks, args.sources, args.limit, args.seed)
        model = load_model(args.model, backend=args.backend, device=device)
        store = collect(model, tasks, args.store, mode=args.mode, output=args.output, n_masks=args.n_masks,
                        keep_prob=args.keep_prob, seed=args.seed, shard_index=shard_index,
                        shard_count=shard_count, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
        dp.barrier()  # every process's shard is written before rank 0 reports
        if dp.is_main:
            workers = f" by {dp.world_size} processes" if dp.is_distributed else ""
            print(f"{len(store)} examples in {store.root} ({len(tasks)} tasks){workers}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from at2_lens.at2.store import AblationStore
    from at2_lens.at2.training import train_estimator

    if not 0.0 <= args.held_out < 1.0:
        raise At2LensError(f"--held-out: expected a fraction in [0, 1), got {args.held_out}")
    store = AblationStore(args.store)
    examples = store.load()
    if len(examples) < 2:
        raise At2LensError(f"--store: {args.store} holds {len(examples)} examples; need at least 2")
    n_held = round(len(examples) * args.held_out)
    train, held = examples[: len(examples) - n_held], examples[len(examples) - n_held:]
    estimator, summary = train_estimator(
        train, held_out=held or None, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
        non_negative=args.non_negative, seed=args.seed, settings=store.settings,
    )
    estimator.save(args.out)
    print(f"estimator written to {Path(args.out).resolve()}")
    print(f"LDS train {summary.lds_train_init:.3f} -> {summary.lds_train:.3f}"
          + (f"; held-out {summary.lds_held_out_init:.3f} -> {summary.lds_held_out:.3f}"
             if summary.lds_held_out is not None else ""))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from at2_lens.evaluation.cli import cmd_evaluate as run

    return run(args)


def cmd_heads(args: argparse.Namespace) -> int:
    from at2_lens.attattr.cli import cmd_heads as run

    return run(args)


def cmd_tree(args: argparse.Namespace) -> int:
    from at2_lens.attattr.cli import cmd_tree as run

    return run(args)


COMMANDS = {
    "demo": cmd_demo,
    "attribute": cmd_attribute,
    "collect": cmd_collect,
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "heads": cmd_heads,
    "tree": cmd_tree,
}


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except At2LensError as exc:
        print(f"at2-lens {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
