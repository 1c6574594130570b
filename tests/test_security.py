"""Security: nothing at2_lens loads can execute code.

(a) A static scan of the package source (``ast``, so docstrings and comments that *mention* pickle do not count):
no pickle-family imports (``pickle``, ``dill``, ``cloudpickle``, ``joblib``, ``shelve``, ``marshal``), no
``torch.load`` without ``weights_only=True``, no ``trust_remote_code=True``, no ``eval``/``exec`` builtins, no
``allow_pickle=True`` and no ``pandas.read_pickle``. The scanner is itself tested on snippets it must flag.

(b) Pickle-bearing files whose payload would create a marker file when unpickled (a plain pickle, a ``torch.save`` zip
archive, a legacy ``torch.save`` file, each also under a ``.safetensors`` name) are handed to every loader of the
library: estimator files (``load_estimator_file``, ``load_estimator``, ``AT2Attribution(estimator=path)``), ablation
store examples (``read_example``, ``AblationStore.read``), the classifier head (``read_head``) and a local model
directory (``load_model``). Every one refuses with its own error class and the marker never appears.
"""

from __future__ import annotations

import ast
import io
import pickle
import textwrap
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import at2_lens

PACKAGE = Path(at2_lens.__file__).resolve().parent
PICKLE_MODULES = frozenset({"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"})


# ------------------------------------------------------------------------------------------------ (a) static scan
def _is_true(node: ast.expr) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _dotted(node: ast.expr) -> str:
    """``torch.load`` for ``Attribute(Name('torch'), 'load')``; '' for anything that is not a dotted name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def unsafe_constructs(source: str, filename: str = "<string>") -> list[str]:
    """Every construct in ``source`` that could execute code from loaded data, as ``file:line: what``."""
    found: list[str] = []
    tree = ast.parse(source, filename=filename)
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PICKLE_MODULES:
                    found.append(f"{where}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            if (node.module or "").split(".")[0] in PICKLE_MODULES:
                found.append(f"{where}: from {node.module} import ...")
            for alias in node.names:
                if alias.name in ("load", "read_pickle") and node.module in ("torch", "pandas"):
                    found.append(f"{where}: from {node.module} import {alias.name}")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            keywords = {k.arg: k.value for k in node.keywords if k.arg is not None}
            if name in ("eval", "exec", "builtins.eval", "builtins.exec", "__import__"):
                found.append(f"{where}: {name}(...)")
            if name.endswith("torch.load") and not _is_true(keywords.get("weights_only", ast.Constant(False))):
                found.append(f"{where}: {name}(...) without weights_only=True")
            if name.endswith("read_pickle"):
                found.append(f"{where}: {name}(...)")
            for key in ("trust_remote_code", "allow_pickle"):
                if key in keywords and not (isinstance(keywords[key], ast.Constant) and keywords[key].value is False):
                    found.append(f"{where}: {name}(..., {key}=<not False>)")
    return found


@pytest.mark.parametrize(
    "snippet",
    [
        "import pickle",
        "import dill as d",
        "from joblib import load",
        "import torch\ntorch.load('x.pt')",
        "import torch\ntorch.load('x.pt', weights_only=False)",
        "from transformers import AutoModel\nAutoModel.from_pretrained('x', trust_remote_code=True)",
        "AutoTokenizer.from_pretrained('x', trust_remote_code=flag)",
        "eval('1 + 1')",
        "exec('x = 1')",
        "import numpy as np\nnp.load('x.npy', allow_pickle=True)",
        "import pandas as pd\npd.read_pickle('x.pkl')",
    ],
)
@pytest.mark.line_independent
def test_scanner_flags_unsafe_code(snippet: str) -> None:
    assert unsafe_constructs(snippet), f"the scanner missed: {snippet!r}"


@pytest.mark.parametrize(
    "snippet",
    [
        '"""Pickle files are refused; never torch.load them; trust_remote_code=True is refused."""',
        "import torch\ntorch.load('x.pt', weights_only=True)",
        "model.eval()",
        "AutoModel.from_pretrained('x', trust_remote_code=False)",
        "np.load('x.npy', allow_pickle=False)",
        "# import pickle",
    ],
)
@pytest.mark.line_independent
def test_scanner_accepts_safe_code(snippet: str) -> None:
    assert unsafe_constructs(snippet) == []


@pytest.mark.line_independent
def test_package_source_has_no_code_execution_paths() -> None:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20  # the scan really covers the package
    found = [hit for f in files for hit in unsafe_constructs(f.read_text(encoding="utf-8"), str(f.relative_to(PACKAGE)))
             ]
    assert found == [], "unsafe constructs in at2_lens:\n" + "\n".join(found)


# ------------------------------------------------------------------------------------------- (b) payload files
class Payload:
    """Unpickling this object calls ``Path.touch(marker)``: if the marker exists, something unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def _plain_pickle(marker: Path) -> bytes:
    return pickle.dumps({"weights": Payload(marker)}, protocol=4)


