"""Half precision on a GPU: AT2, AttAttr, collect and evaluate in bf16/fp16, timed and checked against CPU float32.

    python benchmarks/bench_gpu.py                                    # SmolLM2, bf16 and fp16 on cuda
    python benchmarks/bench_gpu.py --device cpu --dtype bfloat16 --model tiny     # a CPU smoke run

First everything runs once on the CPU in float32 (the reference: scores, AttAttr attributions, collected ablation
outputs, LDS). Then, for each ``--dtype`` on ``--device``, the same work on the same responses. Printed per method:
its time as a ratio to one plain forward pass in the same run on the same device and dtype, its time as a ratio to the
same method on the CPU in float32, and its agreement with the CPU float32 result (Spearman rank correlation; mean
over tasks). Never absolute seconds. Exits with a clear message when ``--device cuda`` is asked for and no CUDA device
is present.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

from scipy.stats import spearmanr  # noqa: E402

from at2_lens.at2.attribution import AT2Attribution  # noqa: E402
from at2_lens.at2.collect import collect  # noqa: E402
from at2_lens.attattr import AttentionAttribution  # noqa: E402
from at2_lens.backends import get_backend  # noqa: E402
from at2_lens.evaluation.runner import evaluate  # noqa: E402
from at2_lens.models import BACKEND_CHOICES, load_model, resolve_dtype  # noqa: E402
from at2_lens.tasks import ContextTask  # noqa: E402
from at2_lens.tasks.loaders import demo_task  # noqa: E402

EXTRA_TASKS = [
    ContextTask(
        context=["The committee met on Tuesday to review the annual budget.",
                 "Most of the increase came from a single conference in the spring.",
                 "The treasurer will present a revised plan next month."],
        query="Where did most of the increase come from?", sources="sentence",
    ),
    ContextTask(
        context=["Water boils at 100 degrees Celsius at sea level.", "Ice melts at 0 degrees.",
                 "Mount Everest is the highest mountain on Earth."],
        query="At what temperature does water boil?", sources="sentence",
    ),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2", help="smollm2 (default), minilm is not a decoder; or tiny")
    ap.add_argument("--backend", default="auto", choices=BACKEND_CHOICES)
    ap.add_argument("--device", default="cuda", help="where the half-precision runs go (default cuda)")
    ap.add_argument("--dtype", default="bfloat16,float16", help="comma-separated dtypes (default bfloat16,float16)")
    ap.add_argument("--tasks", type=int, default=2, help="tasks (1-3; the first is the demo task)")
    ap.add_argument("--masks", type=int, default=8, help="ablation masks per task for collect and evaluate")
    ap.add_argument("--steps", type=int, default=8, help="AttAttr integration steps")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats (medians)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    args = ap.parse_args(argv)
    args.dtypes = [resolve_dtype(d) for d in args.dtype.split(",") if d.strip()]
    if not 1 <= args.tasks <= 1 + len(EXTRA_TASKS):
        ap.error(f"--tasks: expected 1 to {1 + len(EXTRA_TASKS)}")
    return args


def check_device(device: str) -> None:
    """Stop with a clear message when the device is not there (before any model is loaded)."""
    kind = torch.device(device).type
    if kind == "cuda" and not torch.cuda.is_available():
        sys.exit(f"bench_gpu: --device {device} asked for, but no CUDA device is present (torch "
                 f"{torch.__version__}, CUDA build {torch.version.cuda}). For a CPU smoke run: "
                 "--device cpu --dtype bfloat16 --model tiny")


def load(args: argparse.Namespace, device: str, dtype: torch.dtype) -> Any:
    if args.model == "tiny":
        from at2_lens.models.tiny import load_tiny

        return load_tiny("llama", args.backend, device=device, dtype=dtype, n_layers=4, d_model=128,
                         n_ctx=1024)  # the demo prompt is longer in the tiny tokenizer's tokens
    try:
        return load_model(args.model, backend=args.backend, device=device, dtype=dtype)
    except Exception as err:  # missing wheel, wrong checksum, unsupported backend: report and stop
        sys.exit(f"--model {args.model}: could not load it ({type(err).__name__}: {err})")


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str, repeats: int) -> tuple[float, Any]:
    """Median seconds of ``fn`` after one untimed warm-up call, and its last result."""
    out = fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def rank_agreement(a: Any, b: Any) -> float:
    x, y = torch.as_tensor(a).detach().double().cpu().flatten(), torch.as_tensor(b).detach().double().cpu().flatten()
    if len(x) < 2 or float(x.std()) == 0.0 or float(y.std()) == 0.0:
        return float("nan")
    return float(spearmanr(x.numpy(), y.numpy()).statistic)


def run_all(model: Any, tasks: list[ContextTask], args: argparse.Namespace, device: str) -> dict[str, Any]:
    """Times (seconds, medians) and results of every method on ``model``."""
    backend = get_backend(model)
    at2 = AT2Attribution.for_model(model)
    prepared = [at2.attribute(t).task for t in tasks]
    ids = [tt.input_ids.to(backend.device) for tt in prepared]
    out: dict[str, Any] = {"time": {}, "result": {}}

    def forward() -> None:
        with torch.no_grad():
            for x in ids:
                backend.run(x[None])

    def at2_all() -> list[Any]:
        at2.clear_cache()  # each repeat pays its forward pass
        return [at2.attribute(tt).scores for tt in prepared]

    aa = AttentionAttribution(model)
    layers = sorted({0, backend.n_layers // 2, backend.n_layers - 1})

    def attattr_all() -> list[Any]:
        return [aa.attribute(x, None, layers=layers, n_steps=args.steps).attributions for x in ids]

    def collect_all() -> list[Any]:
        with tempfile.TemporaryDirectory(prefix="bench-gpu-") as d:
            store = collect(model, tasks, d, n_masks=args.masks, batch_size=args.masks, progress=False)
            return [ex.outputs for ex in store.load()]

    def evaluate_all() -> list[float]:
        df = evaluate({"AT2": at2}, prepared, metrics=["lds"], model=model, n_eval_masks=args.masks,
                      batch_size=args.masks, timing_repeats=1)
        return df.sort_values("task")["value"].tolist()

    for name, fn, repeats in (("forward", forward, args.repeats), ("AT2", at2_all, args.repeats),
                              ("AttAttr", attattr_all, 1), ("collect", collect_all, 1),
                              ("evaluate", evaluate_all, 1)):
        out["time"][name], out["result"][name] = timed(fn, device, repeats)
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_device(args.device)
    torch.manual_seed(0)
    ref_model = load(args, "cpu", torch.float32)
    # responses generated once, in float32 on the CPU, so every run attributes the same text
    base = [demo_task(), *EXTRA_TASKS][: args.tasks]
    at2 = AT2Attribution.for_model(ref_model)
    tasks = [dataclasses.replace(t, response=at2.attribute(t, max_new_tokens=args.max_new_tokens).task.response)
             for t in base]
    ref = run_all(ref_model, tasks, args, "cpu")
    del ref_model
    print(f"bench_gpu: model={args.model} device={args.device} tasks={len(tasks)} masks={args.masks} "
          f"steps={args.steps}; reference: CPU float32")
    print("| dtype | method | time / plain forward (same run) | time / CPU float32 | Spearman vs CPU float32 |")
    print("|---|---|---|---|---|")
    for dtype in args.dtypes:
        model = load(args, args.device, dtype)
        got = run_all(model, tasks, args, args.device)
        fwd = got["time"]["forward"]
        for name in ("forward", "AT2", "AttAttr", "collect", "evaluate"):
            t = got["time"][name]
            if name == "forward":
                agree = "—"
            elif name == "evaluate":  # one LDS per task: compare the values, not ranks
                diffs = [abs(a - b) for a, b in zip(got["result"][name], ref["result"][name], strict=True)]
                agree = f"max abs LDS difference {max(diffs):.3f}"
            else:
                rhos = [rank_agreement(a, b) for a, b in zip(got["result"][name], ref["result"][name], strict=True)]
                agree = f"{statistics.fmean(rhos):.3f}"
            print(f"| {str(dtype).removeprefix('torch.')} | {name} | {t / fwd:.2f} | "
                  f"{t / ref['time'][name]:.3f} | {agree} |")
        del model
        if torch.device(args.device).type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
