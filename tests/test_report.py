"""The HTML report: the query always, the whole response with the target marked, per-token scores on hover exactly
when they were computed, and nothing fetched from outside the page."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import torch

from at2_lens.at2.attribution import AT2Attribution
from at2_lens.report import write_report
from at2_lens.results import SourceAttribution
from at2_lens.tasks import ContextTask

CONTEXT = ["The cat sat on the mat. Dogs bark loudly at night.", "Paris is the capital of France. The sky is blue."]
QUERY = "Where is Paris & why?"
RESPONSE = "Paris is in France. It is <the> capital."


class Page(HTMLParser):
    """Text and attributes of the elements the report marks with its ``at2-*`` classes."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[tuple[str, set[str]]] = []
        self.text: dict[str, str] = {}  # class -> text of its first element
        self.attrs: dict[str, list[dict[str, str | None]]] = {}  # class -> the attributes of each element
        self.tags: set[str] = set()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        a = dict(attrs)
        self.urls += [v for k, v in attrs if k in ("src", "href") and v]
        classes = set((a.get("class") or "").split())
        for c in classes:
            self.attrs.setdefault(c, []).append(a)
            self.text.setdefault(c, "")
        self.stack.append((tag, {c for c in classes if len(self.attrs[c]) == 1}))

    def handle_endtag(self, tag: str) -> None:
        while self.stack and self.stack.pop()[0] != tag:
            pass

    def handle_data(self, data: str) -> None:
        for _, classes in self.stack:
            for c in classes:
                self.text[c] += data


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def _check_self_contained(page: Page) -> None:
    assert "script" not in page.tags and "link" not in page.tags and "img" not in page.tags
    assert page.urls == []


@pytest.fixture(scope="module")
def at2(tiny_llama: Any) -> AT2Attribution:
    return AT2Attribution(tiny_llama)


@pytest.mark.parametrize("per_token", [True, False])
def test_report_shows_query_response_target_and_hover_scores(at2: AT2Attribution, tmp_path: Path,
                                                              per_token: bool) -> None:
    task = ContextTask(CONTEXT, QUERY, response=RESPONSE, sources="sentence")
    target = RESPONSE.index("It is"), len(RESPONSE)
    res = at2.attribute(task, target=target, per_token=per_token)
    assert res.query == QUERY  # recorded with the result, so the report needs no query argument
    page = parse(write_report(tmp_path / "r.html", res, at2.head_weights))
    _check_self_contained(page)
    assert page.text["at2-query"] == QUERY
    assert page.text["at2-response"] == RESPONSE  # the whole response, not only the target
    assert page.text["at2-target"] == res.target_text == "It is <the> capital."
    tokens = page.attrs.get("at2-token", [])
    if not per_token:
        assert tokens == [] and "at2-token-hint" not in page.attrs
        return
    assert res.token_scores is not None and res.target_tokens is not None
    shown = [int(k) for t in tokens for k in str(t["data-tokens"]).split()]
    assert shown == list(range(len(res.target_tokens)))  # every target token, once, in order
    for t in tokens:
        ks = [int(k) for k in str(t["data-tokens"]).split()]
        rows = [[float(v) for v in row.split()] for row in str(t["data-scores"]).split(";")]
        torch.testing.assert_close(torch.tensor(rows), res.token_scores[ks], atol=1e-5, rtol=1e-5)
        title = str(t["title"])
        assert title.startswith(f"token {ks[0]} ") and "source " in title
    assert page.text["at2-token"] and res.target_text.startswith(page.text["at2-token"])  # the first token


@pytest.mark.line_independent
def test_query_passed_to_write_report_wins_and_a_missing_one_is_said(tmp_path: Path) -> None:
    res = SourceAttribution(scores=torch.tensor([0.2, 0.8]), source_texts=("A cat.", "A dog."),
                            source_spans=((0, 6), (7, 13)), context="A cat. A dog.", target_text="dog",
                            response="The dog barks.", method="AT2")
    page = parse(write_report(tmp_path / "a.html", res))
    assert "at2-query" not in page.text and "at2-query-missing" in page.text
    assert page.text["at2-response"] == "The dog barks." and page.text["at2-target"] == "dog"
    assert "at2-token" not in page.attrs
    page = parse(write_report(tmp_path / "b.html", res, query="Which animal?"))
    assert page.text["at2-query"] == "Which animal?" and "at2-query-missing" not in page.text


@pytest.mark.line_independent
def test_per_token_scores_without_a_task_follow_the_target_tokens(tmp_path: Path) -> None:
    """A result built by hand: the target tokens spell the target, so each carries its own scores."""
    res = SourceAttribution(scores=torch.tensor([0.2, 0.8]), source_texts=("A cat.", "A dog."),
                            source_spans=((0, 6), (7, 13)), context="A cat. A dog.", target_text="dog barks",
                            response="The dog barks.", method="AT2", token_scores=torch.tensor([[0.1, 0.9],
                                                                                               [0.3, 0.7]]),
                            target_tokens=("dog", " barks"))
    page = parse(write_report(tmp_path / "c.html", res))
    _check_self_contained(page)
    assert page.text["at2-target"] == "dog barks"
    tokens = page.attrs["at2-token"]
    assert [t["data-tokens"] for t in tokens] == ["0", "1"]
    assert "source 1: 0.7" in str(tokens[1]["title"])
    # Tokens that do not spell the target cannot be placed: no hover spans, rather than wrong ones.
    odd = SourceAttribution(**{**res.__dict__, "target_tokens": ("do", "g!")})
    assert "at2-token" not in parse(write_report(tmp_path / "d.html", odd)).attrs


@pytest.mark.real
def test_smollm2_report_places_every_target_token(smollm2: Any, tmp_path: Path) -> None:
    """Byte-level tokens of a real tokenizer (accents, a dash, an emoji) each get their hover scores once."""
    response = "Paris — the café capital of France 🇫🇷, naturally."
    res = AT2Attribution(smollm2).attribute(ContextTask(CONTEXT, QUERY, response=response), target=(6, 49),
                                            per_token=True)
    page = parse(write_report(tmp_path / "s.html", res))
    assert page.text["at2-query"] == QUERY and page.text["at2-response"] == response
    assert page.text["at2-target"] == res.target_text == response[6:49]
    assert res.target_tokens is not None
    shown = [int(k) for t in page.attrs["at2-token"] for k in str(t["data-tokens"]).split()]
    assert shown == list(range(len(res.target_tokens)))
