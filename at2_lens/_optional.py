"""Optional dependencies: the packages only some features need, each installed by one of at2_lens's extras.

``require(module, extra, feature)`` imports ``module`` when a feature is used (never at import time), or raises
:class:`~at2_lens.errors.OptionalDependencyError` saying which extra installs it. ``EXTRAS`` maps every optional
module to its extra; ``pyproject.toml`` declares the same extras (a test checks they agree).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from at2_lens.errors import OptionalDependencyError

EXTRAS: dict[str, str] = {
    "matplotlib": "plot",  # head-pruning plots, attribution-tree drawings
    "networkx": "graph",  # AttAttr attribution trees
    "gguf": "smollm2",  # reading GGUF files: the embedded SmolLM2 ships as one
    "datasets": "hub",  # Hugging Face dataset names as task sources (tasks/hub.py gives its own HubDatasetError)
    "circuitsvis": "circuitsvis",  # CircuitsVis views (at2_lens/viz.py)
}
"""Top-level optional module -> the extra of ``pyproject.toml`` that installs it."""

# The distribution name pip installs, where it differs from the module's name (none at present).
_DISTRIBUTIONS: dict[str, str] = {}


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Import ``module`` for ``feature``, or raise an error naming the extra that installs it.

    Args:
        module: a dotted module name, e.g. ``"matplotlib.figure"``; its top-level package is what is missing.
        extra: the at2_lens extra that installs it (``"plot"``, ``"graph"``, ``"smollm2"``).
        feature: what the caller was doing, for the message (``"drawing the attribution tree"``).

    Raises:
        OptionalDependencyError: the module cannot be imported (an ``ImportError``, so ``except ImportError``
            still catches it).
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        package = _DISTRIBUTIONS.get(top, top)
        raise OptionalDependencyError(
            f"{feature} needs {package}: pip install 'at2_lens[{extra}]' ({type(exc).__name__}: {exc})"
        ) from exc
