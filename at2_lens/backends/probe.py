"""A cheap run-time probe of what a model lets us do with its attention.

TransformerLens classes differ in which attention hooks fire, in which order, and which edits take effect (some
bridges drop ``hook_pattern`` edits with a warning, some silently; the TL 4.x BERT bridge fires ``hook_pattern``
only after the attention output was computed). Rather than trusting version numbers, a few forward passes on six
tokens measure it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from at2_lens.interventions import pattern_from_qk, z_from_pattern

if TYPE_CHECKING:
    from at2_lens.backends.backend import Backend

_PROBE_LEN = 6
_TOL = 1e-4  # the float32 (and float64) tolerance of "equal"; coarser dtypes get a few of their own ulps
_ZERO = 1e-8  # the float32 (and float64) bound below which an attention weight counts as masked


@dataclass(frozen=True)
class AttentionProbe:
    """What the probe measured on layer 0 of one model.

    ``z_route`` is how the ``hook_z`` fallback obtains the pattern: ``"pattern"`` when ``hook_pattern`` fires
    before ``hook_z``, ``"qk"`` when it fires after but ``softmax(q·kᵀ/√d)`` reproduces it, else None.
    """

    pattern_readable: bool
    causal: bool
    pattern_editable: bool
    z_equals_pattern_v: bool
    z_route: Literal["pattern", "qk"] | None
    z_editable: bool


def _probe_tokens(backend: Backend) -> Tensor:
    # Ids spread over the vocabulary, deterministic, avoiding id 0 (often padding).
    n = min(_PROBE_LEN, backend.n_ctx)
    return torch.linspace(1, backend.d_vocab - 1, n).long()[None]


def _eps(*tensors: Tensor) -> float:
    """Machine epsilon of the coarsest floating dtype among ``tensors``."""
    return max(float(torch.finfo(t.dtype).eps) for t in tensors if t.is_floating_point())


def _close(a: Tensor, b: Tensor, *, strict: bool = False) -> bool:
    """Equal up to rounding in the coarser of the two dtypes (compared in float32, on their device).

    ``strict`` uses the float32 tolerance whatever the dtype: for "did this edit change anything", where a dropped
    edit reruns the same computation and gives the same numbers, while a real one may move a float16 output by
    less than its rounding tolerance on a small random model.
    """
    if a.shape != b.shape:
        return False
    tol = _TOL if strict else max(_TOL, 4 * _eps(a, b))
    return bool(torch.allclose(a.float(), b.to(a.device).float(), atol=tol, rtol=tol))


def zero_tolerance(dtype: torch.dtype) -> float:
    """The largest attention weight that still counts as masked for a pattern in ``dtype``: 1e-8 in float32
    and float64, a tenth of an ulp at 1 in float16/bfloat16 (where 1e-8 itself rounds to 0)."""
    info = torch.finfo(dtype)
    return _ZERO if info.bits >= 32 else 0.1 * float(info.eps)


def _qk_pattern(base: dict[str, Tensor], causal: bool) -> Tensor:
    """``softmax(q·kᵀ/√d)`` from the recorded ``hook_q``/``hook_k``, in float32."""
    return pattern_from_qk(base["q"].float(), base["k"].float(), causal)


@torch.no_grad()
def probe_attention(backend: Backend) -> AttentionProbe:
    """Measure readability, causality, hook order and editability of layer 0's attention."""
    tokens = _probe_tokens(backend)
    names = {
        "p": backend.pattern_hook(0),
        "q": backend.q_hook(0),
        "k": backend.k_hook(0),
        "v": backend.v_hook(0),
        "z": backend.z_hook(0),
    }
    seen: dict[str, Tensor] = {}
    order: list[str] = []

    def reader(key: str) -> Any:
        def hook(x: Tensor, hook: Any) -> None:
            seen[key] = x.detach().clone()
            order.append(key)

        return hook

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base_out = backend.run(tokens, [(name, reader(key)) for key, name in names.items()])
        if "p" not in seen:
            return AttentionProbe(False, False, False, False, None, False)
        pattern, base = seen["p"], dict(seen)
        upper = torch.triu(torch.ones(pattern.shape[-2:], dtype=torch.bool, device=pattern.device), diagonal=1)
        # compared in float32: a float16 pattern's exact zeros are not < float16(1e-8), which is 0
        causal = bool(pattern[..., upper].abs().max().float() <= zero_tolerance(pattern.dtype))

        # references in float32, from the model's own (possibly float16) tensors
        z_equals = (
            "v" in base and "z" in base and _close(z_from_pattern(pattern.float(), base["v"].float()), base["z"])
        )
        z_route: Literal["pattern", "qk"] | None = None
        if z_equals:
            if order.index("p") < order.index("z"):
                z_route = "pattern"
            elif "q" in base and "k" in base and _close(_qk_pattern(base, causal), pattern):
                z_route = "qk"

        # Edit at hook_pattern: swap in a row-stochastic pattern far from the original and see if z follows.
        edited = torch.flip(pattern.float(), dims=[-1])
        edited = (edited / edited.sum(-1, keepdim=True).clamp_min(1e-12)).to(pattern.dtype)
        seen.clear()
        backend.run(tokens, [(names["p"], lambda p, hook: edited.to(p.device, p.dtype)), (names["z"], reader("z"))])
        pattern_editable = (
            z_equals
            and "z" in seen
            and _close(seen["z"], z_from_pattern(edited.float(), base["v"].float()))
            and not _close(seen["z"], base["z"], strict=True)
        )

        # Edit at hook_z: does the output change?
        z_editable = False
        if z_route is not None:
            out = backend.run(tokens, [(names["z"], lambda z, hook: torch.zeros_like(z))])
            z_editable = not _close(out, base_out, strict=True)
    return AttentionProbe(True, causal, pattern_editable, z_equals, z_route, z_editable)
