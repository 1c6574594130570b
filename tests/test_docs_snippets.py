"""Every code block of README.md and docs/**/*.md is exercised by the suite (issue #16).

Rules (also stated in docs/index.md's source, next to the first block):

- ``python`` blocks run, top to bottom, each file's blocks in one namespace (a later block may use an earlier one's
  names, as a reader would), in a fresh temporary directory (so files they write land there; a ``notes.txt``
  context is put there for the snippets that read one). ``load_model("smollm2")`` / ``load_model("minilm")`` return
  the session's already loaded real models instead of loading them again; nothing else is swapped. Marked ``real``.
- ``bash`` blocks: every ``at2-lens ...`` line, and the arguments after ``-m at2_lens.cli``, must parse with the
  ``at2-lens`` parser (parse only: nothing runs); ``make TARGET`` must be a Makefile target and ``python FILE`` an
  existing file. Lines with placeholders (``...``, ``$VAR``) and other shell lines are not checked.
- An HTML comment right before a block adjusts it, visibly in the markdown source:
  ``<!-- no-test: REASON -->`` skips the block (at most ``MAX_EXEMPTIONS`` in all), and
  ``<!-- test-replace: OLD => NEW -->`` runs the block with ``OLD`` replaced by ``NEW`` (to shrink a 200-task loop to
  3, say); an ``OLD`` that is not in the block fails the test, so markers cannot go stale.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.line_independent

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
MAX_EXEMPTIONS = 2
NOTES = ("The lease was signed on 3 May 2021.\n\nThe contract was signed by Ada Lovelace for the buyer. "
         "Charles Babbage signed for the seller.\n\nPayment is due within 30 days.\n")

_MARKER = re.compile(r"^\s*<!--\s*(no-test|test-replace):\s*(.*?)\s*-->\s*$")


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    skip: str | None = None
    replace: list[tuple[str, str]] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    def runnable(self) -> str:
        code = self.code
        for old, new in self.replace:
            assert old in code, f"{self.where}: test-replace marker {old!r} is not in the block"
            code = code.replace(old, new)
        return code


def read_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a markdown file with the markers right before each."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        fence = lines[i].strip()
        if not fence.startswith("```"):
            i += 1
            continue
        indent = len(lines[i]) - len(lines[i].lstrip())
        start = i
        i += 1
        body = []
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][indent:])
            i += 1
        block = Block(path, start + 1, fence[3:].strip().lower(), "\n".join(body) + "\n")
        j = start - 1
        while j >= 0 and (m := _MARKER.match(lines[j])):
            if m.group(1) == "no-test":
                assert m.group(2), f"{block.where}: no-test needs a reason"
                block.skip = m.group(2)
            else:
                old, sep, new = m.group(2).partition(" => ")
                assert sep, f"{block.where}: expected <!-- test-replace: OLD => NEW -->"
                block.replace.append((old, new))
            j -= 1
        blocks.append(block)
        i += 1
    return blocks


ALL_BLOCKS = [b for path in DOC_FILES for b in read_blocks(path)]
PYTHON_FILES = sorted({b.path for b in ALL_BLOCKS if b.lang == "python"})


def test_blocks_are_found_and_exemptions_stay_few() -> None:
    assert {"python", "bash"} >= {b.lang for b in ALL_BLOCKS}, "a block of another language needs a rule here"
    assert len([b for b in ALL_BLOCKS if b.lang == "python"]) >= 15
    skipped = [f"{b.where} ({b.skip})" for b in ALL_BLOCKS if b.skip]
    assert len(skipped) <= MAX_EXEMPTIONS, skipped
    for b in ALL_BLOCKS:
        b.runnable()  # every test-replace marker still matches its block
        if b.lang == "python" and not b.skip:
            compile(b.runnable(), b.where, "exec")


def _command_lines(block: Block) -> list[list[str]]:
    """The block's shell lines (continuations joined, comments dropped) as argument lists."""
    out = []
    for line in block.runnable().replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words:
            out.append(words)
    return out


def test_bash_command_lines_parse() -> None:
    from at2_lens.cli import build_parser

    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    checked = 0
    for block in [b for b in ALL_BLOCKS if b.lang == "bash" and not b.skip]:
        for words in _command_lines(block):
            if words[0] == "make":
                for target in words[1:]:
                    assert re.search(rf"^{re.escape(target)}:", makefile, re.MULTILINE), f"{block.where}: {words}"
                continue
            if words[0] == "python":
                assert (ROOT / words[1]).is_file(), f"{block.where}: {words[1]} does not exist"
                continue
            if words[0] == "at2-lens":
                args = words[1:]
            elif "at2_lens.cli" in words:
                args = words[words.index("at2_lens.cli") + 1:]
            else:
                continue
            if any("..." in a or "$" in a for a in args):
                continue  # a placeholder, not a command line
            try:
                build_parser().parse_args(args)
            except SystemExit as exc:
                pytest.fail(f"{block.where}: 'at2-lens {shlex.join(args)}' does not parse (exit {exc.code})")
            checked += 1
    assert checked >= 8


@pytest.fixture
def session_models(smollm2: Any, minilm: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """``load_model("smollm2" | "minilm")`` returns the session's loaded model (the ``smollm2``/``minilm``
    fixtures); any other name loads as usual."""
    import at2_lens
    import at2_lens.models

    original = at2_lens.models.load_model
    loaded = {"smollm2": smollm2, "minilm": minilm}

    def load_model(name_or_path: str = "smollm2", *args: Any, **kwargs: Any) -> Any:
        key = str(name_or_path).strip().lower()
        default_place = kwargs.get("backend", "auto") == "auto" and str(kwargs.get("device", "cpu")) == "cpu"
        if key in ("smollm2", "minilm") and not args and set(kwargs) <= {"backend", "device"} and default_place:
            return loaded[key]
        return original(name_or_path, *args, **kwargs)

    monkeypatch.setattr(at2_lens.models, "load_model", load_model)
    monkeypatch.setattr(at2_lens, "load_model", load_model)


@pytest.mark.real
@pytest.mark.parametrize("path", PYTHON_FILES, ids=[str(p.relative_to(ROOT)) for p in PYTHON_FILES])
def test_python_blocks_run(path: Path, session_models: None, tmp_path: Path,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text(NOTES, encoding="utf-8")
    namespace: dict[str, Any] = {"__name__": "__docs__"}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for block in [b for b in read_blocks(path) if b.lang == "python" and not b.skip]:
            try:
                exec(compile(block.runnable(), block.where, "exec"), namespace)
            except Exception as exc:
                raise AssertionError(f"{block.where}: the block raised {type(exc).__name__}: {exc}") from exc
    finally:
        torch.set_num_threads(threads)
        plt.close("all")
    assert not any(p.is_relative_to(ROOT) for p in [Path.cwd()])  # ran in the temporary directory
