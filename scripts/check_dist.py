"""Check what the built wheel and sdist of at2_lens contain (used by ``scripts/check_wheel.sh`` and the tests).

The wheel must hold the package, its shipped artefacts (estimator and classifier head with their model cards, the
packaged data, ``py.typed``), the licence and metadata whose version is ``at2_lens.__version__``, and nothing from
the repository around it (tests, benchmarks and their CSV results, notebooks, scripts, the repository's ``data/``).
Every file git tracks under ``at2_lens/`` must be in it, so package data cannot be left out silently. The sdist
must hold the same package plus README, LICENSE, CHANGELOG and pyproject.toml, and not the repository's data.

    python scripts/check_dist.py dist/at2_lens-0.1.0-py3-none-any.whl dist/at2_lens-0.1.0.tar.gz
"""

from __future__ import annotations

import ast
import email.parser
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Files the quick start and the shipped-artefact loaders need, relative to the package directory.
REQUIRED_PACKAGE_FILES = (
    "__init__.py",
    "py.typed",
    "cli/__init__.py",
    "estimators/smollm2-135m-instruct.safetensors",
    "estimators/smollm2-135m-instruct.md",
    "classifier_heads/minilm_sst2.safetensors",
    "classifier_heads/minilm_sst2.md",
    "classifier_heads/minilm_sst2_finetuned.safetensors",
    "classifier_heads/minilm_sst2_finetuned.md",
    "data/README.md",
    "data/squad_v2/dev_subset.json",
    "data/sst2/validation.tsv",
)
# Top-level folders of the repository that must never be shipped in the wheel.
REPO_ONLY_DIRS = ("tests", "benchmarks", "notebooks", "scripts", "data", "docs", ".ci")
# Suffixes that mark repository-only files (results tables, notebooks, compiled files).
FORBIDDEN_SUFFIXES = (".csv", ".ipynb", ".pyc", ".pyo")
SDIST_TOP_FILES = ("README.md", "LICENSE", "CHANGELOG.md", "pyproject.toml", "PKG-INFO")


def source_version(root: Path = ROOT) -> str:
    """``at2_lens.__version__`` read from the source without importing the package."""
    tree = ast.parse((root / "at2_lens" / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__version__" for t in node.targets):
            return str(ast.literal_eval(node.value))
    raise AssertionError("at2_lens/__init__.py defines no __version__")


def tracked_package_files(root: Path = ROOT) -> list[str] | None:
    """Files git tracks under ``at2_lens/`` (paths relative to the package), or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "ls-files", "at2_lens"], cwd=root, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return [p.removeprefix("at2_lens/") for p in out.stdout.split() if p]


def _metadata(text: str) -> email.message.Message:
    return email.parser.Parser().parsestr(text)


def check_wheel(path: Path, root: Path = ROOT) -> list[str]:
    """Problems with the wheel at ``path`` (an empty list when it is right)."""
    problems: list[str] = []
    version = source_version(root)
    with zipfile.ZipFile(path) as zf:
        names = [n for n in zf.namelist() if not n.endswith("/")]
        dist_info = f"at2_lens-{version}.dist-info"
        meta_name = f"{dist_info}/METADATA"
        if meta_name not in names:
            return [f"no {meta_name} (is the metadata version {version}, as at2_lens.__version__?)"]
        meta = _metadata(zf.read(meta_name).decode("utf-8"))
        entry_points = zf.read(f"{dist_info}/entry_points.txt").decode("utf-8") if (
            f"{dist_info}/entry_points.txt" in names) else ""
    if meta["Version"] != version:
        problems.append(f"metadata version {meta['Version']} != at2_lens.__version__ {version}")
    if meta["License-Expression"] != "Apache-2.0":
        problems.append(f"License-Expression is {meta['License-Expression']!r}, expected 'Apache-2.0'")
    if f"{dist_info}/licenses/LICENSE" not in names:
        problems.append("the LICENSE file is not in the wheel's .dist-info/licenses/")
    if "at2-lens = at2_lens.cli:main" not in entry_points:
        problems.append("the at2-lens console script is not declared")
    package = {n.removeprefix("at2_lens/") for n in names if n.startswith("at2_lens/")}
    for rel in REQUIRED_PACKAGE_FILES:
        if rel not in package:
            problems.append(f"missing at2_lens/{rel}")
    tracked = tracked_package_files(root)
    if tracked is not None:
        problems += [f"git-tracked at2_lens/{rel} is not in the wheel" for rel in sorted(set(tracked) - package)]
    for name in names:
        top = name.split("/", 1)[0]
        if top not in ("at2_lens", dist_info):
            problems.append(f"unexpected top-level entry {name}")
        if top in REPO_ONLY_DIRS:
            problems.append(f"repository-only file {name}")
        if name.endswith(FORBIDDEN_SUFFIXES) or "__pycache__" in name:
            problems.append(f"forbidden file {name}")
        if name.startswith("at2_lens/data/") and name.endswith("train.tsv"):
            problems.append(f"SST-2 train belongs to the repository's data/, not the wheel: {name}")
    return problems


def check_sdist(path: Path, root: Path = ROOT) -> list[str]:
    """Problems with the sdist at ``path`` (an empty list when it is right)."""
    problems: list[str] = []
    version = source_version(root)
    prefix = f"at2_lens-{version}/"
    with tarfile.open(path) as tf:
        names = [m.name for m in tf.getmembers() if m.isfile()]
        pkg_info = tf.extractfile(prefix + "PKG-INFO") if prefix + "PKG-INFO" in names else None
        meta_version = _metadata(pkg_info.read().decode("utf-8"))["Version"] if pkg_info else None
    if meta_version != version:
        problems.append(f"PKG-INFO version {meta_version} != at2_lens.__version__ {version}")
    inside = {n.removeprefix(prefix) for n in names if n.startswith(prefix)}
    problems += [f"not under {prefix}: {n}" for n in names if not n.startswith(prefix)]
    for rel in SDIST_TOP_FILES:
        if rel not in inside:
            problems.append(f"missing {rel}")
    for rel in REQUIRED_PACKAGE_FILES:
        if f"at2_lens/{rel}" not in inside:
            problems.append(f"missing at2_lens/{rel}")
    for rel in sorted(inside):
        top = rel.split("/", 1)[0]
        if top in ("data", "benchmarks", "notebooks") or rel.endswith(FORBIDDEN_SUFFIXES) or "__pycache__" in rel:
            problems.append(f"repository-only or forbidden file {rel}")
    return problems


def main(argv: list[str]) -> int:
    """Check each ``.whl`` / ``.tar.gz`` given; print the wheel's file list summary; exit 1 on any problem."""
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    failed = False
    for arg in argv:
        path = Path(arg)
        problems = check_wheel(path) if path.suffix == ".whl" else check_sdist(path)
        size = path.stat().st_size
        if problems:
            failed = True
            print(f"FAIL {path.name} ({size / 1024:.0f} KiB):", *problems, sep="\n  ", file=sys.stderr)
        else:
            print(f"ok   {path.name} ({size / 1024:.0f} KiB)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
