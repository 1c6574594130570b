"""Ground truth for faithfulness: a task's outputs under held-out random keep-masks, shared by every method's LDS.

The masks come from a stream no method draws from (seed offset by :data:`EVAL_SEED_SALT`), so an evaluation never
scores a method (e.g. ContextCite, seed 0) on the very ablations it was fitted to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jaxtyping import Bool, Float
from torch import Tensor

from at2_lens.ablation.masks import full_keep, random_masks
from at2_lens.ablation.modes import AblationMode, ablation_fn, check_mode
from at2_lens.ablation.outputs import OutputType, check_output_type, output_from_logprob
from at2_lens.tasks import TokenizedTask

EVAL_SEED_SALT = 0x4C4453  # evaluation masks never coincide with a method's own (e.g. ContextCite's, seed 0)


@dataclass(frozen=True)
class GroundTruth:
    """A task's outputs under random keep-masks, shared by every method's LDS.

    ``log_probs[m]`` is the target's log-probability under ``masks[m]``; ``full_log_prob`` with nothing ablated.
    """

    masks: Bool[Tensor, "mask source"]
    log_probs: Float[Tensor, " mask"]
    full_log_prob: float
    mode: str
    forward_passes: int

    def outputs(self, output: OutputType = "logit_prob") -> Float[Tensor, " mask"]:
        """The outputs in ``output`` units (log-probability or logit-probability)."""
        return output_from_logprob(self.log_probs, check_output_type(output))


def ground_truth(
    model: Any,
    task: TokenizedTask,
    n_masks: int = 32,
    *,
    mode: AblationMode = "mask",
    keep_prob: float = 0.5,
    seed: int = 0,
    index: int = 0,
    batch_size: int = 8,
) -> GroundTruth:
    """Held-out random ablations of one task (``n_masks + 1`` forward passes, the unablated one included).

    Masks come from ``random_masks(seed=EVAL_SEED_SALT + seed, index=index)``, a stream no method draws from.
    """
    mode = check_mode(mode)
    masks = random_masks(task.n_sources, n_masks, keep_prob, seed=EVAL_SEED_SALT + seed, index=index)
    run = ablation_fn(model, task, mode=mode, output="log_prob", batch_size=batch_size)
    full = ablation_fn(model, task, mode="mask", output="log_prob")(full_keep(task.n_sources))
    return GroundTruth(masks, run(masks), float(full[0]), mode, n_masks + 1)


__all__ = ["EVAL_SEED_SALT", "GroundTruth", "ground_truth"]
