"""AttAttr (Hao et al., AAAI 2021): attention attribution by integrated gradients over each layer's attention.

``SelfAttentionAttribution(model).attribute(tokens)`` (also known as ``AttentionAttribution``) returns an
``AttAttrResult`` with per-layer ``[head, query, key]`` attributions keyed by ``blocks.{l}.attn.hook_pattern``. For
encoders, pass an ``output_func`` such as ``PooledOutput(classifier)`` that reads the final hidden state.

Modules: ``attribution`` (the class), ``result`` (``AttAttrResult``), ``readouts`` (``ForwardOutput``,
``PooledOutput``, classifier read-outs), ``targets`` (what F reads), ``memory`` (memory budgets). Built on it:
``head_importance`` (head importance and pruning sweeps), ``tree`` (attribution trees as ``networkx`` graphs,
``draw_attribution_tree``), ``triggers`` (adversarial token pairs mined from attributions) and ``cli``
(``at2-lens heads`` / ``at2-lens tree``).
"""

from at2_lens.attattr.attribution import METHODS, AttentionAttribution, SelfAttentionAttribution
from at2_lens.attattr.readouts import FINAL_HIDDEN, ForwardOutput, PooledOutput
from at2_lens.attattr.result import AttAttrResult
from at2_lens.attattr.targets import IGNORE_INDEX

__all__ = [
    "FINAL_HIDDEN",
    "IGNORE_INDEX",
    "METHODS",
    "AttAttrResult",
    "AttentionAttribution",
    "ForwardOutput",
    "PooledOutput",
    "SelfAttentionAttribution",
]
