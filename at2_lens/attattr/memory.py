"""Memory budgets for AttAttr's integration steps: parse a budget, estimate one step's memory, choose a chunk size.

Integrated gradients over a layer's attention runs ``n_steps`` scaled copies of the input through the model with
gradients; Captum's ``internal_batch_size`` cuts them into chunks. These helpers turn a user's budget ("2GB") into
that chunk size from the shapes alone (sequence length, layers, heads, widths, vocabulary), before any forward pass,
so a too-small budget is refused before expensive work.

The estimate is deliberately conservative (float32 activations that autograd keeps for the backward pass, per
integration step and input row): per layer the attention scores, probabilities and the injected pattern
(``3·H·N²``) and the residual/MLP activations (``(12·d_model + 4·d_mlp)·N``); for the backward pass one more
layer's attention gradients (``2·H·N²``); and the logits rows F reads with their log-softmax and gradient
(``3·R·d_vocab``). It covers the integration chunks only: the model's weights and the clean pass that records
every layer's pattern are outside the budget.
"""

from __future__ import annotations

import math
import re

from at2_lens.errors import InputError

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_BUDGET_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
FLOAT_BYTES = 4


def parse_memory_budget(value: object) -> int:
    """Bytes from an int (bytes) or a string such as ``"2GB"``, ``"512 MiB"``, ``"1.5gb"`` (KB/MB/GB/TB are powers
    of 1000, KiB/MiB/GiB/TiB powers of 1024); InputError naming ``memory_budget`` otherwise."""
    if isinstance(value, bool):
        raise InputError(f"memory_budget: expected bytes (int) or a size like '2GB', got {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise InputError(f"memory_budget: expected a positive number of bytes, got {value}")
        return value
    if isinstance(value, str):
        match = _BUDGET_RE.match(value)
        unit = match.group(2).lower() if match else ""
        if match is None or unit not in _UNITS:
            raise InputError(f"memory_budget: expected bytes or a size like '2GB', '512MiB', got {value!r}")
        size = math.floor(float(match.group(1)) * _UNITS[unit])
        if size < 1:
            raise InputError(f"memory_budget: expected a positive size, got {value!r}")
        return size
    raise InputError(f"memory_budget: expected bytes (int) or a size like '2GB', got {type(value).__name__}")


def step_bytes(
    *, n_pos: int, n_layers: int, n_heads: int, d_model: int, d_mlp: int, d_vocab: int, logit_rows: int
) -> int:
    """Estimated bytes one integration step of one input row holds (see the module docstring for the terms)."""
    attention = n_heads * n_pos * n_pos
    per_layer = 3 * attention + (12 * d_model + 4 * d_mlp) * n_pos
    return FLOAT_BYTES * (n_layers * per_layer + 2 * attention + 3 * logit_rows * d_vocab)


def format_bytes(n: float) -> str:
    """A byte count for messages, e.g. ``1.5 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def chunk_rows(budget: int, per_step: int, n_rows: int, n_steps: int) -> int | None:
    """Captum's ``internal_batch_size`` (rows = examples × steps) for a budget, or None when all steps fit at once.

    Every chunk holds whole steps for all ``n_rows`` examples (Captum's own rule), so the smallest possible chunk is
    ``n_rows`` rows; a budget below that is an InputError saying how much one step needs.
    """
    one_step = per_step * n_rows
    if budget < one_step:
        raise InputError(
            f"memory_budget: {format_bytes(budget)} is too small for even one integration step "
            f"({format_bytes(one_step)} for {n_rows} input row(s) at this length); raise the budget, attribute "
            "fewer rows at once, or shorten the input"
        )
    steps = budget // one_step
    return None if steps >= n_steps else int(steps * n_rows)


__all__ = ["chunk_rows", "format_bytes", "parse_memory_budget", "step_bytes"]
