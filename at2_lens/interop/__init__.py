"""Interoperability with Captum's LLM attribution API.

``CaptumLM`` lets Captum's ``LLMAttribution`` / ``LLMGradientAttribution`` run on any supported TransformerLens
decoder; ``to_llm_attribution_result`` turns at2_lens results into Captum's ``LLMAttributionResult`` so that its
``plot_seq_attr`` / ``plot_token_attr`` draw them.
"""

from at2_lens.interop.captum_model import CaptumLM
from at2_lens.interop.captum_results import to_llm_attribution_result

__all__ = ["CaptumLM", "to_llm_attribution_result"]
