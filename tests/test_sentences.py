"""Every sentence of a response from one pass (issue #18 item 7): ``AT2Attribution.attribute_sentences`` scores each
sentence as ``attribute(task, target=sentence)`` would, from one feature pass in all, and renders as a citation view
(HTML report, terminal, ``at2-lens attribute --per-sentence``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console

from at2_lens.at2.attribution import AT2Attribution
from at2_lens.backends import get_backend
from at2_lens.cli import main
from at2_lens.models.tiny import save_tiny
from at2_lens.report import write_report
from at2_lens.results import SentenceAttributions
from at2_lens.tasks import ContextTask
from at2_lens.tasks.sources import split_sentences
from tests.conftest import BACKENDS
from tests.test_one_pass import passes_after_generation
from tests.test_report import Page, parse

CONTEXT = ["The cat sat on the mat. Dogs bark loudly at night.", "Paris is the capital of France. The sky is blue."]
QUERY = "Where is Paris & why?"
RESPONSE = "Paris is in France. It is <the> capital!  Cats sit on mats."


def _check_self_contained(page: Page) -> None:
    """No script, stylesheet or image, and every link stays on the page (the citation markers' anchors)."""
    assert "script" not in page.tags and "link" not in page.tags and "img" not in page.tags
    assert page.urls and all(url.startswith("#") for url in page.urls)


def _task(response: str | None = RESPONSE) -> ContextTask:
    return ContextTask(CONTEXT, QUERY, response=response, sources="sentence")


def _same_as_one_by_one(at2: AT2Attribution, task: ContextTask, res: SentenceAttributions, **kwargs: Any) -> None:
    for text, span, att in res:
        alone = at2.attribute(task, target=span, **kwargs)
        assert alone.extra["forward_passes"] == 0  # the response's pass is cached
        assert alone.target_text == text == att.target_text
        torch.testing.assert_close(att.scores, alone.scores, atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_sentence_from_one_pass(tiny_llama_models: dict[str, Any], backend: str) -> None:
    at2 = AT2Attribution(tiny_llama_models[backend])
    _ = get_backend(tiny_llama_models[backend]).probe  # the one-off probe is not the call's own
    before = at2.forward_passes
    res = at2.attribute_sentences(_task())
    assert res.extra["forward_passes"] == 1 and at2.forward_passes - before == 1
    assert sum(s.attribution.extra["forward_passes"] for s in res) == 1
    spans = split_sentences(RESPONSE)
    assert len(res) == len(spans) == 3 and [s.span for s in res] == spans
    assert [s.text for s in res] == [RESPONSE[a:b] for a, b in spans] == [
        "Paris is in France.", "It is <the> capital!", "Cats sit on mats."]
    assert all(s.attribution.response == RESPONSE and s.attribution.query == QUERY for s in res)
    _same_as_one_by_one(at2, _task(), res)
    assert at2.forward_passes - before == 1  # nothing above ran another pass
    again = at2.attribute_sentences(_task())
    assert again.extra["forward_passes"] == 0
    top = res.top(2)
    assert len(top) == 3 and all(len(row) == 2 for row in top)
    assert top[0] == res[0].attribution.top_k(2)
    assert res.citations(2) == [[i for i, _, s in row if s > 0] for row in top]
    text, span, att = res[1]  # a (text, span, attribution) tuple
    assert RESPONSE[span[0]:span[1]] == text and att.target_text == text


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_sentence_from_the_users_cache(tiny_llama_models: dict[str, Any], backend: str) -> None:
    import at2_lens

    model = tiny_llama_models[backend]
    at2 = AT2Attribution(model)
    _ = get_backend(model).probe
    ids = _task().tokenize(model.tokenizer).input_ids
    _, cache = model.run_with_cache(ids[None], names_filter=at2_lens.cache_filter(model))
    before = at2.forward_passes
    from_cache = at2.attribute_sentences(_task(), cache=cache)
    assert at2.forward_passes == before and from_cache.extra["forward_passes"] == 0
    fresh = at2.attribute_sentences(_task())
    assert [s.span for s in from_cache] == [s.span for s in fresh]
    for a, b in zip(from_cache, fresh, strict=True):
        torch.testing.assert_close(a.attribution.scores, b.attribution.scores, atol=1e-6, rtol=1e-5)
    narrowed = fresh[0].attribution.task  # a tokenized task whose target is one sentence: every sentence still comes
    assert narrowed is not None and len(at2.attribute_sentences(narrowed, cache=cache)) == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_generated_response_costs_generation_and_one_pass(tiny_llama_models: dict[str, Any], backend: str) -> None:
    model = tiny_llama_models[backend]
    at2 = AT2Attribution(model)
    _ = get_backend(model).probe
    with passes_after_generation(get_backend(model)) as count:
        res = at2.attribute_sentences(_task(None), max_new_tokens=12)
    assert count[0] == 1 and res.extra["forward_passes"] == 1
    assert sum(s.attribution.extra["forward_passes"] for s in res) == 1
    assert [s.span for s in res] == split_sentences(res.response)
    _same_as_one_by_one(at2, _task(None), res, max_new_tokens=12)  # generated again: the same tokens, cached pass


def test_citation_view_html(tiny_llama: Any, tmp_path: Path) -> None:
    at2 = AT2Attribution(tiny_llama)
    res = at2.attribute_sentences(_task())
    page = parse(write_report(tmp_path / "cite.html", res, at2.head_weights, citations=2))
    _check_self_contained(page)
    assert page.text["at2-query"] == QUERY
    assert page.text["at2-response"].replace("[1]", "").replace("[2]", "").replace("[3]", "") == RESPONSE
    sentences = page.attrs["at2-sentence"]
    assert [a["data-sentence"] for a in sentences] == ["0", "1", "2"]
    cites = page.attrs["at2-cite"]
    expected = [i for row in res.citations(2) for i in row]
    assert [int(a["data-source"] or -1) for a in cites] == expected and expected
    html = (tmp_path / "cite.html").read_text(encoding="utf-8")
    for a in cites:  # every marker links to the source listed on the page, with its score on hover
        i = int(a["data-source"] or -1)
        assert a["href"] == f"#at2-src-{i}" and f'id="at2-src-{i}"' in html
        assert a["title"] is not None and a["title"].startswith(f"[{i + 1}] source {i}: score ")
    assert "&lt;the&gt;" in html and "<the>" not in html  # response text is escaped
    assert "at2-heads" in html  # the head-weight heatmap still comes along


def test_citation_view_in_terminal(tiny_llama: Any) -> None:
    res = AT2Attribution(tiny_llama).attribute_sentences(_task())
    console = Console(record=True, width=200)
    console.print(res)
    out = console.export_text()
    first = res.citations(3)[0]
    assert "Paris is in France." + "".join(f"[{i + 1}]" for i in first) in out
    assert "Sources cited:" in out


def test_cli_per_sentence(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = save_tiny("llama", tmp_path / "model")
    out_json, out_html = tmp_path / "s.json", tmp_path / "s.html"
    assert main(["attribute", "--model", str(model), "--context-text", " ".join(CONTEXT), "--query", QUERY,
                 "--response", RESPONSE, "--per-sentence", "--top", "2", "--json", str(out_json),
                 "--html", str(out_html)]) == 0
    data = json.loads(out_json.read_text(encoding="utf-8"))
    assert [s["text"] for s in data["sentences"]] == ["Paris is in France.", "It is <the> capital!",
                                                      "Cats sit on mats."]
    assert all(len(s["scores"]) == len(data["sources"]) == 4 for s in data["sentences"])
    page = parse(out_html)
    _check_self_contained(page)
    assert len(page.attrs["at2-sentence"]) == 3 and 1 <= len(page.attrs["at2-cite"]) <= 6
    printed = capsys.readouterr().out
    assert "Paris is in France.[" in printed and "Sources cited:" in printed


@pytest.mark.parametrize("extra", [["--save", "x.safetensors"], ["--target", "0:5"]])
def test_cli_per_sentence_refuses_single_target_options(extra: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["attribute", "--context-text", "c.", "--query", "q?",
            "--response", "An answer.", "--per-sentence", *extra]
    assert main(argv) == 2
    assert extra[0] in capsys.readouterr().err


@pytest.mark.real
def test_every_sentence_on_smollm2(smollm2: object, tmp_path: Path) -> None:
    from at2_lens.at2.pretrained import default_estimator_for

    at2 = AT2Attribution(smollm2, estimator=default_estimator_for(smollm2))
    context = ["Mount Everest is 8,849 metres tall.", "The Eiffel Tower is in Paris.",
               "Lake Baikal is the deepest lake."]
    response = "Mount Everest is 8,849 metres tall. The Eiffel Tower stands in Paris."
    task = ContextTask(context, "Tell me about Everest and the Eiffel Tower.", response=response, sources="sentence")
    res = at2.attribute_sentences(task)
    assert res.extra["forward_passes"] == 1 and len(res) == 2
    _same_as_one_by_one(at2, task, res)
    assert res.top(1)[0][0][0] == 0 and res.top(1)[1][0][0] == 1  # each sentence cites its own source first
    page = parse(write_report(tmp_path / "real.html", res))
    _check_self_contained(page)
    assert [a["data-source"] for a in page.attrs["at2-cite"]][:1] == ["0"]