def _torch_zip(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save({"weights": torch.ones(2, 2), "x": Payload(marker)}, buf)
    return buf.getvalue()


def _torch_legacy(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save({"weights": torch.ones(2, 2), "x": Payload(marker)}, buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


PAYLOADS: dict[str, Callable[[Path], bytes]] = {
    "pickle": _plain_pickle,
    "torch-zip": _torch_zip,
    "torch-legacy": _torch_legacy,
}


@pytest.fixture(params=[(kind, suffix) for kind in PAYLOADS for suffix in (".pkl", ".safetensors")],
                ids=lambda p: f"{p[0]}{p[1]}")
def evil_file(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, Path]:
    """(path of a payload file, marker the payload would create)."""
    kind, suffix = request.param
    marker = tmp_path / "payload_ran.marker"
    path = tmp_path / f"evil{suffix}"
    path.write_bytes(PAYLOADS[kind](marker))
    assert not marker.exists()
    return path, marker


@pytest.mark.line_independent
def test_payloads_really_execute_when_unpickled(tmp_path: Path) -> None:
    """The control: each payload does create its marker when loaded unsafely, so its absence below means something."""
    for kind, make in PAYLOADS.items():
        marker = tmp_path / f"{kind}.marker"
        data = make(marker)
        if kind == "pickle":
            pickle.loads(data)  # deliberate, the control case
        else:
            torch.load(io.BytesIO(data), weights_only=False)  # deliberate, the control case
        assert marker.exists(), kind
    with zipfile.ZipFile(io.BytesIO(_torch_zip(tmp_path / "z"))) as zf:
        assert any(n.endswith(".pkl") for n in zf.namelist())


def _loaders(tiny_llama: Any, tmp_path: Path) -> dict[str, tuple[Callable[[Path], Any], type[Exception]]]:
    from at2_lens import AT2Attribution
    from at2_lens.at2.estimator import load_estimator_file
    from at2_lens.at2.pretrained import load_estimator
    from at2_lens.at2.store import AblationStore, StoreSettings, read_example
    from at2_lens.errors import EstimatorFileError, ModelLoadError, StoreError
    from at2_lens.models.classifier import read_head

    settings = StoreSettings(model_fingerprint={}, n_layers=2, n_heads=4, ablation_mode="mask",
                             output_type="logit_prob", granularity="sentence", n_masks=4, keep_prob=0.5, seed=0)
    store = AblationStore(tmp_path / "store", settings)

    def store_read(path: Path) -> Any:
        store.path_for(0).write_bytes(path.read_bytes())
        return store.read(0)

    return {
        "load_estimator_file": (load_estimator_file, EstimatorFileError),
        "load_estimator": (lambda p: load_estimator(p, model=tiny_llama), EstimatorFileError),
        "AT2Attribution(estimator=path)": (lambda p: AT2Attribution(tiny_llama, estimator=p), EstimatorFileError),
        "read_example": (read_example, StoreError),
        "AblationStore.read": (store_read, StoreError),
        "read_head": (read_head, ModelLoadError),
    }


LOADERS = ["load_estimator_file", "load_estimator", "AT2Attribution(estimator=path)", "read_example",
           "AblationStore.read", "read_head"]


@pytest.mark.parametrize("loader", LOADERS)
def test_every_loader_refuses_pickle_payloads(tiny_llama: Any, tmp_path: Path, evil_file: tuple[Path, Path],
                                              loader: str) -> None:
    path, marker = evil_file
    fn, error = _loaders(tiny_llama, tmp_path)[loader]
    with pytest.raises(error) as info:
        fn(path)
    assert type(info.value) is error
    assert "pickle" in str(info.value), str(info.value)
    assert not marker.exists(), f"{loader} executed the payload in {path.name}"


@pytest.mark.parametrize("use_safetensors", [None, False])
def test_model_directory_with_pickled_weights_is_refused(tmp_path: Path, use_safetensors: bool | None) -> None:
    """A local model directory whose only weights are a pickle payload named ``pytorch_model.bin``: refused by
    default (safetensors only); with ``use_safetensors=False`` transformers loads with ``weights_only=True``, which
    refuses the payload too. Either way the payload never runs."""
    from at2_lens.errors import ModelLoadError
    from at2_lens.models import load_model
    from at2_lens.models.tiny import save_tiny

    directory = save_tiny("llama", tmp_path / "model")
    for weights in directory.glob("*.safetensors"):
        weights.unlink()
    marker = tmp_path / "payload_ran.marker"
    (directory / "pytorch_model.bin").write_bytes(_torch_zip(marker))
    kwargs = {} if use_safetensors is None else {"use_safetensors": use_safetensors}
    with pytest.raises(ModelLoadError) as info:
        load_model(str(directory), backend="bridge", **kwargs)
    assert str(directory) in str(info.value)
    if use_safetensors is False:
        assert "weights_only=True" in str(info.value)
    assert not marker.exists(), "loading the model directory executed the pickle payload"


def test_trust_remote_code_is_refused() -> None:
    from at2_lens.errors import InputError
    from at2_lens.models import load_model

    with pytest.raises(InputError, match="trust_remote_code"):
        load_model("some/model", trust_remote_code=True)


@pytest.mark.line_independent
def test_scan_source_text_of_this_check_is_strict() -> None:
    """The package scan parses files with ``ast``: a syntax error would hide code from it, so it must raise."""
    with pytest.raises(SyntaxError):
        unsafe_constructs(textwrap.dedent("def broken(:\n    pass"))
