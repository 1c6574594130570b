"""TransformerLens hook names, built in one place.

Every hook name at2_lens uses comes from here, and every one of them is built by TransformerLens's own
``get_act_name`` (e.g. ``pattern(3) == "blocks.3.attn.hook_pattern"``), so at2_lens and TransformerLens cannot
disagree on a name. Which hook holds what on a given model class (e.g. the final hidden state) is the backends'
business (``Backend.final_hidden_hook``); this module only spells names.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable


@functools.cache
def _get_act_name() -> Callable[..., str]:
    # Imported on first use: TransformerLens takes seconds to import. ``transformer_lens.utilities`` has it on both
    # TransformerLens lines (``transformer_lens.utils`` is gone in 4.x).
    from transformer_lens.utilities import get_act_name

    return get_act_name  # type: ignore[no-any-return]


def act_name(name: str, layer: int | None = None) -> str:
    """TransformerLens's name of activation ``name`` in block ``layer`` (None: outside the blocks)."""
    return _get_act_name()(name, layer)


def pattern(layer: int) -> str:
    """``blocks.{layer}.attn.hook_pattern``: post-softmax attention ``[batch, head, query, key]``."""
    return act_name("pattern", layer)


def q(layer: int) -> str:
    """``blocks.{layer}.attn.hook_q``."""
    return act_name("q", layer)


def k(layer: int) -> str:
    """``blocks.{layer}.attn.hook_k``."""
    return act_name("k", layer)


def v(layer: int) -> str:
    """``blocks.{layer}.attn.hook_v``."""
    return act_name("v", layer)


def z(layer: int) -> str:
    """``blocks.{layer}.attn.hook_z``: per-head attention output before ``W_O``, ``[batch, pos, head, d_head]``."""
    return act_name("z", layer)


def resid_pre(layer: int) -> str:
    """``blocks.{layer}.hook_resid_pre``: the residual stream entering block ``layer``."""
    return act_name("resid_pre", layer)


def resid_post(layer: int) -> str:
    """``blocks.{layer}.hook_resid_post``: the residual stream leaving block ``layer``."""
    return act_name("resid_post", layer)


def normalized_resid_post(layer: int) -> str:
    """``blocks.{layer}.hook_normalized_resid_post``: a post-LayerNorm (BERT) block's output on ``HookedEncoder``."""
    return act_name("normalized_resid_post", layer)


def final_normalized() -> str:
    """``ln_final.hook_normalized``: a decoder's final LayerNorm output."""
    return act_name("normalized")


_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def first_block(name: str, n_layers: int) -> int:
    """The first block whose forward fires hook ``name``: its block index, ``n_layers`` after the blocks
    (``ln_final.*``, ``unembed.*``), -1 before them (embeddings)."""
    match = _BLOCK.match(name)
    if match:
        return int(match.group(1))
    if name.startswith(("ln_final.", "unembed.")):
        return n_layers
    return -1


__all__ = [
    "act_name",
    "final_normalized",
    "first_block",
    "k",
    "normalized_resid_post",
    "pattern",
    "q",
    "resid_post",
    "resid_pre",
    "v",
    "z",
]
