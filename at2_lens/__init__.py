"""at2_lens: which context tokens, and which attention heads, made a TransformerLens model say this?

Public names are imported lazily so that ``import at2_lens`` stays cheap (TransformerLens takes seconds to import).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "load_model": "at2_lens.models",
    "get_backend": "at2_lens.backends",
    "Backend": "at2_lens.backends",
    "ContextTask": "at2_lens.tasks",
    "TargetSpan": "at2_lens.tasks",
    "TokenizedTask": "at2_lens.tasks",
    "cache_filter": "at2_lens.ablation.user_cache",
    "CachedPatterns": "at2_lens.ablation.user_cache",
    "AT2Attribution": "at2_lens.at2.attribution",
    "AT2Refined": "at2_lens.at2.refined",
    "load_estimator": "at2_lens.at2.pretrained",
    "LinearEstimator": "at2_lens.at2.estimator",
    "SourceAttribution": "at2_lens.results",
    "SentenceAttributions": "at2_lens.results",
    "AttentionAttribution": "at2_lens.attattr",
    "SelfAttentionAttribution": "at2_lens.attattr",
    "PooledOutput": "at2_lens.attattr",
    "AttAttrResult": "at2_lens.attattr",
    "evaluate": "at2_lens.evaluation.runner",
    "CaptumLM": "at2_lens.interop",
    "to_llm_attribution_result": "at2_lens.interop",
    "ablate_heads_hooks": "at2_lens.head_ablation",
    "ablate_heads": "at2_lens.head_ablation",
    "knockout_sources": "at2_lens.head_ablation",
    "top_heads": "at2_lens.head_ablation",
    "top_heads_attention": "at2_lens.viz",
}

__all__ = [
    "AT2Attribution",
    "AT2Refined",
    "AttAttrResult",
    "AttentionAttribution",
    "Backend",
    "CachedPatterns",
    "CaptumLM",
    "ContextTask",
    "LinearEstimator",
    "PooledOutput",
    "SelfAttentionAttribution",
    "SentenceAttributions",
    "SourceAttribution",
    "TargetSpan",
    "TokenizedTask",
    "__version__",
    "ablate_heads",
    "ablate_heads_hooks",
    "cache_filter",
    "evaluate",
    "get_backend",
    "knockout_sources",
    "load_estimator",
    "load_model",
    "to_llm_attribution_result",
    "top_heads",
    "top_heads_attention",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'at2_lens' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:
    from at2_lens.ablation.user_cache import CachedPatterns, cache_filter
    from at2_lens.at2.attribution import AT2Attribution
    from at2_lens.at2.estimator import LinearEstimator
    from at2_lens.at2.pretrained import load_estimator
    from at2_lens.at2.refined import AT2Refined
    from at2_lens.attattr import AttAttrResult, AttentionAttribution, PooledOutput, SelfAttentionAttribution
    from at2_lens.backends import Backend, get_backend
    from at2_lens.evaluation.runner import evaluate
    from at2_lens.head_ablation import ablate_heads, ablate_heads_hooks, knockout_sources, top_heads
    from at2_lens.interop import CaptumLM, to_llm_attribution_result
    from at2_lens.models import load_model
    from at2_lens.results import SentenceAttributions, SourceAttribution
    from at2_lens.tasks import ContextTask, TargetSpan, TokenizedTask
    from at2_lens.viz import top_heads_attention
