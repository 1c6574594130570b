"""Collect AT2 training data: features, random ablation masks and the target's output under each.

One example per task, written atomically to an ``AblationStore``; finished examples are skipped, so a killed run
resumes where it stopped (example files that are not valid, e.g. truncated or garbage, are recomputed), and
``(shard_index, shard_count)`` splits the tasks between processes or machines that write to the same store. Cost
per example: one greedy generation (if the task has no response), one feature pass and ``n_masks`` ablated passes
(batched in ``mask`` mode).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from at2_lens.ablation import (
    AblationMode,
    FeatureOptions,
    OutputType,
    ablation_fn,
    check_mode,
    check_output_type,
    extract_features,
    output_from_logprob,
    random_masks,
)
from at2_lens.at2.estimator import model_fingerprint, prompt_format_record
from at2_lens.at2.store import MANIFEST_NAME, AblationExample, AblationStore, StoreSettings, shard_indices
from at2_lens.backends import get_backend
from at2_lens.errors import InputError
from at2_lens.files import canonical_json
from at2_lens.tasks import DEFAULT_MAX_NEW_TOKENS, ContextTask, check_tasks, prepare_task


def collect(
    model: Any,
    tasks: Sequence[ContextTask],
    store_dir: str | Path,
    *,
    mode: AblationMode = "mask",
    output: OutputType = "logit_prob",
    n_masks: int = 32,
    keep_prob: float = 0.5,
    seed: int = 0,
    shard_index: int = 0,
    shard_count: int = 1,
    batch_size: int = 8,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    progress: bool = True,
    extra_settings: dict[str, Any] | None = None,
    features: FeatureOptions | None = None,
) -> AblationStore:
    """Collect ablation data for ``tasks`` into ``store_dir`` (resumable, shardable); returns the store.

    ``features`` chooses the one-pass feature family stored (default AT2's); the store records it.
    """
    features = FeatureOptions() if features is None else features
    if not isinstance(features, FeatureOptions):
        raise InputError(f"features: expected FeatureOptions or None, got {type(features).__name__}")
    backend = get_backend(model)
    mode, output = check_mode(mode), check_output_type(output)
    if not tasks:
        raise InputError("tasks: expected at least one ContextTask")
    for i, t in enumerate(tasks):
        if not isinstance(t, ContextTask):
            raise InputError(f"tasks[{i}]: expected a ContextTask, got {type(t).__name__}")
    granularities = sorted({t.granularity for t in tasks})
    if len(granularities) != 1:
        raise InputError(f"tasks: all tasks must share one source granularity, got {granularities}")
    if not backend.is_causal:
        raise InputError("model: AT2 collection needs a causal (decoder) model")
    _ = backend.attention_access
    check_tasks(backend, tasks)  # every prompt tokenizes and fits the context window, before any model work
    extra = dict(extra_settings or {})
    if "prompt_format" not in extra and not _store_predates_prompt_format(Path(store_dir)):
        extra["prompt_format"] = _prompt_format(backend, tasks)
    settings = StoreSettings(
        model_fingerprint=model_fingerprint(backend),
        n_layers=backend.n_layers,
        n_heads=backend.n_heads,
        ablation_mode=mode,
        output_type=output,
        granularity=granularities[0],
        n_masks=n_masks,
        keep_prob=keep_prob,
        seed=seed,
        feature_layout=features.layout_name,
        extra=extra,
    )
    store = AblationStore(store_dir, settings)
    mine = shard_indices(len(tasks), shard_index, shard_count)
    corrupt = store.invalid(mine)
    if corrupt:
        shown = "; ".join(f"{i}: {why}" for i, why in list(corrupt.items())[:3])
        warnings.warn(f"{len(corrupt)} invalid example files in {store.root} are recomputed ({shown})", stacklevel=2)
    todo = sorted(set(store.missing(mine)) | set(corrupt))
    for index in tqdm(todo, desc=f"collect shard {shard_index}/{shard_count}", disable=not progress):
        store.write(collect_example(backend, tasks[index], index, settings, batch_size, max_new_tokens))
    return store


def _prompt_format(backend: Any, tasks: Sequence[ContextTask]) -> dict[str, Any]:
    """How the tasks' prompts are rendered (chat template or plain; ``mixed`` if both), for the store manifest."""
    tok = backend.tokenizer
    records = {canonical_json(prompt_format_record(t.layout(tok).chat, tok)) for t in tasks}
    if len(records) == 1:
        return dict(json.loads(records.pop()))
    return {"name": "mixed", "template_sha256": None}


def _store_predates_prompt_format(root: Path) -> bool:
    """An existing store whose manifest has no prompt format: resuming it must not add one (settings must match)."""
    manifest = root / MANIFEST_NAME
    if not manifest.is_file():
        return False
    try:
        extra = json.loads(manifest.read_text(encoding="utf-8")).get("extra") or {}
    except (OSError, ValueError, AttributeError):
        return False  # AblationStore reports a damaged manifest itself
    return "prompt_format" not in extra


def collect_example(
    model: Any,
    task: ContextTask,
    index: int,
    settings: StoreSettings,
    batch_size: int = 8,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> AblationExample:
    """One training example: generate the response if needed, read features, run the ablations."""
    backend = get_backend(model)
    tt = prepare_task(backend, task, max_new_tokens)
    assert tt.target_token_range is not None and tt.response is not None
    sources = list(tt.source_token_ranges)
    options = FeatureOptions.from_layout_name(settings.feature_layout)
    fpass = extract_features(backend.model, tt.input_ids, sources, tt.target_token_range, options=options)
    assert fpass.token_logprobs is not None
    masks = random_masks(len(sources), settings.n_masks, settings.keep_prob, seed=settings.seed, index=index)
    output: OutputType = settings.output_type  # type: ignore[assignment]
    mode: AblationMode = settings.ablation_mode  # type: ignore[assignment]
    outputs = ablation_fn(backend.model, tt, mode=mode, output=output, batch_size=batch_size)(masks)
    full = output_from_logprob(fpass.token_logprobs.sum(), output)
    meta = {
        "n_sources": len(sources),
        "n_tokens": int(tt.seq_len),
        "response": tt.response,
        "target": tt.target_text,
        "query": task.query,
        "granularity": settings.granularity,
    }
    return AblationExample(index, fpass.features(), masks, outputs, float(full), meta)


def load_examples(store_dir: str | Path) -> list[AblationExample]:
    """All examples of a store, in index order."""
    return AblationStore(store_dir).load()


__all__ = ["collect", "collect_example", "load_examples"]
