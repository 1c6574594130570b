"""The target's output under an ablation: its log-probability or its logit-probability.

``log_prob`` is ``log P = Σ_t log p(target_t)``; ``logit_prob`` (AT2's default) is ``log P − log(1 − P)``,
computed stably so that a near-certain target does not give ``inf``.
"""

from __future__ import annotations

from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from at2_lens._validate import check_choice

OutputType = Literal["logit_prob", "log_prob"]
OUTPUT_TYPES: tuple[str, ...] = ("logit_prob", "log_prob")
OUTPUT_UNITS: dict[str, str] = {
    "logit_prob": "logit-probability of the target",
    "log_prob": "log-probability of the target (nats)",
}
"""What each output type measures, in words (for a result's ``units``)."""


def check_output_type(output: str) -> OutputType:
    """``output`` if it is one of :data:`OUTPUT_TYPES`, else InputError naming ``output``."""
    return check_choice("output", output, OUTPUT_TYPES)  # type: ignore[return-value]


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 − exp(x))`` for ``x ≤ 0``, accurate on the whole range."""
    x = x.clamp(max=-1e-30) if x.dtype == torch.float64 else x.clamp(max=-1e-7)
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def span_output(
    logits: Float[Tensor, "batch row vocab"], target_ids: Int[Tensor, "batch row"], output: OutputType = "logit_prob"
) -> Float[Tensor, " batch"]:
    """The output of a target span given the logits of the rows that predict it."""
    output = check_output_type(output)
    lp = torch.log_softmax(logits.double(), dim=-1).gather(-1, target_ids[..., None].to(logits.device))[..., 0]
    log_p = lp.sum(dim=-1)
    if output == "log_prob":
        return log_p.float()
    return (log_p - log1mexp(log_p)).float()


def output_from_logprob(log_p: Tensor, output: OutputType = "logit_prob") -> Tensor:
    """Convert a span log-probability to the requested output type."""
    log_p = log_p.double()
    return (log_p if output == "log_prob" else log_p - log1mexp(log_p)).float()


__all__ = [
    "OUTPUT_TYPES",
    "OUTPUT_UNITS",
    "OutputType",
    "check_output_type",
    "log1mexp",
    "output_from_logprob",
    "span_output",
]
