"""``at2-lens prune``: prune a context to the sources the answer relies on and answer again (tiny model saved to disk,
the path a user's local model takes; one real SmolLM2 run on the demo question)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from at2_lens._defaults import DEFAULT_MASS
from at2_lens.cli import main
from at2_lens.models.tiny import save_tiny
from at2_lens.tasks.loaders import DEMO_CONTEXT, DEMO_QUESTION

CONTEXT = "Paris is in France. Berlin is in Germany. Rome is in Italy. Madrid is in Spain."


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny("llama", tmp_path_factory.mktemp("tiny") / "model")


def _check_result_file(data: dict[str, Any], n_sources: int) -> None:
    """The JSON result is complete and consistent: kept and removed partition the sources, the pruned context holds
    the kept texts and none of the removed ones, and the kept sources are the highest-scoring ones."""
    assert {"model", "method", "query", "rule", "value", "n_sources", "kept", "removed", "sources", "context",
            "pruned_context", "old_answer", "new_answer", "max_new_tokens"} <= set(data)
    assert data["n_sources"] == n_sources == len(data["sources"])
    assert sorted(data["kept"] + data["removed"]) == list(range(n_sources)) and data["kept"]
    texts = {s["index"]: s["text"] for s in data["sources"]}
    assert all(texts[i] in data["pruned_context"] for i in data["kept"])
    assert not any(texts[i] in data["pruned_context"] for i in data["removed"])
    assert [s["kept"] for s in data["sources"]] == [i in data["kept"] for i in range(n_sources)]
    scores = {s["index"]: s["score"] for s in data["sources"]}
    if data["removed"]:
        assert min(scores[i] for i in data["kept"]) >= max(scores[i] for i in data["removed"])


def test_prune_by_k_prints_both_answers_and_writes_json(tiny_dir: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sub" / "result.json"
    assert main(["prune", "--model", str(tiny_dir), "--context-text", CONTEXT, "--query", "Where is Rome?",
                 "--k", "2", "--gold", "Italy", "--gold", "in Italy", "--max-new-tokens", "6",
                 "--json", str(out)]) == 0
    data = json.loads(out.read_text(encoding="utf-8"))
    _check_result_file(data, 4)
    assert data["rule"] == "top_k" and data["value"] == 2 and len(data["kept"]) == 2
    assert data["method"] == "at2_uniform"  # no estimator ships for the tiny model
    assert data["golds"] == ["Italy", "in Italy"] and set(data["answer_scores"]) == {"old", "new"}
    assert set(data["answer_scores"]["new"]) == {"exact_match", "f1", "contains"}
    assert [p.name for p in out.parent.iterdir()] == ["result.json"]  # no temporary file left
    captured = capsys.readouterr()
    printed = captured.out
    for needle in ("Old answer (full context):", "New answer (pruned context):", "Removed sources: [",
                   "Sources by score", "exact match", "kept 2 of 4 sources"):
        assert needle in printed, needle
    assert "answering again over the 2 kept of 4 sources" in captured.err  # progress on stderr


def test_prune_by_default_mass_reads_stdin_documents(tiny_dir: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    docs = ["The cat sat on the mat. It was warm.", "Dogs bark at night.", "Rome is in Italy. It is old."]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n\n".join(docs)))
    out = tmp_path / "result.json"
    assert main(["prune", "--model", str(tiny_dir), "--context", "-", "--sources", "document", "--query",
                 "Where is Rome?", "--method", "avg_attention", "--max-new-tokens", "4", "--json", str(out)]) == 0
    data = json.loads(out.read_text(encoding="utf-8"))
    _check_result_file(data, 3)
    assert data["rule"] == "mass" and data["value"] == DEFAULT_MASS and data["method"] == "avg_attention"
    assert [s["text"] for s in data["sources"]] == docs
    assert "golds" not in data and "exact match" not in capsys.readouterr().out


def test_prune_errors_name_the_argument_and_write_nothing(tiny_dir: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "result.json"
    out.write_text("an earlier result", encoding="utf-8")
    base = ["prune", "--model", str(tiny_dir), "--query", "Where?", "--json", str(out)]
    # --k larger than the number of token sources is only known from the tokenizer: refused before generating
    assert main([*base, "--context-text", "Rome is old.", "--sources", "token", "--k", "50"]) == 2
    assert "k: expected at most" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # one rule only
        main([*base, "--context-text", CONTEXT, "--k", "1", "--mass", "0.5"])
    assert "--mass" in capsys.readouterr().err
    assert out.read_text(encoding="utf-8") == "an earlier result"  # untouched
    assert main(["prune", "--model", str(tiny_dir), "--context-text", CONTEXT, "--query", "Where?", "--json",
                 str(out / "x.json")]) == 2  # a folder of the path is a file: refused before loading
    assert "is a file, not a folder" in capsys.readouterr().err


@pytest.mark.real
@pytest.mark.slow
def test_prune_the_demo_question_on_smollm2(smollm2: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """On the demo question, AT2 (shipped estimator) keeps the sentences about Everest's height; SmolLM2's answer
    over the pruned context still gives the height, and the Eiffel Tower and Great Wall sentences are listed as
    removed."""
    import at2_lens.models

    monkeypatch.setattr(at2_lens.models, "load_model", lambda *a, **k: smollm2)  # the session's model, not a reload
    note = tmp_path / "demo.txt"
    note.write_text("\n\n".join(DEMO_CONTEXT), encoding="utf-8")
    out = tmp_path / "demo.json"
    assert main(["prune", "--context", str(note), "--query", DEMO_QUESTION, "--mass", "0.8", "--gold", "8,849",
                 "--max-new-tokens", "24", "--json", str(out)]) == 0
    data = json.loads(out.read_text(encoding="utf-8"))
    _check_result_file(data, 9)
    assert data["method"] == "at2" and 1 <= len(data["kept"]) < 9
    assert "8,849" in data["pruned_context"] and "Eiffel" not in data["pruned_context"]
    removed = [s["text"] for s in data["sources"] if not s["kept"]]
    assert any("Eiffel" in t for t in removed) and any("Great Wall" in t for t in removed)
    assert "8,849" in data["old_answer"] and "8,849" in data["new_answer"]
    assert data["answer_scores"]["new"]["contains"] == 1.0
    assert "Removed sources:" in capsys.readouterr().out
