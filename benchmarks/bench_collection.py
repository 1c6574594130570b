"""AT2 training-data collection throughput: ablated sequences per second as a ratio to plain forward passes.

    python benchmarks/bench_collection.py                  # SmolLM2-135M-Instruct, ~300-token prompt, 32 masks
    python benchmarks/bench_collection.py --model tiny     # tiny random model, smoke run

Collection's cost is its mask-mode ablations: ``n_masks`` sequences per example, batched, each with every layer's
attention masked to the kept sources. This times ``mask_mode_outputs`` on a batch against plain forward passes over
the same tokens in the same batch shape (no hooks), interleaved in one run, and prints the ratio of their
throughputs (goal: >= 0.85), so a collection's cost on any machine is its forward-pass cost divided by that ratio.
"""

from __future__ import annotations

import argparse
import os
import warnings

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

from at2_lens.ablation import mask_mode_outputs, random_masks  # noqa: E402
from at2_lens.backends import get_backend  # noqa: E402
from at2_lens.tasks import prepare_task  # noqa: E402

from _timing import interleaved_ratio  # noqa: E402
from bench_at2 import build_task, load_bench_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="'smollm2' (default) or 'tiny'")
    ap.add_argument("--tokens", type=int, default=300, help="approximate prompt length in tokens (default 300)")
    ap.add_argument("--n-masks", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    model = load_bench_model(args.model)
    backend = get_backend(model)
    task = prepare_task(backend, build_task(backend.tokenizer, min(args.tokens, backend.n_ctx - 100)))
    sources, target = list(task.source_token_ranges), task.target_token_range
    masks = random_masks(len(sources), args.n_masks, 0.5, seed=0, index=0)
    ids = task.input_ids

    def ablated() -> None:
        mask_mode_outputs(model, ids, sources, target, masks, batch_size=args.batch_size)

    def plain() -> None:
        for start in range(0, args.n_masks, args.batch_size):
            n = min(args.batch_size, args.n_masks - start)
            backend.run(ids[None].expand(n, -1))

    _, _, time_ratio = interleaved_ratio(ablated, plain, repeats=args.repeats)
    throughput_ratio = 1.0 / time_ratio
    print(f"model={backend.describe()} tokens={ids.shape[0]} sources={len(sources)} masks={args.n_masks} "
          f"batch={args.batch_size}")
    print("| measurement | ratio |")
    print("|---|---|")
    print(f"| ablated sequences/s ÷ plain forward sequences/s | {throughput_ratio:.3f} |")
    print(f"goal >= 0.85: {'met' if throughput_ratio >= 0.85 else 'NOT met'}")


if __name__ == "__main__":
    main()
