"""Context pruning: keep-masks from scores, the pruned text, and re-asking over it (tiny and real models)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from at2_lens.ablation import removal_builder
from at2_lens.at2.attribution import AT2Attribution
from at2_lens.at2.pretrained import load_estimator
from at2_lens.backends import get_backend
from at2_lens.errors import InputError
from at2_lens.pruning import (
    DEFAULT_MASS,
    Reanswer,
    mass_mask,
    prune,
    prune_and_reanswer,
    prune_context,
    pruned_context,
    top_k_mask,
)
from at2_lens.tasks import ContextTask, prepare_task
from at2_lens.tasks.loaders import demo_task

CONTEXT = "Paris is in France. Berlin is in Germany. Rome is in Italy. Madrid is in Spain."


def test_top_k_mask_keeps_the_highest_scores_and_breaks_ties_by_order() -> None:
    scores = torch.tensor([0.1, 0.9, 0.5, 0.9])
    assert top_k_mask(scores, 1).tolist() == [False, True, False, False]
    assert top_k_mask(scores, 2).tolist() == [False, True, False, True]
    assert top_k_mask(scores, 3).tolist() == [False, True, True, True]
    for bad, k in ((scores, 0), (scores, 5), (torch.tensor([0.1, float("nan")]), 1), (torch.zeros(0), 1)):
        with pytest.raises(InputError, match=r"^(k|scores):"):
            top_k_mask(bad, k)


def test_pruned_text_is_what_remove_mode_ablation_feeds_the_model(tiny_llama: Any) -> None:
    backend = get_backend(tiny_llama)
    task = ContextTask(context=CONTEXT, query="Where is Rome?", response="Italy.", sources="sentence")
    tok = prepare_task(backend, task)
    keep = torch.tensor([False, False, True, True])
    text = pruned_context(tok, keep)
    assert text == "  Rome is in Italy. Madrid is in Spain."  # the spaces between sentences belong to no source
    # Re-tokenising a task over the pruned text gives the ids that remove-mode ablation builds.
    ids, _ = removal_builder(backend.tokenizer, tok)(keep)
    pruned_tok = prepare_task(backend, ContextTask(context=text, query="Where is Rome?", response="Italy."))
    assert torch.equal(ids, pruned_tok.input_ids)
    with pytest.raises(InputError, match="keep"):
        pruned_context(tok, torch.ones(3, dtype=torch.bool))


def test_prune_context_returns_a_task_without_response(tiny_llama: Any) -> None:
    task = ContextTask(context=CONTEXT, query="Where is Rome?", response="Italy.", sources="sentence")
    result = AT2Attribution(tiny_llama).attribute(task)
    pruned = prune_context(task, result, 2)
    kept = [result.task.source_texts[i] for i in top_k_mask(result.scores, 2).nonzero().flatten().tolist()]
    assert pruned.response is None and pruned.query == task.query
    assert all(s in pruned.context for s in kept) and len(pruned.context) < len(CONTEXT)
    assert prepare_task(get_backend(tiny_llama), pruned.with_response("Italy.")).n_sources == 2


@pytest.mark.real
@pytest.mark.slow
def test_pruning_the_demo_context_to_the_top_sentence_keeps_the_answer(smollm2: Any) -> None:
    """On the demo question the shipped estimator ranks the height sentence first; pruned to it, SmolLM2 still
    answers with the height."""
    task = demo_task()
    result = AT2Attribution(smollm2, estimator=load_estimator()).attribute(task, max_new_tokens=16)
    pruned = prune_context(task, result, 1)
    assert "8,849" in pruned.context and "Eiffel" not in pruned.context
    answer = prepare_task(get_backend(smollm2), pruned, 16).response
    assert answer is not None and "8,849" in answer.replace(" ", "")


def test_mass_mask_keeps_the_fewest_sources_holding_the_share() -> None:
    scores = torch.tensor([0.1, 0.6, -0.5, 0.3])  # positive mass 1.0: 0.6, then 0.3, then 0.1
    assert mass_mask(scores, 0.5).tolist() == [False, True, False, False]
    assert mass_mask(scores, 0.6).tolist() == [False, True, False, False]  # reaching the share exactly is enough
    assert mass_mask(scores, 0.61).tolist() == [False, True, False, True]
    assert mass_mask(scores, 0.95).tolist() == [True, True, False, True]
    assert mass_mask(scores, 1.0).tolist() == [True, True, False, True]  # a negative source is never needed
    # nothing positive: nothing is pruned on no evidence
    assert mass_mask(torch.tensor([-1.0, 0.0, -2.0]), 0.5).tolist() == [True, True, True]
    for bad, mass in ((scores, 0.0), (scores, 1.5), (scores, float("nan")), (torch.tensor([float("inf")]), 0.5)):
        with pytest.raises(InputError, match=r"^(mass|scores):"):
            mass_mask(bad, mass)


def test_mass_mask_grows_with_the_share() -> None:
    scores = torch.rand(12, generator=torch.Generator().manual_seed(0)) - 0.3
    kept = [int(mass_mask(scores, m).sum()) for m in (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)]
    assert kept == sorted(kept) and kept[0] >= 1
    assert kept[-1] == int((scores > 0).sum())


def test_prune_reports_what_it_kept_and_removed(tiny_llama: Any) -> None:
    task = ContextTask(context=CONTEXT, query="Where is Rome?", response="Italy.", sources="sentence")
    result = AT2Attribution(tiny_llama).attribute(task)
    by_k = prune(task, result, k=3)
    assert len(by_k.kept) == 3 and len(by_k.removed) == 1 and by_k.rule == "top_k" and by_k.kept_fraction == 0.75
    assert set(by_k.kept) | set(by_k.removed) == set(range(4))
    assert by_k.removed_texts[0] not in by_k.context and all(t in by_k.context for t in by_k.kept_texts)
    assert by_k.task == prune_context(task, result, 3)
    by_mass = prune(task, result, mass=1.0)
    assert by_mass.rule == "mass" and by_mass.keep.tolist() == mass_mask(result.scores, 1.0).tolist()
    for kwargs in ({}, {"k": 1, "mass": 0.5}):
        with pytest.raises(InputError, match=r"^k / mass:"):
            prune(task, result, **kwargs)


class _Recorder:
    """An attribution method stand-in that records calls (to prove checks run before any generation)."""

    def __init__(self, model: Any) -> None:
        self.forward_func = model
        self.calls = 0

    def attribute(self, task: Any, **kwargs: Any) -> Any:
        self.calls += 1
        raise AssertionError("attribute ran before the input was checked")


def test_prune_and_reanswer_answers_over_both_contexts(tiny_llama: Any) -> None:
    task = ContextTask(context=CONTEXT, query="Where is Rome?", sources="sentence")
    out = prune_and_reanswer(tiny_llama, task, AT2Attribution(tiny_llama), k=2, max_new_tokens=5)
    assert isinstance(out, Reanswer) and out.old_answer == out.attribution.response
    assert out.pruned.kept == prune(task, out.attribution, k=2).kept and len(out.pruned.removed) == 2
    backend = get_backend(tiny_llama)
    assert out.old_answer == prepare_task(backend, task, 5).response  # greedy: the same answer again
    assert out.new_answer == prepare_task(backend, out.pruned.task, 5).response
    scores = out.answer_scores([out.new_answer])
    assert scores["new"]["exact_match"] == 1.0 and set(scores["old"]) == set(scores["new"])
    # a method by name; no rule keeps DEFAULT_MASS of the positive mass
    lines: list[str] = []
    by_name = prune_and_reanswer(tiny_llama, task, "avg_attention", max_new_tokens=5, progress=lines.append)
    assert by_name.pruned.rule == "mass" and by_name.pruned.value == DEFAULT_MASS
    assert by_name.pruned.keep.tolist() == mass_mask(by_name.attribution.scores, DEFAULT_MASS).tolist()
    assert by_name.attribution.method.startswith("average attention") and len(lines) == 2
    # a task with a response: that response is the old answer
    given = prune_and_reanswer(tiny_llama, task.with_response("Italy."), k=1, max_new_tokens=5)
    assert given.old_answer == "Italy." and len(given.pruned.kept) == 1


def test_prune_and_reanswer_checks_before_generating(tiny_llama: Any) -> None:
    from at2_lens.models.tiny import load_tiny

    task = ContextTask(context=CONTEXT, query="Where is Rome?", sources="sentence")
    recorder = _Recorder(tiny_llama)
    for kwargs, name in (({"k": 5}, "k"), ({"k": 0}, "k"), ({"k": 1, "mass": 0.5}, "k / mass"),
                         ({"mass": 0.0}, "mass"), ({"mass": 1.5}, "mass"), ({"max_new_tokens": 0}, "max_new_tokens")):
        with pytest.raises(InputError, match=rf"^{name}:"):
            prune_and_reanswer(tiny_llama, task, recorder, **kwargs)
    with pytest.raises(InputError, match=r"^task:"):
        prune_and_reanswer(tiny_llama, "Where is Rome?", recorder, k=1)  # type: ignore[arg-type]
    with pytest.raises(InputError, match=r"^method:"):
        prune_and_reanswer(tiny_llama, task, object(), k=1)
    with pytest.raises(InputError, match=r"^method: unknown method 'at3'"):
        prune_and_reanswer(tiny_llama, task, "at3", k=1)
    with pytest.raises(InputError, match=r"^method: attributes with another model"):
        prune_and_reanswer(tiny_llama, task, _Recorder(load_tiny("llama", seed=1)), k=1)
    assert recorder.calls == 0


@pytest.mark.real
@pytest.mark.slow
def test_prune_and_reanswer_keeps_the_answer_on_the_demo_question(smollm2: Any) -> None:
    """SmolLM2 answers the demo question with the height over the full context and again over the context AT2
    pruned to its top sentences; the removed sentences are about the Eiffel Tower and the Great Wall."""
    out = prune_and_reanswer(smollm2, demo_task(), k=2, max_new_tokens=24)
    assert "8,849" in out.old_answer and "8,849" in out.new_answer.replace(" ", "")
    assert out.answer_scores(["8,849 metres", "8,849"])["new"]["contains"] == 1.0
    assert len(out.pruned.removed) == 7 and any("8,849" in t for t in out.pruned.kept_texts)
    assert all("Eiffel" not in t for t in out.pruned.kept_texts)
    assert any("Great Wall" in t for t in out.pruned.removed_texts)
