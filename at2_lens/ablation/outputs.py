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


def target_logprobs(
    logits: Float[Tensor, "*batch vocab"], target_ids: Int[Tensor, "*batch"]
) -> Float[Tensor, "*batch"]:
    """``log p(target)`` per row, in float32 on the logits' device, without a float64 copy of the logits.

    ``log p_t = (l_t − m) − log1p(R)`` with ``m`` the row's largest logit and ``R = Σ_{j ≠ argmax} exp(l_j − m)``:
    the argmax's own term (exactly 1) is kept out of the sum, so a near-certain target's ``log p ≈ −R`` keeps its
    digits (float32 ``logsumexp`` would round it to 0, and the logit-probability to its clamp). Differentiable.
    """
    x = logits.float()
    top, top_idx = x.max(dim=-1, keepdim=True)
    rest = torch.exp(x.scatter(-1, top_idx, float("-inf")) - top).sum(dim=-1)
    idx = target_ids.to(device=logits.device, dtype=torch.long)[..., None]
    return (x.gather(-1, idx) - top)[..., 0] - torch.log1p(rest)


def span_output(
    logits: Float[Tensor, "batch row vocab"], target_ids: Int[Tensor, "batch row"], output: OutputType = "logit_prob"
) -> Float[Tensor, " batch"]:
    """The output of a target span given the logits of the rows that predict it, on the logits' device.

    Per-token log-probabilities come from :func:`target_logprobs` (float32, only the target ids gathered); their sum
    and the logit-probability are formed in float64 on ``[batch]`` values only.
    """
    output = check_output_type(output)
    log_p = target_logprobs(logits, target_ids).double().sum(dim=-1)
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
    "target_logprobs",
]
