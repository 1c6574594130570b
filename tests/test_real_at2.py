"""AT2 on the real SmolLM2-135M-Instruct: ablations behave, collection -> training -> attribution works."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from at2_lens.ablation import mask_mode_outputs
from at2_lens.at2.attribution import AT2Attribution
from at2_lens.at2.collect import collect
from at2_lens.at2.estimator import load_estimator_file, model_fingerprint
from at2_lens.at2.training import train_estimator
from at2_lens.backends import get_backend
from at2_lens.data import SQUAD_V2_DEV_SUBSET
from at2_lens.errors import EstimatorFileError
from at2_lens.tasks import ContextTask
from at2_lens.tasks.loaders import DEMO_CONTEXT, squad_tasks

pytestmark = pytest.mark.real


def test_leave_one_out_finds_the_answer_sentence(smollm2: object) -> None:
    """Masking the sentence that holds the answer hurts the answer more than masking any other sentence."""
    b = get_backend(smollm2)
    task = ContextTask(context=DEMO_CONTEXT, query="What is the height of Mount Everest?",
                       response="The height of Mount Everest is 8,849.")
    tt = task.tokenize(b.tokenizer, max_length=b.n_ctx)
    answer = next(i for i, t in enumerate(tt.source_texts) if "8,849" in t)
    n = tt.n_sources
    masks = ~torch.eye(n, dtype=torch.bool)  # leave one source out per row
    drop = mask_mode_outputs(smollm2, tt.input_ids, list(tt.source_token_ranges), tt.target_token_range,
                             torch.cat([torch.ones(1, n, dtype=torch.bool), masks]), output="log_prob")
    effect = drop[0] - drop[1:]
    assert int(effect.argmax()) == answer, f"largest drop at source {int(effect.argmax())}, expected {answer}"
    assert effect[answer] > 1.0  # the answer becomes much less likely (nats)


def test_collect_train_attribute_on_real_tasks(smollm2: object, tmp_path: Path) -> None:
    path = SQUAD_V2_DEV_SUBSET
    tasks = sorted(squad_tasks(path, limit=8, seed=0), key=lambda t: len(t.context_text))[:4]  # short: cheap passes
    store = collect(smollm2, tasks, tmp_path / "store", n_masks=8, batch_size=8, max_new_tokens=12, progress=False)
    examples = store.load()
    assert len(examples) == 4
    for ex in examples:
        assert ex.features.shape[1:] == (30, 9)
        assert torch.isfinite(ex.outputs).all() and ex.outputs.std() > 0
    est, summary = train_estimator(examples[:3], held_out=examples[3:], steps=100, batch_size=3,
                                   progress=False, settings=store.settings)
    assert summary.lds_held_out is not None and -1.0 <= summary.lds_held_out <= 1.0
    path = est.save(tmp_path / "smollm2.safetensors")
    loaded = load_estimator_file(path, expected_fingerprint=model_fingerprint(get_backend(smollm2)))
    torch.testing.assert_close(loaded.weights, est.weights)
    at2 = AT2Attribution(smollm2, estimator=path)
    held = tasks[3].with_response(examples[3].meta["response"])
    result = at2.attribute(held)
    assert result.method == "AT2" and result.scores.shape == (examples[3].n_sources,)
    # The score is exactly the estimator applied to the features the store recorded for this example.
    torch.testing.assert_close(result.scores, loaded.score(examples[3].features), atol=1e-5, rtol=1e-4)


def test_estimator_for_smollm2_refused_on_another_model(smollm2: object, tiny_llama: object, tmp_path: Path) -> None:
    from at2_lens.at2.estimator import LinearEstimator

    b = get_backend(smollm2)
    path = LinearEstimator.uniform(b.n_layers, b.n_heads, model_fingerprint=model_fingerprint(b)).save(
        tmp_path / "e.safetensors"
    )
    with pytest.raises(EstimatorFileError, match="n_layers=30"):
        AT2Attribution(tiny_llama, estimator=path)
