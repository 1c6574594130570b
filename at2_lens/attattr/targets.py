"""What F reads: AttAttr's targets turned into per-row labels or output columns, and the log-probability objective.

Decoders and MLM encoders without an ``output_func``: ``row_labels_from_target`` turns ``target`` into labels
``[batch, pos]`` (``IGNORE_INDEX`` where nothing is read) and ``labels_objective`` sums their log-probabilities.
With an ``output_func`` returning ``[batch, n]``: ``output_index_from_target`` picks a column per row and
``select_output`` reads it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from at2_lens._typing import typechecked
from at2_lens.errors import InputError
from at2_lens.models.pooling import last_real_positions

IGNORE_INDEX = -100
"""Label value meaning "no target token here" (the Hugging Face ``labels`` convention)."""

OutputKind = Literal["log_prob", "prob"]
OUTPUT_KINDS: tuple[OutputKind, ...] = ("log_prob", "prob")


def normalise_target(target: object) -> Tensor | None:
    """``target`` as a long tensor (or None); InputError for anything that is not integer-valued."""
    if target is None:
        return None
    if isinstance(target, bool):
        raise InputError(f"target: expected a token id, a sequence of ids or a tensor, got {target!r}")
    if isinstance(target, Tensor):
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise InputError(f"target: expected integer token ids, got a {target.dtype} tensor")
        return target.long().cpu()
    try:
        t = torch.as_tensor(target)
    except (TypeError, ValueError, RuntimeError) as err:
        raise InputError(f"target: expected a token id, a sequence of ids or a tensor, got {target!r}") from err
    if t.is_floating_point() or t.dtype == torch.bool:
        raise InputError(f"target: expected integer token ids, got {target!r}")
    return t.long()


def row_labels_from_target(
    target: Tensor | None,
    *,
    n_rows: int,
    n_pos: int,
    inputs_1d: bool,
    causal: bool,
    d_vocab: int,
    attention_mask: Tensor | None,
    predicted: Callable[[], Tensor] | None = None,
) -> Int[Tensor, "batch pos"]:
    """Per-row labels ``[batch, pos]``: entry ``[b, i]`` is the token whose log-probability is read from logits row
    ``i`` of example ``b`` (``IGNORE_INDEX`` elsewhere).

    Decoder targets (positions are token positions in the sequence; the token at position ``j`` is predicted by
    logits row ``j − 1``; position ``pos`` is the token right after the input):

    - None: each row's predicted (argmax) next token after its last real token (``predicted()`` gives them);
    - an int: that token id as the next token after each row's last real token;
    - one id per row (shape ``[batch]``, 2-D inputs only): each row's next token;
    - labels shaped like the inputs, ``[batch, pos]`` (or ``[pos]`` for 1-D inputs), or with one extra column for
      the token after the input: the token at each non-``-100`` position is a target (position 0 cannot be one).

    Encoder targets (masked-LM heads; no shift): labels shaped like the inputs, the token at position ``i`` read
    from logits row ``i``.
    """
    mask_cpu = attention_mask.cpu() if attention_mask is not None else None
    last = last_real_positions(n_rows, n_pos, mask_cpu)
    labels_rank = 1 if inputs_1d else 2
    if target is None or target.dim() == 0 or (target.dim() == 1 and not inputs_1d):
        if not causal:
            raise InputError(
                "target: an encoder has no next token; give labels shaped like the inputs (masked-LM targets, "
                "-100 = ignore) or pass an output_func to AttentionAttribution"
            )
        if target is None:
            assert predicted is not None
            ids = predicted().long().cpu().reshape(-1)
        elif target.dim() == 0:
            ids = target.expand(n_rows)
        else:
            if target.shape[0] != n_rows:
                raise InputError(
                    f"target: expected one token id per input row ({n_rows}), got {target.shape[0]} ids "
                    "(labels for 2-D inputs are 2-D: [batch, pos] or [batch, pos + 1])"
                )
            ids = target
        labels = torch.full((n_rows, n_pos), IGNORE_INDEX, dtype=torch.long)
        labels[torch.arange(n_rows), last] = ids.to(labels.device)  # a target given on the model's device
    elif target.dim() == labels_rank:
        labels_full = target if not inputs_1d else target[None]
        widths = (n_pos, n_pos + 1) if causal else (n_pos,)
        if labels_full.shape[0] != n_rows or labels_full.shape[1] not in widths:
            want = " or ".join(f"[{n_rows}, {w}]" for w in widths)
            raise InputError(f"target: labels must have shape {want} (like the inputs), got {tuple(target.shape)}")
        if causal:
            if bool((labels_full[:, 0] != IGNORE_INDEX).any()):
                raise InputError("target: position 0 cannot be a decoder target (nothing predicts it); set it to -100")
            labels = torch.full((n_rows, n_pos), IGNORE_INDEX, dtype=torch.long)
            labels[:, : labels_full.shape[1] - 1] = labels_full[:, 1:]
        else:
            labels = labels_full.clone()
    else:
        raise InputError(
            f"target: expected None, an int, one id per row or labels shaped like the inputs, got a tensor of shape "
            f"{tuple(target.shape)} for inputs with {n_rows} row(s) of {n_pos} tokens"
        )
    valid = labels != IGNORE_INDEX
    bad = valid & ((labels < 0) | (labels >= d_vocab))
    if bool(bad.any()):
        raise InputError(
            f"target: token ids must lie in [0, {d_vocab}) or be {IGNORE_INDEX}, got {labels[bad].tolist()}"
        )
    if not bool(valid.any(dim=1).all()):
        raise InputError("target: every input row needs at least one target token")
    if mask_cpu is not None and bool((valid & ~mask_cpu.bool()).any()):
        raise InputError("target: a target is read from a padding position (attention_mask is 0 there)")
    return labels


@typechecked
def labels_objective(
    logits: Float[Tensor, "batch pos vocab"], row_labels: Int[Tensor, "batch pos"], output: OutputKind = "log_prob"
) -> Float[Tensor, " batch"]:
    """Σ over labelled rows of log p(label) (``output="log_prob"``), or its exp, the joint probability."""
    labels = row_labels.to(logits.device)
    valid = labels != IGNORE_INDEX
    rows = valid.any(dim=0).nonzero().squeeze(-1)  # only the rows some example reads: cheap at a large vocab
    logp = torch.log_softmax(logits[:, rows].float(), dim=-1)
    lab = labels[:, rows]
    picked = logp.gather(-1, lab.clamp_min(0)[..., None])[..., 0]
    total = torch.where(valid[:, rows], picked, torch.zeros_like(picked)).sum(dim=-1)
    return total if output == "log_prob" else total.exp()


def output_index_from_target(target: Tensor | None, clean: Tensor) -> Tensor | None:
    """Which column of an ``output_func``'s ``[batch, n]`` output is F for each row (None for ``[batch]``)."""
    n_rows = clean.shape[0]
    if clean.dim() == 1:
        if target is not None:
            raise InputError("target: output_func returns one value per row, so target must be None")
        return None
    if clean.dim() != 2:
        raise InputError(
            f"output_func: expected a tensor of shape [batch] or [batch, n_outputs], got {tuple(clean.shape)}"
        )
    n_out = clean.shape[1]
    if target is None:
        index = clean.argmax(dim=1).cpu()
    elif target.dim() == 0:
        index = target.expand(n_rows)
    elif target.dim() == 1 and target.shape[0] == n_rows:
        index = target
    else:
        raise InputError(
            f"target: expected None, an output index or one index per row ({n_rows}), got shape {tuple(target.shape)}"
        )
    if bool(((index < 0) | (index >= n_out)).any()):
        raise InputError(f"target: output indices must lie in [0, {n_out}), got {index.tolist()}")
    return index.long()


def select_output(values: Tensor, index: Tensor | None) -> Tensor:
    """F per row: the ``[batch]`` output itself, or the chosen column of a ``[batch, n]`` output."""
    if index is None:
        if values.dim() != 1:
            raise InputError(f"output_func: expected a tensor of shape [batch], got {tuple(values.shape)}")
        return values
    return values.gather(1, index.to(values.device)[:, None])[:, 0]


__all__ = [
    "IGNORE_INDEX",
    "OUTPUT_KINDS",
    "OutputKind",
    "labels_objective",
    "normalise_target",
    "output_index_from_target",
    "row_labels_from_target",
    "select_output",
]
