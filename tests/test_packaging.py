"""Packaging: optional dependencies behind extras (a clear error naming the extra, before any model work; nothing
imports them at module level), one version, and what the built wheel and sdist contain."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import pytest

import at2_lens
from at2_lens._optional import EXTRAS, require
from at2_lens.errors import At2LensError, OptionalDependencyError

pytestmark = pytest.mark.line_independent

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
OPTIONAL = tuple(EXTRAS)  # networkx, matplotlib, gguf, datasets


def _load_check_dist() -> Any:
    spec = importlib.util.spec_from_file_location("check_dist", ROOT / "scripts" / "check_dist.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _hide(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Make ``import name`` (and its submodules, even those already imported) fail as if it were not installed."""
    for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        monkeypatch.setitem(sys.modules, key, None)
    monkeypatch.setitem(sys.modules, name, None)


def _requirement_names(reqs: list[str]) -> set[str]:
    return {r.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0].split("!")[0].strip().lower()
            for r in reqs}


# ------------------------------------------------------------------------------------------- extras and metadata
def test_extras_in_pyproject_match_the_helper() -> None:
    project = PYPROJECT["project"]
    extras = project["optional-dependencies"]
    core = _requirement_names(project["dependencies"])
    for module, extra in EXTRAS.items():
        assert module not in core, f"{module} is optional (extra {extra!r}), not a core dependency"
        assert module in _requirement_names(extras[extra]), f"extra {extra!r} does not install {module}"
        assert module in _requirement_names(extras["all"]), f"extra 'all' does not install {module}"
        assert module in _requirement_names(extras["dev"]), f"extra 'dev' (the tests) does not install {module}"
    assert "build" in _requirement_names(extras["dev"])


def test_version_has_one_source() -> None:
    assert PYPROJECT["project"]["dynamic"] == ["version"]
    assert "version" not in PYPROJECT["project"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "at2_lens.__version__"}
    assert importlib.metadata.version("at2_lens") == at2_lens.__version__
    assert _load_check_dist().source_version(ROOT) == at2_lens.__version__


def test_licence_and_changelog() -> None:
    project = PYPROJECT["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert "## [Unreleased]" in changelog and f"## [{at2_lens.__version__}]" in changelog


# ------------------------------------------------------------------------------------------- missing optional modules
def test_require_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    _hide(monkeypatch, "networkx")
    with pytest.raises(OptionalDependencyError, match=r"^doing X needs networkx: pip install 'at2_lens\[graph\]'"):
        require("networkx", "graph", "doing X")
    err = OptionalDependencyError("x")
    assert isinstance(err, ImportError) and isinstance(err, At2LensError)
    assert require("json", "none", "reading JSON").dumps([]) == "[]"


def test_attribution_tree_without_networkx(monkeypatch: pytest.MonkeyPatch) -> None:
    from at2_lens.attattr.tree import attribution_tree

    _hide(monkeypatch, "networkx")
    # The check comes first: even a wrong result argument reports the missing package.
    with pytest.raises(OptionalDependencyError, match=r"attribution tree needs networkx: .*at2_lens\[graph\]"):
        attribution_tree(None, None)  # type: ignore[arg-type]


def test_plots_without_matplotlib(monkeypatch: pytest.MonkeyPatch) -> None:
    from at2_lens.attattr.head_importance import plot_pruning
    from at2_lens.attattr.tree import draw_attribution_tree

    _hide(monkeypatch, "matplotlib")
    with pytest.raises(OptionalDependencyError, match=r"drawing the attribution tree needs matplotlib: .*\[plot\]"):
        draw_attribution_tree(None)  # type: ignore[arg-type]
    with pytest.raises(OptionalDependencyError, match=r"head-pruning sweep needs matplotlib: .*at2_lens\[plot\]"):
        plot_pruning(None)  # type: ignore[arg-type]


def test_smollm2_without_gguf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from at2_lens.models import embedded, hf

    def no_model_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("model work started before the missing package was reported")

    monkeypatch.setenv("AT2_LENS_CACHE", str(tmp_path))  # an empty cache: the GGUF file would be dequantised
    monkeypatch.setattr(embedded, "smollm2_gguf_path", no_model_work)
    monkeypatch.setattr(embedded, "_dequantise_gguf", no_model_work)
    monkeypatch.setattr(hf, "load_hf_model", no_model_work)
    _hide(monkeypatch, "gguf")
    with pytest.raises(OptionalDependencyError, match=r"embedded SmolLM2 from its GGUF file needs gguf: .*\[smollm2\]"):
        embedded.load_smollm2()
    with pytest.raises(OptionalDependencyError, match=r"GGUF model file .* needs gguf: .*at2_lens\[smollm2\]"):
        hf.load_hf(tmp_path, gguf_file="model.gguf")


def test_cli_without_optional_packages(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from at2_lens.cli import heads, main, tree

    def no_model_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded before the missing package was reported")

    monkeypatch.setattr(tree, "load_classifier", no_model_work)
    monkeypatch.setattr(heads, "load_classifier", no_model_work)
    monkeypatch.setattr("at2_lens.models.classifier.load_sst2", no_model_work)
    _hide(monkeypatch, "networkx")
    assert main(["tree", "--text", "a good film"]) == 2
    assert "pip install 'at2_lens[graph]'" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "networkx", importlib.import_module("json"))  # any module: networkx "present"
    _hide(monkeypatch, "matplotlib")
    assert main(["tree", "--text", "a good film"]) == 2
    assert "pip install 'at2_lens[plot]'" in capsys.readouterr().err
    assert main(["heads"]) == 2
    assert "pip install 'at2_lens[plot]'" in capsys.readouterr().err


def _module_level_imports(tree: ast.Module) -> set[str]:
    """Top-level packages imported when the module is imported (``if TYPE_CHECKING:`` blocks excluded)."""
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
            elif isinstance(node, ast.If):
                if "TYPE_CHECKING" not in ast.unparse(node.test):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try | ast.With | ast.ClassDef):
                visit(node.body)
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)

    visit(tree.body)
    return found


