"""The engine every context-attribution method runs on: keep-masks over sources, the ``mask`` and ``remove``
ablation modes, the target's output, attention read by the target's rows, and ablation ground truth.

- ``masks``: random keep-masks, the masks that ablate a ranking's top-k, expansion to token positions.
- ``positions``: validation of source/target token ranges and the query rows that produce the target.
- ``outputs``: the target's log-probability or logit-probability from logits.
- ``modes``: the target's output under keep-masks, by attention masking or text removal; ``ablation_fn``.
- ``features``: per-head attention from the target's rows to each source, in one forward pass.
- ``user_cache``: the same features read from the user's own ``ActivationCache`` (no pass); ``cache_filter``.
- ``ground_truth``: a task's outputs under held-out random masks (what LDS and top-k drop compare against).

AT2 (``at2_lens.at2``), the baselines, the evaluation and the interop layer all import from here.
"""

from at2_lens.ablation.features import DEFAULT_LAYOUT, FeatureOptions, FeaturePass, extract_features
from at2_lens.ablation.ground_truth import EVAL_SEED_SALT, GroundTruth, ground_truth
from at2_lens.ablation.masks import full_keep, random_masks, token_keep, topk_masks
from at2_lens.ablation.modes import (
    ABLATION_MODES,
    AblationFn,
    AblationMode,
    TaskAblationFn,
    ablation_fn,
    check_mode,
    mask_mode_outputs,
    removal_builder,
    remove_mode_outputs,
)
from at2_lens.ablation.outputs import (
    OUTPUT_TYPES,
    OUTPUT_UNITS,
    OutputType,
    check_output_type,
    log1mexp,
    output_from_logprob,
    span_output,
)
from at2_lens.ablation.positions import check_spans, membership, query_rows
from at2_lens.ablation.user_cache import CachedPatterns, cache_filter

__all__ = [
    "ABLATION_MODES",
    "DEFAULT_LAYOUT",
    "EVAL_SEED_SALT",
    "OUTPUT_TYPES",
    "OUTPUT_UNITS",
    "AblationFn",
    "AblationMode",
    "CachedPatterns",
    "FeatureOptions",
    "FeaturePass",
    "GroundTruth",
    "OutputType",
    "TaskAblationFn",
    "ablation_fn",
    "cache_filter",
    "check_mode",
    "check_output_type",
    "check_spans",
    "extract_features",
    "full_keep",
    "ground_truth",
    "log1mexp",
    "mask_mode_outputs",
    "membership",
    "output_from_logprob",
    "query_rows",
    "random_masks",
    "removal_builder",
    "remove_mode_outputs",
    "span_output",
    "token_keep",
    "topk_masks",
]
