"""The public surface stays put: every name in ``at2_lens.__all__`` imports, and every ``at2-lens`` sub-command answers
``--help`` with all of its options (the contract a layout change must keep)."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

import at2_lens
from at2_lens.cli import build_parser, main

pytestmark = pytest.mark.line_independent  # no TransformerLens model or backend code runs here

ROOT = Path(__file__).resolve().parents[1]

# Every sub-command and every option it takes, as users call them. A missing option is a broken command line.
_MODEL = ["--model", "--backend", "--device"]
_ATTRIBUTION = [*_MODEL, "--estimator", "--sources", "--top", "--per-sentence", "--max-new-tokens", "--html", "--json",
                "--save"]
_CLASSIFIER = [*_MODEL, "--classifier", "--head", "--threads"]
SUBCOMMANDS: dict[str, list[str]] = {
    "demo": [*_ATTRIBUTION, "--context", "--context-text", "--question"],
    "attribute": [*_ATTRIBUTION, "--context", "--context-text", "--query", "--response", "--target"],
    "prune": [*_MODEL, "--context", "--context-text", "--query", "--sources", "--method", "--estimator", "--k",
              "--mass", "--gold", "--max-new-tokens", "--json"],
    "collect": [*_MODEL, "--tasks", "--store", "--sources", "--mode", "--output", "--n-masks", "--keep-prob", "--seed",
                "--limit", "--shard-index", "--shard-count", "--batch-size", "--max-new-tokens"],
    "train": ["--store", "--out", "--held-out", "--steps", "--lr", "--batch-size", "--non-negative", "--seed"],
    "convert-estimator": [*_MODEL, "--out"],
    "evaluate": [*_MODEL, "--tasks", "--split", "--limit", "--sources", "--methods", "--estimator", "--metrics",
                 "--n-eval-masks", "--ks", "--kendall-k", "--mode", "--output", "--n-permutations",
                 "--adversarial-steps", "--adversarial-layers", "--tolerance", "--seed", "--batch-size",
                 "--max-new-tokens", "--out", "--summary", "--quiet"],
    "heads": [*_CLASSIFIER, "--data-dir", "--n-importance", "--n-eval", "--methods", "--n-fractions", "--n-steps",
              "--target", "--batch-size", "--seed", "--csv", "--plot", "--importance-json", "--random-draws",
              "--stability-csv", "--no-progress"],
    "tree": [*_CLASSIFIER, "--text", "--threshold", "--n-steps", "--roots", "--out", "--save"],
}
# ``at2-lens heads --study decoder`` (at2_lens/cli/heads_decoder.py) adds its own options to ``heads``.
SUBCOMMANDS["heads"] = [*SUBCOMMANDS["heads"], "--study", "--finders", "--how", "--k", "--n-random", "--n-needle-train",
                        "--n-squad-train", "--n-attattr", "--n-needle", "--n-squad", "--n-sentences", "--n-reference",
                        "--answer-tokens", "--ablation-batch-size", "--out"]


@pytest.mark.parametrize("name", at2_lens.__all__)
def test_every_public_name_imports(name: str) -> None:
    obj = getattr(at2_lens, name)
    if name == "__version__":
        assert isinstance(obj, str) and obj
        return
    assert callable(obj), f"at2_lens.{name} is not a class or function"
    assert obj.__module__.startswith("at2_lens."), f"at2_lens.{name} comes from {obj.__module__}"
    namespace: dict[str, object] = {}
    exec(f"from at2_lens import {name}", namespace)  # the spelling users write
    assert namespace[name] is obj


def test_user_cache_and_own_tokens_names_are_public() -> None:
    """Issue #18: attribution from the user's cache and from the user's own tokens is reachable from ``at2_lens``."""
    for name in ("cache_filter", "CachedPatterns", "TokenizedTask"):
        assert name in at2_lens.__all__
    assert callable(at2_lens.TokenizedTask.from_tokens)


def test_circuitsvis_helper_is_public() -> None:
    """Issue #18: the CircuitsVis views are reachable from ``at2_lens`` (CircuitsVis itself stays optional)."""
    assert "top_heads_attention" in at2_lens.__all__
    assert at2_lens.top_heads_attention.__module__ == "at2_lens.viz"
    assert callable(at2_lens.SourceAttribution.to_circuitsvis)


def test_star_import_gives_all() -> None:
    assert len(set(at2_lens.__all__)) == len(at2_lens.__all__)
    namespace: dict[str, object] = {}
    exec("from at2_lens import *", namespace)
    assert set(at2_lens.__all__) <= set(namespace)


def test_parser_has_exactly_the_known_subcommands() -> None:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert list(sub.choices) == list(SUBCOMMANDS)
    for name, parser in sub.choices.items():
        options = {s for action in parser._actions for s in action.option_strings} - {"-h", "--help"}
        assert options == set(SUBCOMMANDS[name]), name
        assert parser.get_default("func") is not None, f"{name} has no command function"


@pytest.mark.parametrize("name", list(SUBCOMMANDS))
def test_every_subcommand_answers_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: at2-lens {name}")
    for option in SUBCOMMANDS[name]:
        assert option in text, f"at2-lens {name} --help does not mention {option}"


def test_top_level_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert name in text


def test_console_script_points_at_main() -> None:
    (script,) = importlib.metadata.entry_points(group="console_scripts", name="at2-lens")
    assert script.value == "at2_lens.cli:main"
    assert script.load() is main


def test_help_imports_no_heavy_library() -> None:
    """``--help`` must stay instant: building the parser imports neither torch nor TransformerLens nor pandas."""
    code = ("import sys; from at2_lens.cli import build_parser; build_parser();"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformer_lens', 'transformers', "
            "'pandas'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_module_entry_runs_a_subcommand_help() -> None:
    """``python -m at2_lens.cli`` (what torchrun and accelerate launch run) reaches the same sub-commands."""
    out = subprocess.run([sys.executable, "-m", "at2_lens.cli", "evaluate", "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert out.returncode == 0 and "--n-eval-masks" in out.stdout
