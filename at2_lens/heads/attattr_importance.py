"""AttAttr head importance for the answer's log-probability on decoder tasks (Hao et al., AAAI 2021).

For each task, :class:`~at2_lens.attattr.SelfAttentionAttribution` integrates the gradient of
``F = Σ_{t ∈ target} log p(token_t)`` (the target tokens' summed log-probability) over each layer's attention, from
zero attention to the model's own; a head's importance on that task is its largest attribution over (query, key)
(``AttAttrResult.head_importance``), and the score is the mean over tasks, ``[layer, head]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from at2_lens._defaults import DEFAULT_MAX_NEW_TOKENS
from at2_lens._validate import check_int
from at2_lens.attattr import IGNORE_INDEX, SelfAttentionAttribution
from at2_lens.attattr.attribution import check_n_steps
from at2_lens.heads._common import decoder_backend, prepare_all


def attattr_head_importance(
    model: Any,
    tasks: Sequence[Any],
    *,
    n_steps: int = 20,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    progress: bool = False,
) -> Float[Tensor, "layer head"]:
    """Mean AttAttr head importance over ``tasks`` for their targets' log-probability, ``[layer, head]``.

    Args:
        model: a TransformerLens decoder (or its ``Backend``).
        tasks: ``ContextTask`` (a missing response is generated greedily), ``NeedleTask`` or ``TokenizedTask``.
        n_steps: Gauss-Legendre integration points per layer (AttAttr's ``n_steps``; its ranking of heads settles
            with fewer points than its completeness needs).
        max_new_tokens: generation budget where a response is generated.
        progress: show a tqdm bar over tasks.

    Cost per task: ``n_steps`` forward and backward passes per layer (all layers).
    """
    n_steps = check_n_steps(n_steps, "gausslegendre")
    check_int("max_new_tokens", max_new_tokens)
    backend = decoder_backend(model)
    prepared, _ = prepare_all(backend, tasks, max_new_tokens)
    attr = SelfAttentionAttribution(backend)
    total = torch.zeros(backend.n_layers, backend.n_heads)
    items: Any = prepared
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(prepared, desc="AttAttr", unit="task")
    for task in items:
        assert task.target_token_range is not None
        t0, t1 = task.target_token_range
        labels = torch.full_like(task.input_ids, IGNORE_INDEX)
        labels[t0:t1] = task.input_ids[t0:t1]
        result = attr.attribute(task.input_ids, target=labels, n_steps=n_steps)
        total += result.head_importance().detach().float().cpu()
    return total / len(prepared)


__all__ = ["attattr_head_importance"]
