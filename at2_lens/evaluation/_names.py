"""Method and metric names with their help texts; no heavy imports, so ``at2-lens evaluate --help`` is instant."""

from __future__ import annotations

METRICS: tuple[str, ...] = (
    "lds",
    "topk_drop_mask",
    "topk_drop_remove",
    "kendall_loo",
    "kendall_gradxinput",
    "kendall_topk_loo",
    "kendall_topk_gradxinput",
    "attn_permutation",
    "attn_adversarial",
)
"""Metric names ``evaluate`` understands (see ``METRIC_HELP``)."""

DEFAULT_METRICS: tuple[str, ...] = ("lds", "topk_drop_mask", "topk_drop_remove", "kendall_loo", "kendall_gradxinput")
METHOD_INDEPENDENT_METRICS: tuple[str, ...] = ("attn_permutation", "attn_adversarial")
"""Metrics whose rows belong to the task, not to a method (the counterfactual-attention checks)."""
ALIASES: dict[str, tuple[str, ...]] = {
    "topk_drop": ("topk_drop_mask", "topk_drop_remove"),
    "kendall": ("kendall_loo", "kendall_gradxinput", "kendall_topk_loo", "kendall_topk_gradxinput"),
    "attention_checks": METHOD_INDEPENDENT_METRICS,
    "all": METRICS,
}
METRIC_HELP: dict[str, str] = {
    "lds": "Spearman corr. over held-out random ablations between masks @ scores and the actual output (higher "
           "is better)",
    "topk_drop_mask": "fall in target log-prob (nats) when the top-k sources are masked in attention (higher is "
                      "better)",
    "topk_drop_remove": "same, deleting the top-k sources' text and re-tokenising",
    "kendall_loo": "Kendall tau-b of the scores against leave-one-out (mask mode unless --mode remove)",
    "kendall_gradxinput": "Kendall tau-b of the scores against gradient x input",
    "kendall_topk_loo": "Kendall tau-b over the union of both rankings' top-k sources, against leave-one-out",
    "kendall_topk_gradxinput": "same, against gradient x input",
    "attn_permutation": "median |delta target log-prob| over random permutations of the target rows' attention "
                        "over the context keys, all layers and heads (method-independent: row "
                        "'attention_permutation')",
    "attn_adversarial": "adversarial attention: max mean JSD from the original attention with |delta| within "
                        "tolerance, and that delta (method-independent: row 'attention_adversarial')",
}
METHOD_HELP: dict[str, str] = {
    "at2": "AT2 with --estimator (or the shipped estimator for the model); without one it is uniform weights, "
           "reported as 'at2_uniform' (= average attention). 1 forward pass",
    "at2_refined{K}": "AT2's scores refined by K random ablations (default 8; at2_refined4, at2_refined16, ...): a "
                      "surrogate shrunk towards AT2's scores. 1 + K forward passes",
    "avg_attention": "attention averaged over all layers and heads (= AT2 with uniform weights). 1 forward pass",
    "last_layer_attention": "attention averaged over the heads of the last layer. 1 forward pass",
    "loo": "leave-one-out, ablation by masking keys (loo_remove: deleting the text). n_sources + 1 forward passes",
    "contextcite{N}": "ContextCite LASSO surrogate on N random ablations (default 32; contextcite64, ...; "
                      "suffix _remove to delete text). N forward passes",
    "gradxinput": "gradient x input on the embeddings, summed per source. 1 forward + 1 backward pass",
    "ig{N}": "integrated gradients on the embeddings (N steps, default 20; zero baseline on the sources). "
             "1 + N forward + N backward passes",
}
