"""The decoder head-study benchmark reprints its tables from the committed results files (``--table-only``), the same
tables the README quotes, without loading a model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.line_independent

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


@pytest.mark.parametrize("name", ["head_finders_small", "head_finders"])
def test_table_only_reprints_the_committed_tables(name: str) -> None:
    csv = RESULTS / f"{name}.csv"
    if not csv.is_file():
        pytest.skip(f"{csv} is not committed")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_head_finders.py"), "--table-only", "--out", str(csv)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == (RESULTS / f"{name}.md").read_text()
    for ranking in ("retrieval", "query_focus", "attattr", "at2"):
        assert f"| zero | {ranking} |" in proc.stdout
