"""Attribution methods by name, for the ``evaluate`` command and the benchmark.

Names: ``at2`` (AT2 with an estimator file, else the estimator shipped for the model, else uniform weights,
reported as ``at2_uniform`` because it is then plain average attention), ``at2_refined{K}`` (AT2 refined by K
ablations, default 8; mask mode unless suffixed ``_remove``), ``avg_attention``,
``last_layer_attention``, ``loo`` / ``loo_remove``, ``contextcite`` / ``contextcite{N}`` (N ablations, default 32;
``_remove`` suffix for text removal), ``gradxinput``, ``ig`` / ``ig{N}`` (N integration steps, default 20).
Labels are canonical: ``loo_mask`` is reported as ``loo``, ``contextcite`` as ``contextcite32``, ``ig`` as ``ig20``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from at2_lens.errors import InputError
from at2_lens.evaluation._names import METHOD_HELP

if TYPE_CHECKING:
    from at2_lens.ablation import AblationMode

_CC = re.compile(r"^contextcite(\d+)?(?:_(mask|remove))?$")
_LOO = re.compile(r"^loo(?:_(mask|remove))?$")
_IG = re.compile(r"^ig(\d+)?$")
_REFINED = re.compile(r"^at2_refined(\d+)?(?:_(mask|remove))?$")


def build_method(
    model: Any,
    name: str,
    *,
    estimator: str | Path | Any = None,
    mode: AblationMode = "mask",
    batch_size: int = 8,
    seed: int = 0,
) -> tuple[str, Any]:
    """``(label, attribution object)`` for a method name (see the module docstring); ``mode`` is the default
    ablation of ``loo`` and ``contextcite`` when the name carries no ``_mask``/``_remove`` suffix."""
    from at2_lens import AT2Attribution, AT2Refined
    from at2_lens.ablation import check_mode
    from at2_lens.baselines import (
        AverageAttention,
        ContextCite,
        GradientXInput,
        IntegratedGradientsAttribution,
        LastLayerAttention,
        LeaveOneOut,
    )

    mode = check_mode(mode)
    key = name.strip().lower()
    if key == "at2":
        at2 = AT2Attribution.for_model(model, estimator)
        return ("at2_uniform" if at2.uses_uniform_weights else "at2"), at2
    if m := _REFINED.match(key):
        n, m_mode = int(m.group(1) or 8), m.group(2) or mode
        return _label(f"at2_refined{n}", m_mode), AT2Refined(
            model, estimator, n, mode=m_mode, batch_size=batch_size, seed=seed
        )
    if key == "avg_attention":
        return key, AverageAttention(model)
    if key == "last_layer_attention":
        return key, LastLayerAttention(model)
    if key == "gradxinput":
        return key, GradientXInput(model)
    if m := _LOO.match(key):
        m_mode = m.group(1) or mode
        return _label("loo", m_mode), LeaveOneOut(model, mode=m_mode, batch_size=batch_size)
    if m := _CC.match(key):
        n, m_mode = int(m.group(1) or 32), m.group(2) or mode
        return _label(f"contextcite{n}", m_mode), ContextCite(model, n, mode=m_mode, batch_size=batch_size, seed=seed)
    if m := _IG.match(key):
        n = int(m.group(1) or 20)
        return f"ig{n}", IntegratedGradientsAttribution(model, n)
    raise InputError(f"methods: unknown method {name!r}; choose from {', '.join(METHOD_HELP)}")


def check_method_names(names: Sequence[str]) -> None:
    """Refuse an unknown method name without building anything (so the CLI checks ``--methods`` before loading)."""
    simple = {"at2", "avg_attention", "last_layer_attention", "gradxinput"}
    for name in names:
        key = name.strip().lower()
        if key not in simple and not any(r.match(key) for r in (_REFINED, _LOO, _CC, _IG)):
            raise InputError(f"methods: unknown method {name!r}; choose from {', '.join(METHOD_HELP)}")
    if not [n for n in names if n.strip()]:
        raise InputError("methods: expected at least one method name")


def _label(stem: str, mode: str) -> str:
    """Canonical label: mask-mode ablations carry no suffix, remove-mode ones ``_remove``."""
    return stem if mode == "mask" else f"{stem}_remove"


def build_methods(
    model: Any,
    names: Sequence[str],
    *,
    estimator: str | Path | Any = None,
    mode: AblationMode = "mask",
    batch_size: int = 8,
    seed: int = 0,
) -> dict[str, Any]:
    """``{label: attribution object}`` for several method names, in order; duplicate labels are refused."""
    out: dict[str, Any] = {}
    for name in names:  # each build checks the mode
        label, method = build_method(model, name, estimator=estimator, mode=mode, batch_size=batch_size, seed=seed)
        if label in out:
            raise InputError(f"methods: {name!r} duplicates the method {label!r}")
        out[label] = method
    if not out:
        raise InputError("methods: expected at least one method name")
    return out
