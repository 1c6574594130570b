"""The ``at2-lens`` command line on a tiny model saved to disk (the same path a user's local model takes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from at2_lens.cli import build_parser, main
from at2_lens.models.tiny import save_tiny

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny("llama", tmp_path_factory.mktemp("tiny") / "model")


def _write_tasks(path: Path, n: int) -> Path:
    lines = [
        json.dumps({"context": ["The cat sat on the mat. Dogs bark.", f"Paris is in France. Item {i} is red."],
                    "query": f"Question {i}?", "response": "An answer."})
        for i in range(n)
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.line_independent
def test_every_option_is_explained() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) >= {"demo", "attribute", "collect", "train"}
    for name, p in sub.choices.items():
        for action in p._actions:
            if action.dest != "help":
                assert action.help and len(action.help) > 10, f"{name} {action.option_strings} lacks a help text"


def test_collect_train_attribute(tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tasks = _write_tasks(tmp_path / "tasks.jsonl", 6)
    store = tmp_path / "store"
    assert main(["collect", "--model", str(tiny_dir), "--tasks", str(tasks), "--store", str(store),
                 "--n-masks", "6"]) == 0
    assert len(list((store / "examples").glob("*.safetensors"))) == 6
    # Resuming a finished store does nothing and succeeds.
    assert main(["collect", "--model", str(tiny_dir), "--tasks", str(tasks), "--store", str(store),
                 "--n-masks", "6"]) == 0
    est = tmp_path / "est.safetensors"
    assert main(["train", "--store", str(store), "--out", str(est), "--steps", "20", "--held-out", "0.34"]) == 0
    assert est.is_file()
    out_json, out_html = tmp_path / "scores.json", tmp_path / "report.html"
    assert main(["attribute", "--model", str(tiny_dir), "--context-text", "The cat sat. The dog ran.",
                 "--query", "Who?", "--response", "The cat.", "--estimator", str(est), "--json", str(out_json),
                 "--html", str(out_html), "--target", "4:7"]) == 0
    data = json.loads(out_json.read_text())
    assert data["target"] == "cat" and len(data["sources"]) == 2 and data["method"] == "AT2"
    html = out_html.read_text()
    assert "at2-source" in html and "at2-heads" in html  # highlighted context and the head-weight heatmap
    printed = capsys.readouterr().out
    assert "HTML report written to" in printed and "LDS train" in printed


def test_collect_with_different_settings_is_refused(tiny_dir: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    tasks = _write_tasks(tmp_path / "tasks.jsonl", 2)
    store = tmp_path / "store"
    assert main(["collect", "--model", str(tiny_dir), "--tasks", str(tasks), "--store", str(store),
                 "--n-masks", "4"]) == 0
    assert main(["collect", "--model", str(tiny_dir), "--tasks", str(tasks), "--store", str(store),
                 "--n-masks", "5"]) == 2
    assert "n_masks" in capsys.readouterr().err


def test_bad_input_is_a_clear_error(tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["attribute", "--model", str(tiny_dir), "--context-text", "   ", "--query", "q?", "--response", "r",
                 "--html", ""]) == 2
    assert "context" in capsys.readouterr().err
    assert main(["collect", "--model", str(tiny_dir), "--tasks", str(tmp_path / "nope.jsonl"),
                 "--store", str(tmp_path / "s")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["attribute", "--model", str(tmp_path / "missing"), "--context-text", "c.", "--query", "q?",
                 "--html", ""]) == 2


@pytest.mark.line_independent
def test_help_is_instant_and_lists_commands() -> None:
    out = subprocess.run([sys.executable, "-m", "at2_lens.cli", "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0 and "collect" in out.stdout and "train" in out.stdout


@pytest.mark.real
def test_demo_on_smollm2(smollm2: object, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "demo.html"
    assert main(["demo", "--html", str(report)]) == 0
    out = capsys.readouterr().out
    assert "8,849" in out  # SmolLM2 answers the built-in question from the context
    html = report.read_text()
    assert "Mount Everest" in html and "at2-source" in html and "at2-heads" in html
