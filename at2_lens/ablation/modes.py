"""Ablating sources: the target's output under keep-masks, in one of two modes.

``mask`` keeps every token in place and removes ablated sources' keys from every layer's attention
(mask-and-renormalise, the AT2 reference's default; batched, one forward per ``batch_size`` masks). ``remove``
deletes the ablated sources' text and re-tokenises the prompt (the ContextCite way); positions shift, so with
absolute position embeddings the two modes differ, while with rotary positions they agree closely.

:func:`ablation_fn` binds a model and a task into an :data:`AblationFn` (keep-masks -> outputs): what the ablation
baselines, the ground truth and the top-k drop call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from at2_lens._typing import typechecked
from at2_lens._validate import check_choice, check_int
from at2_lens.ablation.masks import token_keep
from at2_lens.ablation.outputs import OutputType, check_output_type, span_output
from at2_lens.ablation.positions import check_spans, query_rows
from at2_lens.backends import get_backend
from at2_lens.errors import InputError
from at2_lens.interventions import mask_keys
from at2_lens.tasks import Span, TokenizedTask, encode_with_offsets
from at2_lens.tasks.spans import cut_spans

AblationMode = Literal["mask", "remove"]
ABLATION_MODES: tuple[str, ...] = ("mask", "remove")

AblationFn = Callable[[Bool[Tensor, "mask source"]], Float[Tensor, " mask"]]
"""Maps source keep-masks ``[mask, source]`` (True = kept) to the target's output under each mask."""

TaskAblationFn = Callable[[TokenizedTask, Bool[Tensor, "mask source"]], Float[Tensor, " mask"]]
"""An injectable ablation: ``(task, keep-masks) -> outputs``; replaces the model's ablations (e.g. in tests)."""


def check_mode(mode: str) -> AblationMode:
    """``mode`` if it is one of :data:`ABLATION_MODES`, else InputError naming ``mode``."""
    return check_choice("mode", mode, ABLATION_MODES)  # type: ignore[return-value]


@typechecked
@torch.no_grad()
def mask_mode_outputs(
    model: Any,
    input_ids: Int[Tensor, " pos"],
    source_ranges: Sequence[Span],
    target_range: Span,
    masks: Bool[Tensor, "mask source"],
    *,
    output: OutputType = "logit_prob",
    batch_size: int = 8,
) -> Float[Tensor, " mask"]:
    """The target's output under each keep-mask, ablating by attention masking at every layer."""
    backend = get_backend(model)
    output = check_output_type(output)
    ids = backend.check_tokens(input_ids, name="input_ids")[0]
    check_spans(source_ranges, target_range, len(ids), backend.is_causal)
    if masks.shape[1] != len(source_ranges):
        raise InputError(f"masks: expected {len(source_ranges)} columns (one per source), got {masks.shape[1]}")
    check_int("batch_size", batch_size)
    _ = backend.attention_access
    keep = token_keep(masks, source_ranges, len(ids))
    rows = query_rows(target_range, backend.is_causal)
    t0, t1 = target_range
    target_ids = ids[t0:t1]
    outs = []
    for start in range(0, masks.shape[0], batch_size):
        k = keep[start : start + batch_size]
        batch = ids[None].expand(k.shape[0], -1)
        logits = backend.run(batch, backend.all_layer_pattern_hooks(mask_keys(k)))
        outs.append(span_output(logits[:, rows], target_ids[None].expand(k.shape[0], -1), output))
    return torch.cat(outs).cpu()  # one copy to the host at the end, not one per batch


@torch.no_grad()
def remove_mode_outputs(
    model: Any,
    build: Callable[[Tensor], tuple[Tensor, Span]],
    masks: Bool[Tensor, "mask source"],
    *,
    output: OutputType = "logit_prob",
) -> Float[Tensor, " mask"]:
    """The target's output under each keep-mask, deleting ablated sources and re-tokenising.

    ``build(keep_mask)`` returns the re-tokenised ``input_ids`` and the target's token range in them (see
    :func:`removal_builder`). One forward pass per mask; lengths differ between masks.
    """
    backend = get_backend(model)
    output = check_output_type(output)
    outs = []
    for m in masks:
        ids, (t0, t1) = build(m)
        ids = backend.check_tokens(ids, name="input_ids")[0]
        rows = query_rows((t0, t1), backend.is_causal)
        logits = backend.run(ids[None])
        outs.append(span_output(logits[:, rows], ids[None, t0:t1], output))
    return torch.cat(outs).cpu()


def removal_builder(tokenizer: Any, task: TokenizedTask) -> Callable[[Tensor], tuple[Tensor, Span]]:
    """For ``remove`` mode: a function from a source keep-mask to re-tokenised ``(input_ids, target_range)``.

    Ablated sources' characters are cut out of the rendered prompt (the template around the context is literal
    text, so this equals rendering the prompt with the reduced context); the prompt is re-tokenised and the
    response's exact token ids are appended, so the target tokens are unchanged.
    """
    if task.response is None or task.target_token_range is None:
        raise InputError("task: remove-mode ablation needs a tokenized task with a response")
    response_ids = task.input_ids[task.prompt_len :]
    t0, t1 = (p - task.prompt_len for p in task.target_token_range)
    spans = task.source_prompt_spans

    def build(keep: Tensor) -> tuple[Tensor, Span]:
        if keep.shape != (len(spans),):
            raise InputError(f"keep: expected {len(spans)} entries (one per source), got {tuple(keep.shape)}")
        text = cut_spans(task.prompt, spans, keep.tolist())
        ids, _ = encode_with_offsets(tokenizer, text, add_special_tokens=not task.chat)
        n = len(ids)
        return torch.cat([torch.tensor(ids, dtype=torch.long), response_ids]), (n + t0, n + t1)

    return build


def ablation_fn(
    model: Any,
    task: TokenizedTask,
    *,
    mode: AblationMode = "mask",
    output: OutputType = "logit_prob",
    batch_size: int = 8,
) -> AblationFn:
    """The target's output under source keep-masks, by attention masking (``mask``) or text removal (``remove``).

    One forward pass per mask either way (mask mode batches ``batch_size`` masks per call).
    """
    mode = check_mode(mode)
    output = check_output_type(output)
    target_range = task.target_token_range
    if target_range is None:
        raise InputError("task: ablations need a tokenized task with a response (a target)")
    if mode == "mask":
        sources = list(task.source_token_ranges)

        def run_mask(masks: Tensor) -> Tensor:
            return mask_mode_outputs(model, task.input_ids, sources, target_range, masks.bool(), output=output,
                                     batch_size=batch_size)

        return run_mask
    build = removal_builder(get_backend(model).tokenizer, task)

    def run_remove(masks: Tensor) -> Tensor:
        return remove_mode_outputs(model, build, masks.bool(), output=output)

    return run_remove


__all__ = [
    "ABLATION_MODES",
    "AblationFn",
    "AblationMode",
    "TaskAblationFn",
    "ablation_fn",
    "check_mode",
    "mask_mode_outputs",
    "removal_builder",
    "remove_mode_outputs",
]
