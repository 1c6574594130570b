"""The GPU check script: a CPU smoke run on the tiny model prints every method's ratios and agreement, and asking
for CUDA where there is none stops with a clear message."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "benchmarks" / "bench_gpu.py")


def test_bench_gpu_cpu_smoke_run() -> None:
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--device", "cpu", "--dtype", "bfloat16", "--model", "tiny", "--tasks", "1",
         "--masks", "4", "--steps", "2", "--repeats", "1"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for method in ("forward", "AT2", "AttAttr", "collect", "evaluate"):
        row = re.search(rf"^\| bfloat16 \| {method} \| ([0-9.]+) \| ([0-9.]+) \| (.+) \|$", proc.stdout, re.M)
        assert row is not None, (method, proc.stdout)
        assert float(row.group(1)) > 0 and float(row.group(2)) > 0  # ratios measured in the run, not seconds
    at2 = re.search(r"^\| bfloat16 \| AT2 \| [0-9.]+ \| [0-9.]+ \| ([0-9.]+) \|$", proc.stdout, re.M)
    assert at2 is not None and float(at2.group(1)) >= 0.9  # bf16 ranks the sources as float32 does


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
@pytest.mark.line_independent
def test_bench_gpu_without_cuda_says_so() -> None:
    proc = subprocess.run([sys.executable, SCRIPT, "--model", "tiny"], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert proc.returncode != 0
    assert "no CUDA device is present" in proc.stderr and "--device cpu" in proc.stderr
