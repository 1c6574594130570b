"""``at2-lens collect``: AT2 training data (attention features and random source ablations) into a store.

Resumable (every finished example is written atomically) and shardable (``--shard-index``/``--shard-count``, or one
shard per process under ``torchrun`` / ``accelerate launch``).
"""

from __future__ import annotations

import argparse
from typing import Any

from at2_lens._validate import check_fraction, check_int
from at2_lens.cli._args import (
    TASKS_HELP,
    add_max_new_tokens_arg,
    add_model_args,
    check_device,
    check_loaded_kind,
    check_model_kind,
    parse_tasks_spec,
)


def add_collect_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``collect`` sub-command to an ``argparse`` sub-parsers object and return its parser."""
    p = subparsers.add_parser("collect", help="collect AT2 training data (resumable, shardable)",
                              description="Generate responses, read attention features and run random source "
                                          "ablations for every task; each finished example is written atomically "
                                          "to the store, so an interrupted run resumes where it stopped.")
    add_model_args(p, default="smollm2", hooked_class="HookedTransformer",
                   model_help="'smollm2' (embedded, offline), a Hugging Face model id, or a local decoder model "
                              "directory",
                   device_help="Under torchrun / accelerate launch each process collects its own shard of the tasks "
                               "(shard i %% WORLD_SIZE) into the shared store, on cuda:LOCAL_RANK with 'auto' ")
    p.add_argument("--tasks", required=True, help=f"{TASKS_HELP}. squad and hotpot tasks are shuffled by --seed")
    p.add_argument("--store", required=True, help="the store directory (created, or resumed if it exists)")
    p.add_argument("--sources", default="sentence", choices=["token", "word", "sentence", "document"],
                   help="source granularity of the ablations (default: sentence)")
    p.add_argument("--mode", default="mask", choices=["mask", "remove"],
                   help="'mask' = ablate by masking the sources' keys in attention (positions kept, batched; "
                        "AT2's default) or 'remove' = delete the text and re-tokenise (default: mask)")
    p.add_argument("--output", default="logit_prob", choices=["logit_prob", "log_prob"],
                   help="target output measured under each ablation (default: logit_prob)")
    p.add_argument("--n-masks", type=int, default=32, help="random ablations per task (default: 32)")
    p.add_argument("--keep-prob", type=float, default=0.5, help="probability of keeping each source (default 0.5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the masks and of the task order (default: 0)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N tasks")
    p.add_argument("--shard-index", type=int, default=0, help="this process's shard (default: 0)")
    p.add_argument("--shard-count", type=int, default=1, help="number of shards splitting the tasks (default: 1)")
    p.add_argument("--batch-size", type=int, default=8, help="ablations per forward pass in mask mode (default 8)")
    add_max_new_tokens_arg(p, "per task whose response is generated")
    p.set_defaults(func=cmd_collect)
    return p


def load_tasks(spec: str, sources: str, limit: int | None, seed: int) -> list[Any]:
    """Tasks for ``--tasks`` (see ``TASKS_HELP``): SQuAD or HotpotQA shuffled by ``seed``, or a JSON Lines file."""
    from at2_lens.tasks.hotpot import hotpot_tasks
    from at2_lens.tasks.loaders import load_jsonl_tasks, squad_tasks

    if limit is not None:
        check_int("--limit", limit, minimum=1)
    kind, source = parse_tasks_spec(spec)
    if kind == "squad":
        return squad_tasks(source, limit=limit, seed=seed, sources=sources)
    if kind == "hotpot":
        return hotpot_tasks(source, limit=limit, seed=seed, sources=sources)
    tasks = load_jsonl_tasks(source, sources=sources)
    return tasks[:limit] if limit is not None else tasks


def cmd_collect(args: argparse.Namespace) -> int:
    """Collect AT2 training data; under torchrun each process takes its shard and rank 0 reports when all are done."""
    from at2_lens import load_model
    from at2_lens.at2.collect import collect
    from at2_lens.distributed import DataParallel

    check_model_kind(args.model, decoder=True, command="collect")
    check_device(args.device)
    for name in ("n_masks", "batch_size", "max_new_tokens", "shard_count"):
        check_int(f"--{name.replace('_', '-')}", getattr(args, name), minimum=1)
    check_int("--seed", args.seed, minimum=0)
    check_int("--shard-index", args.shard_index, minimum=0, maximum=args.shard_count - 1)
    check_fraction("--keep-prob", args.keep_prob)
    if args.limit is not None:
        check_int("--limit", args.limit, minimum=1)
    with DataParallel() as dp:
        shard_index, shard_count = dp.compose(args.shard_index, args.shard_count)
        device = dp.device(args.device)
        tasks = load_tasks(args.tasks, args.sources, args.limit, args.seed)
        model = load_model(args.model, backend=args.backend, device=device)
        check_loaded_kind(model, decoder=True, command="collect", name=args.model)
        store = collect(model, tasks, args.store, mode=args.mode, output=args.output, n_masks=args.n_masks,
                        keep_prob=args.keep_prob, seed=args.seed, shard_index=shard_index,
                        shard_count=shard_count, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
        dp.barrier()  # every process's shard is written before rank 0 reports
        if dp.is_main:
            workers = f" by {dp.world_size} processes" if dp.is_distributed else ""
            print(f"{len(store)} examples in {store.root} ({len(tasks)} tasks){workers}")
    return 0


__all__ = ["add_collect_parser", "cmd_collect", "load_tasks"]
