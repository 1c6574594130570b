"""Peak memory of AT2 at long context, as a ratio to one plain forward pass (goal: <= 1.3 at 4,096 tokens).

    python benchmarks/bench_memory.py                      # SmolLM2-135M-Instruct, 4,096 tokens of SQuAD paragraphs
    python benchmarks/bench_memory.py --model tiny --tokens 400   # tiny random model, fast smoke run

Every measurement runs in a fresh subprocess that loads the model, builds the same long task, then resets the
process's peak-RSS counter (Linux ``/proc/self/clear_refs``) and runs one pass: (a) a plain forward pass over the
tokens (``no_grad``, full logits, what a user's own forward costs) or (b) AT2 feature extraction + attribution with
the shipped estimator. It reports the process peak RSS during the pass (weights included) and the working memory
(peak minus the RSS before the pass). On CUDA it reports ``torch.cuda.max_memory_allocated`` instead. Ratios are
between the two modes of the same run, never absolute numbers as the result.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

RESPONSE = "The answer is in the second paragraph."
MODES = ("forward", "at2")


def _paragraphs() -> tuple[list[str], str]:
    """Distinct paragraphs of the shipped SQuAD 2.0 subset in file order, and its first question."""
    from at2_lens.data import SQUAD_V2_DEV_SUBSET
    from at2_lens.tasks.loaders import squad_records

    records = squad_records(SQUAD_V2_DEV_SUBSET)
    return list(dict.fromkeys(r["context"] for r in records)), records[0]["question"]


def build_task(tokenizer: Any, n_tokens: int) -> Any:
    """A task whose prompt + response is about ``n_tokens`` tokens: documents added until the length is reached."""
    from at2_lens.tasks import ContextTask
    from at2_lens.tasks.sources import split_sentences

    def length(docs: list[str]) -> int:
        return ContextTask(context=docs, query=question, response=RESPONSE, sources="sentence").tokenize(
            tokenizer).seq_len

    paragraphs, question = _paragraphs()
    docs: list[str] = []
    for p in paragraphs:
        if length([*docs, p]) <= n_tokens:
            docs.append(p)
            continue
        part = ""  # the paragraph does not fit whole: add as many of its sentences as fit
        for a, b in split_sentences(p):
            if length([*docs, part + p[a:b]]) > n_tokens:
                break
            part += p[a:b] + " "
        if part.strip():
            docs.append(part.strip())
        break
    return ContextTask(context=docs, query=question, response=RESPONSE, sources="sentence")


def _status_kb(field: str) -> int:
    """A ``VmRSS``/``VmHWM`` line of /proc/self/status, in kB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def worker(mode: str, model_name: str, n_tokens: int) -> dict[str, Any]:
    """One measurement in this (fresh) process; returns the numbers as a dict."""
    import torch

    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    from at2_lens.at2.attribution import AT2Attribution
    from at2_lens.backends import get_backend

    if model_name == "tiny":
        from at2_lens.models.tiny import load_tiny

        model, estimator = load_tiny("llama", n_ctx=max(512, n_tokens + 64)), None
    else:
        from at2_lens import load_estimator
        from at2_lens.models import load_model

        model = load_model(model_name)
        estimator = load_estimator() if model_name == "smollm2" else None
    backend = get_backend(model)
    tokenized = build_task(backend.tokenizer, n_tokens).tokenize(backend.tokenizer)
    ids = tokenized.input_ids[None].to(backend.device)
    at2 = AT2Attribution(model, estimator=estimator)
    cuda = backend.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _status_kb("VmRSS") * 1024
        exact = _reset_peak()
    if mode == "forward":
        backend.run(ids)
    else:
        result = at2.attribute(tokenized)
        assert torch.isfinite(result.scores).all()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        how = "torch.cuda.max_memory_allocated"
    else:
        peak = _status_kb("VmHWM") * 1024 if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        how = "peak RSS (VmHWM after clear_refs)" if exact else "peak RSS since process start (ru_maxrss)"
    return {"mode": mode, "tokens": int(ids.shape[1]), "sources": tokenized.n_sources, "before": before,
            "peak": peak, "working": peak - before, "how": how, "model": backend.describe()}


def measure(mode: str, model_name: str, n_tokens: int) -> dict[str, Any]:
    """Run ``worker`` in a fresh subprocess (so earlier measurements cannot raise the peak)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, __file__, "--worker", mode, "--model", model_name, "--tokens", str(n_tokens)],
        check=True, capture_output=True, text=True, env=env, cwd=ROOT,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="'smollm2' (default), another model name, or 'tiny'")
    ap.add_argument("--tokens", type=int, default=4096, help="prompt + response length in tokens (default 4096)")
    ap.add_argument("--repeats", type=int, default=1, help="fresh-process measurements per mode (default 1)")
    ap.add_argument("--worker", choices=MODES, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.model, args.tokens)))
        return
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    for _ in range(args.repeats):
        for mode in MODES:  # alternate, so drift hits both modes
            runs[mode].append(measure(mode, args.model, args.tokens))
            print(f"  {mode}: {runs[mode][-1]}", file=sys.stderr, flush=True)
    med = {m: {k: statistics.median(r[k] for r in runs[m]) for k in ("before", "peak", "working")} for m in MODES}
    first = runs["at2"][0]
    print(f"model={first['model']} tokens={first['tokens']} sources={first['sources']} measured by {first['how']}, "
          f"{args.repeats} fresh process(es) per mode")
    print("| measurement | plain forward (MiB) | AT2 features + attribution (MiB) | ratio |")
    print("|---|---:|---:|---:|")
    for key, label in (("peak", "process peak during the pass"), ("working", "working memory (peak − before)")):
        a, b = med["forward"][key], med["at2"][key]
        print(f"| {label} | {a / 2**20:.0f} | {b / 2**20:.0f} | {b / a:.3f} |")


if __name__ == "__main__":
    main()
