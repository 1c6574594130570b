"""AttAttr (Hao et al., AAAI 2021): attention attribution by integrated gradients over each layer's attention.

``AttentionAttribution(model).attribute(tokens)`` returns an ``AttAttrResult`` with per-layer ``[head, query, key]``
attributions keyed by ``blocks.{l}.attn.hook_pattern``. For encoders, pass an ``output_func`` such as
``PooledOutput(classifier)`` that reads the final hidden state.

Built on it: ``heads`` (head importance and pruning sweeps), ``tree`` (attribution trees as ``networkx`` graphs,
``draw_attribution_tree``), ``triggers`` (adversarial token pairs mined from attributions) and ``cli``
(``at2-lens heads`` / ``at2-lens tree``).
"""

from at2_lens.attattr._utils import (
    FINAL_HIDDEN,
    IGNORE_INDEX,
    METHODS,
    AttAttrResult,
    ForwardOutput,
    PooledOutput,
)
from at2_lens.attattr.attribution import AttentionAttribution

__all__ = [
    "FINAL_HIDDEN",
    "IGNORE_INDEX",
    "METHODS",
    "AttAttrResult",
    "AttentionAttribution",
    "ForwardOutput",
    "PooledOutput",
]
