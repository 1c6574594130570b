"""Convert at2_lens results to Captum's ``LLMAttributionResult``, so Captum's plots and tooling apply to them.

``LLMAttributionResult`` holds ``input_tokens`` (the attributed features), ``output_tokens`` (what they are
attributed for), ``seq_attr [input]`` and ``token_attr [output, input]``; its ``plot_seq_attr()`` draws one bar per
input feature and ``plot_token_attr()`` an output × input heatmap. A ``SourceAttribution`` maps onto it with the
sources as inputs; an AttAttr result with the key positions as inputs and the query positions as outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from at2_lens._validate import check_int
from at2_lens.attattr import AttAttrResult
from at2_lens.errors import InputError
from at2_lens.results import SourceAttribution

__all__ = ["to_llm_attribution_result"]


def to_llm_attribution_result(
    result: SourceAttribution | AttAttrResult,
    *,
    tokens: Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    rows: Sequence[int] | None = None,
    example: int = 0,
) -> Any:
    """The Captum ``LLMAttributionResult`` of an at2_lens result, ready for ``plot_seq_attr``/``plot_token_attr``.

    From a ``SourceAttribution`` (AT2 and every baseline): ``input_tokens`` are the source texts and ``seq_attr``
    the scores. ``token_attr`` has one row per target token when the result has per-token scores
    (``attribute(..., per_token=True)``), else a single row for the whole target.

    From an ``AttAttrResult`` (``AttentionAttribution.attribute``): attributions are summed over heads and over
    ``layers`` (default: every attributed layer), giving a ``[query, key]`` map; ``input_tokens`` are the key
    positions, ``output_tokens`` the query positions ``rows`` (default: all), ``token_attr`` the map's rows and
    ``seq_attr`` their sum over rows. Padding positions are left out.

    Args:
        result: a ``SourceAttribution`` or an ``AttAttrResult``.
        tokens: AttAttr only (required there): the string of every position, e.g. ``model.to_str_tokens(ids)``.
        layers: AttAttr only: which of the attributed layers to sum.
        rows: AttAttr only: which query positions become output tokens.
        example: AttAttr only: which example of a batched result.
    """
    from captum.attr import LLMAttributionResult

    if isinstance(result, SourceAttribution):
        if any(x is not None for x in (tokens, layers, rows)):
            raise InputError("tokens/layers/rows: only apply to an AttAttrResult, not to a SourceAttribution")
        if result.token_scores is not None and result.target_tokens is not None:
            token_attr = result.token_scores.detach().float().cpu()
            output_tokens = list(result.target_tokens)
        else:
            token_attr = result.scores.detach().float().cpu()[None]
            output_tokens = [result.target_text]
        return LLMAttributionResult(
            input_tokens=list(result.source_texts),
            output_tokens=output_tokens,
            seq_attr=result.scores.detach().float().cpu(),
            token_attr=token_attr,
        )
    if isinstance(result, AttAttrResult):
        return _from_attattr(result, tokens, layers, rows, example)
    raise InputError(f"result: expected a SourceAttribution or an AttAttrResult, got {type(result).__name__}")


def _from_attattr(
    result: AttAttrResult,
    tokens: Sequence[str] | None,
    layers: Sequence[int] | None,
    rows: Sequence[int] | None,
    example: int,
) -> Any:
    from captum.attr import LLMAttributionResult

    attr = result.attributions.detach().float().cpu()
    mask = result.attention_mask
    if result.batched:
        example = check_int("example", example, minimum=0, maximum=attr.shape[0] - 1)
        attr = attr[example]
        mask = None if mask is None else mask[example]
    elif example != 0:
        raise InputError(f"example: the result holds one example, got example={example}")
    elif mask is not None:
        mask = mask.reshape(-1)
    n_pos = attr.shape[-1]
    if tokens is None or isinstance(tokens, str) or len(tokens) != n_pos:
        got = "None" if tokens is None else f"{type(tokens).__name__} of length {len(tokens)}"
        raise InputError(f"tokens: expected one string per position ({n_pos}), got {got}")
    if layers is None:
        picked = list(range(len(result.layers)))
    else:
        missing = [layer for layer in layers if layer not in result.layers]
        if missing or not layers:
            raise InputError(f"layers: expected a non-empty subset of the attributed layers {result.layers}, "
                             f"got {list(layers)}")
        picked = [result.layers.index(layer) for layer in layers]
    qk = attr[picked].sum(dim=(0, 1))  # [query, key]
    real = list(range(n_pos)) if mask is None else [i for i in range(n_pos) if bool(mask[i])]
    if rows is None:
        rows = [r for r in range(qk.shape[0]) if r in set(real)] if qk.shape[0] == n_pos else list(range(qk.shape[0]))
    bad = [r for r in rows if not (isinstance(r, int) and 0 <= r < qk.shape[0])]
    if bad or not rows:
        raise InputError(f"rows: expected query positions in [0, {qk.shape[0]}), got {list(rows)}")
    token_attr = qk[list(rows)][:, real]
    row_names = [tokens[r] for r in rows] if qk.shape[0] == n_pos else [f"row {r}" for r in rows]
    return LLMAttributionResult(
        input_tokens=[tokens[i] for i in real],
        output_tokens=row_names,
        seq_attr=token_attr.sum(dim=0),
        token_attr=token_attr.to(torch.float32),
    )
