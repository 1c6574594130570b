"""``at2-lens`` checks its input before any model loads (issue #16): a mistyped ``--context`` file, a decoder command
given the MiniLM encoder, a malformed ``--target`` and other bad options fail with a message naming the option and
no model is loaded; ``--help`` texts print single ``%``; every command has ``--device``; one generation budget."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest

from at2_lens._defaults import DEFAULT_MAX_NEW_TOKENS
from at2_lens.cli import build_parser, main


@pytest.fixture
def no_loading(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every model loader replaced by one that records the call and fails: the list stays empty if none ran."""
    import at2_lens.models.embedded as embedded
    import at2_lens.models.hf as hf

    calls: list[str] = []

    def refuse(name: str) -> Any:
        def loader(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            raise AssertionError(f"{name} was called: a model loaded before the input was checked")
        return loader

    monkeypatch.setattr(embedded, "load_smollm2", refuse("load_smollm2"))
    monkeypatch.setattr(embedded, "load_minilm", refuse("load_minilm"))
    monkeypatch.setattr(hf, "load_hf", refuse("load_hf"))
    return calls


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    """``main(argv)`` exits 2 with an error naming every needle."""
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.mark.line_independent
def test_mistyped_context_file_is_an_error_not_text(no_loading: list[str], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    err = _fails(["attribute", "--context", str(tmp_path / "note.txt"), "--query", "q?", "--html", ""], capsys,
                 "--context", "note.txt", "--context-text")
    assert "names no file" in err
    _fails(["demo", "--context", "notes.txt", "--html", ""], capsys, "--context", "notes.txt")
    _fails(["attribute", "--context", str(tmp_path), "--query", "q?"], capsys, "--context", "is a directory")
    assert no_loading == []


@pytest.mark.line_independent
def test_context_and_context_text_are_exclusive_and_one_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    both = ["attribute", "--context", "a", "--context-text", "b", "--query", "q"]
    for argv in (["attribute", "--query", "q?"], both):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        assert "--context" in capsys.readouterr().err


@pytest.mark.line_independent
def test_context_file_and_stdin_are_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from at2_lens.cli.attribute import read_context

    parser = build_parser()
    note = tmp_path / "note.txt"
    note.write_text("The cat sat.\n\nThe dog ran.", encoding="utf-8")
    args = parser.parse_args(["attribute", "--context", str(note), "--query", "q?"])
    assert read_context(args) == "The cat sat.\n\nThe dog ran."
    monkeypatch.setattr("sys.stdin", io.StringIO("from stdin"))
    assert read_context(parser.parse_args(["attribute", "--context", "-", "--query", "q?"])) == "from stdin"
    assert read_context(parser.parse_args(["attribute", "--context-text", "note.txt", "--query", "q"])) == "note.txt"
    assert read_context(parser.parse_args(["demo"])) is None


@pytest.mark.parametrize("command", ["attribute", "demo", "prune", "collect", "evaluate"])
@pytest.mark.line_independent
def test_encoder_for_a_decoder_command_fails_before_loading(command: str, no_loading: list[str], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    extra = {"attribute": ["--context-text", "c.", "--query", "q?"], "demo": [],
             "prune": ["--context-text", "c.", "--query", "q?"],
             "collect": ["--tasks", str(tmp_path / "t.jsonl"), "--store", str(tmp_path / "s")],
             "evaluate": ["--tasks", str(tmp_path / "t.jsonl")]}[command]
    _fails([command, "--model", "minilm", *extra], capsys, "--model", "'minilm' is an encoder", "decoder",
           "'smollm2'")
    assert no_loading == []


@pytest.mark.parametrize("command", ["heads", "tree"])
@pytest.mark.line_independent
def test_decoder_for_an_encoder_command_fails_before_loading(command: str, no_loading: list[str],
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    extra = ["--text", "good film"] if command == "tree" else []
    _fails([command, "--model", "SmolLM2", *extra], capsys, "--model", "is a decoder", "encoder")
    assert no_loading == []


@pytest.mark.parametrize("target", ["5-9", "9:5", "a:b", "1:2:3", "-1:4", "3:3"])
@pytest.mark.line_independent
def test_malformed_target_fails_before_loading(target: str, no_loading: list[str],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    _fails(["attribute", "--context-text", "The cat sat.", "--query", "q?", f"--target={target}"], capsys,
           "--target", "START:END")
    assert no_loading == []


@pytest.mark.parametrize(("argv", "needles"), [
    (["attribute", "--context-text", "c.", "--query", "q?", "--device", "gpu0"], ("--device",)),
    (["attribute", "--context-text", "c.", "--query", "q?", "--estimator", "missing.safetensors"],
     ("--estimator", "missing.safetensors")),
    (["attribute", "--context-text", "c.", "--query", "q?", "--top", "0"], ("--top",)),
    (["attribute", "--context-text", "c.", "--query", "q?", "--max-new-tokens", "0"], ("--max-new-tokens",)),
    (["attribute", "--context-text", "c.", "--query", "q?", "--response", "abc", "--target", "1:9"], ("target",)),
    (["attribute", "--context-text", "c.", "--query", "  "], ("query",)),
    (["demo", "--device", "nope"], ("--device",)),
    (["demo", "--html", "."], ("--html", "is a directory")),
    (["attribute", "--context-text", "c.", "--query", "q?", "--json", "."], ("--json", "is a directory")),
    (["prune", "--context", "notes.txt", "--query", "q?"], ("--context", "notes.txt")),
    (["prune", "--context-text", "c.", "--query", "  "], ("query",)),
    (["prune", "--context-text", "  ", "--query", "q?"], ("context",)),
    (["prune", "--context-text", "c.", "--query", "q?", "--method", "at3"], ("--method", "at3")),
    (["prune", "--context-text", "c.", "--query", "q?", "--method", "loo", "--estimator", "e.safetensors"],
     ("--estimator",)),
    (["prune", "--context-text", "c.", "--query", "q?", "--estimator", "missing.safetensors"], ("--estimator",)),
    (["prune", "--context-text", "The cat sat. The dog ran.", "--query", "q?", "--k", "0"], ("--k",)),
    (["prune", "--context-text", "The cat sat. The dog ran.", "--query", "q?", "--k", "3"], ("--k", "at most 2")),
    (["prune", "--context-text", "The cat sat. The dog ran.", "--query", "q?", "--mass", "0"], ("--mass",)),
    (["prune", "--context-text", "The cat sat. The dog ran.", "--query", "q?", "--mass", "1.5"], ("--mass",)),
    (["prune", "--context-text", "c.", "--query", "q?", "--gold", " "], ("--gold",)),
    (["prune", "--context-text", "c.", "--query", "q?", "--max-new-tokens", "0"], ("--max-new-tokens",)),
    (["prune", "--context-text", "c.", "--query", "q?", "--json", "."], ("--json", "directory")),
    (["prune", "--context-text", "c.", "--query", "q?", "--device", "gpu0"], ("--device",)),
    (["collect", "--tasks", "t.jsonl", "--store", "s", "--keep-prob", "1.5"], ("--keep-prob",)),
    (["collect", "--tasks", "t.jsonl", "--store", "s", "--n-masks", "0"], ("--n-masks",)),
    (["collect", "--tasks", "t.jsonl", "--store", "s", "--shard-index", "2", "--shard-count", "2"],
     ("--shard-index",)),
    (["evaluate", "--tasks", "t.jsonl", "--methods", "at2,lool"], ("methods", "lool")),
    (["evaluate", "--tasks", "t.jsonl", "--ks", "0,3"], ("--ks",)),
    (["evaluate", "--tasks", "t.jsonl", "--estimator", "nope.safetensors"], ("--estimator",)),
    (["heads", "--model", "some/bert"], ("--head",)),
    (["tree", "--text", "ok", "--head", "missing.safetensors"], ("--head", "missing.safetensors")),
    (["tree", "--text", "ok", "--threads", "0"], ("--threads",)),
])
@pytest.mark.line_independent
def test_bad_options_fail_before_loading(argv: list[str], needles: tuple[str, ...], no_loading: list[str],
                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    _fails(argv, capsys, *needles)
    assert no_loading == []


def test_unknown_model_of_the_wrong_kind_is_refused_right_after_loading(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """A local encoder directory cannot be known before loading; it is refused right after, before any work."""
    from at2_lens.models.tiny import save_tiny

    bert = save_tiny("bert", tmp_path / "bert")
    out = tmp_path / "scores.json"
    _fails(["attribute", "--model", str(bert), "--context-text", "The cat sat.", "--query", "q?", "--response", "r",
            "--html", "", "--json", str(out)], capsys, "--model", "loaded as an encoder", "decoder")
    assert not out.exists()


@pytest.mark.line_independent
def test_help_texts_print_single_percent(capsys: pytest.CaptureFixture[str]) -> None:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name, parser in sub.choices.items():
        text = parser.format_help()
        assert "%%" not in text, name
    with pytest.raises(SystemExit):
        main(["heads", "--help"])
    out = capsys.readouterr().out
    assert "0 %, 10 %" in out and "%%" not in out


@pytest.mark.line_independent
def test_every_model_command_has_device_and_the_shared_model_options() -> None:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name, parser in sub.choices.items():
        options = {s for action in parser._actions for s in action.option_strings}
        if "--model" in options:
            assert {"--backend", "--device"} <= options, name
            device = next(a for a in parser._actions if "--device" in a.option_strings)
            assert device.default == "auto" and "cuda:N" in (device.help or ""), name


@pytest.mark.line_independent
def test_one_generation_budget_everywhere() -> None:
    """Every command's --max-new-tokens and every Python max_new_tokens default is DEFAULT_MAX_NEW_TOKENS."""
    from at2_lens import AT2Attribution
    from at2_lens.at2.collect import collect, collect_example
    from at2_lens.baselines import AverageAttention, ContextCite, GradientXInput, LeaveOneOut
    from at2_lens.evaluation.runner import evaluate
    from at2_lens.pruning import prune_and_reanswer
    from at2_lens.tasks import prepare_task

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    with_budget = []
    for name, parser in sub.choices.items():
        for action in parser._actions:
            if "--max-new-tokens" in action.option_strings:
                assert action.default == DEFAULT_MAX_NEW_TOKENS, name
                assert f"default: {DEFAULT_MAX_NEW_TOKENS}" in (action.help or ""), name
                with_budget.append(name)
    assert set(with_budget) == {"demo", "attribute", "prune", "collect", "evaluate"}
    funcs = [AT2Attribution.attribute, collect, collect_example, evaluate, prepare_task, AverageAttention.attribute,
             ContextCite.attribute, GradientXInput.attribute, LeaveOneOut.attribute, prune_and_reanswer]
    for f in funcs:
        assert inspect.signature(f).parameters["max_new_tokens"].default == DEFAULT_MAX_NEW_TOKENS, f.__qualname__
