"""The collection-throughput benchmark runs and reports a ratio measured in the same run (tiny model: a smoke run;
the README's 0.891 comes from SmolLM2)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.line_independent

ROOT = Path(__file__).resolve().parents[1]


def test_collection_benchmark_prints_a_throughput_ratio() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_collection.py"), "--model", "tiny", "--repeats", "1",
         "--n-masks", "8", "--batch-size", "4"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    match = re.search(r"plain forward sequences/s \| ([0-9.]+) \|", proc.stdout)
    assert match is not None, proc.stdout
    assert 0.05 < float(match.group(1)) < 5.0  # a ratio of two timings in one run, not an absolute time
    assert "masks=8 batch=4" in proc.stdout and "goal >= 0.85" in proc.stdout