def test_no_module_level_import_of_optional_packages() -> None:
    offenders = []
    for path in sorted((ROOT / "at2_lens").rglob("*.py")):
        imported = _module_level_imports(ast.parse(path.read_text(encoding="utf-8")))
        offenders += [f"{path.relative_to(ROOT)}: {name}" for name in sorted(imported & set(OPTIONAL))]
    assert not offenders, f"import these lazily with at2_lens._optional.require: {offenders}"


@pytest.mark.slow
def test_every_module_imports_without_networkx_and_gguf() -> None:
    # matplotlib cannot be hidden here: captum, a core dependency whose classes at2_lens's subclass, imports it.
    code = (
        "import sys, importlib, pkgutil\n"
        "sys.modules['networkx'] = None\nsys.modules['gguf'] = None\n"
        "import at2_lens\n"
        "names = [m.name for m in pkgutil.walk_packages(at2_lens.__path__, 'at2_lens.')]\n"
        "for name in names: importlib.import_module(name)\n"
        "for name in at2_lens.__all__: getattr(at2_lens, name)\n"
        "print(len(names))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.split()[-1]) > 50


# ------------------------------------------------------------------------------------------- the built wheel
def _fake_wheel(path: Path, version: str, extra: dict[str, str] | None = None, drop: tuple[str, ...] = ()) -> Path:
    check_dist = _load_check_dist()
    dist_info = f"at2_lens-{version}.dist-info"
    files = {f"at2_lens/{rel}": "" for rel in check_dist.REQUIRED_PACKAGE_FILES}
    files.update({
        f"{dist_info}/METADATA": f"Metadata-Version: 2.4\nName: at2_lens\nVersion: {version}\n"
                                 "License-Expression: Apache-2.0\n",
        f"{dist_info}/licenses/LICENSE": "",
        f"{dist_info}/entry_points.txt": "[console_scripts]\nat2-lens = at2_lens.cli:main\n",
    })
    files.update(extra or {})
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in files.items():
            if name not in drop:
                zf.writestr(name, text)
    return path


def test_wheel_checker_catches_what_does_not_belong(tmp_path: Path) -> None:
    check_dist = _load_check_dist()
    version = at2_lens.__version__
    no_git = tmp_path / "no_git"  # no git checkout: the tracked-files comparison is skipped
    (no_git / "at2_lens").mkdir(parents=True)
    (no_git / "at2_lens" / "__init__.py").write_text(f'__version__ = "{version}"\n')
    good = _fake_wheel(tmp_path / "good.whl", version)
    assert check_dist.check_wheel(good, no_git) == []
    bad = _fake_wheel(tmp_path / "bad.whl", version, drop=("at2_lens/estimators/smollm2-135m-instruct.safetensors",),
                      extra={"tests/test_x.py": "", "benchmarks/results/x.csv": "", "at2_lens/notes.ipynb": "",
                             "data/sst2/train.tsv": ""})
    problems = "\n".join(check_dist.check_wheel(bad, no_git))
    for needle in ("missing at2_lens/estimators/smollm2-135m-instruct.safetensors", "tests/test_x.py",
                   "benchmarks/results/x.csv", "at2_lens/notes.ipynb", "data/sst2/train.tsv"):
        assert needle in problems
    wrong_version = _fake_wheel(tmp_path / "old.whl", "0.0.1")
    assert "at2_lens.__version__" in check_dist.check_wheel(wrong_version, no_git)[0]


@pytest.mark.slow
def test_built_wheel_and_sdist(tmp_path: Path) -> None:
    """``python -m build`` (the dev extra) gives a wheel and an sdist that pass scripts/check_dist.py."""
    if importlib.util.find_spec("build") is None:
        pytest.skip("the build package (dev extra) is not installed")
    try:
        setuptools_major = int(importlib.metadata.version("setuptools").split(".")[0])
    except importlib.metadata.PackageNotFoundError:
        setuptools_major = 0
    if setuptools_major < 77:
        pytest.skip("building with --no-isolation needs setuptools >= 77 (PEP 639 licence metadata) installed")
    # --no-isolation: the environment's setuptools, no download; the wheel is built from the sdist in a temp dir.
    proc = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp_path), str(ROOT)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    check_dist = _load_check_dist()
    wheel, sdist = next(tmp_path.glob("*.whl")), next(tmp_path.glob("*.tar.gz"))
    assert check_dist.check_wheel(wheel) == []
    assert check_dist.check_sdist(sdist) == []
