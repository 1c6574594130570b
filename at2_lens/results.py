"""The result of a source attribution: scores per source, with a table, the top-k and a highlighted view.

Every context-attribution method of at2_lens (AT2, its baselines) returns this type, built the same way by
:meth:`SourceAttribution.from_task`, so results compare and render the same way: ``to_dataframe()`` for analysis,
``top_k()`` for a quick look, ``_repr_html_`` in a notebook and ``__rich__`` in a terminal.

Cost contract: ``extra["forward_passes"]`` and ``extra["backward_passes"]`` are the passes of the ``attribute``
call that made the result (sequences through the model; a batch of 8 counts 8), so a call served from a cache
reports 0.

Results last: ``result.save(path)`` writes one safetensors file (scores, per-token scores and the task's token ids
as tensors; texts, spans, target, method, units, ``extra`` and the model fingerprint as canonical JSON, with a
format version) and ``SourceAttribution.load(path)`` reads it back without executing anything.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, overload

import torch
from jaxtyping import Float
from torch import Tensor

from at2_lens._result_files import json_extra, read_result, write_result
from at2_lens._validate import check_int
from at2_lens.errors import InputError, NumericalError, ResultFileError
from at2_lens.ranking import rank
from at2_lens.tasks import Span, TokenizedTask

RESULT_FORMAT = "at2_lens.source_attribution"
RESULT_FORMAT_VERSION = 1

if TYPE_CHECKING:
    import pandas as pd
    from rich.text import Text

    from at2_lens.viz import CircuitsVisView


def _preview(text: str, n: int = 40) -> str:
    """``text`` on one line, cut to ``n`` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= n else flat[: n - 1] + "…"


@dataclass(frozen=True)
class SourceAttribution:
    """Per-source scores for one target span of one response.

    Attributes:
        scores: one score per source (higher = the target relies more on that source).
        source_texts / source_spans: each source's text and character span in ``context``.
        context: the context text the sources partition.
        target_text: the attributed span of the response; ``response`` is the whole response.
        token_scores: optional ``[target token, source]`` scores, one row per target token.
        target_tokens: the target's tokens (as strings) when ``token_scores`` is given.
        method: which method produced the scores; ``units`` what the scores mean.
        extra: the cost of the call (``forward_passes``, ``backward_passes``) and method-specific details.
        task: the tokenized task the scores belong to (prompt, response, token ranges), when known.
        model_fingerprint: the model the scores came from (``at2_lens.at2.estimator.model_fingerprint``), when known
            (set by ``save(path, model=...)`` and kept by ``load``).
        query: the query the response answers, when known (taken from the task).
    """

    scores: Float[Tensor, " source"]
    source_texts: tuple[str, ...]
    source_spans: tuple[Span, ...]
    context: str
    target_text: str
    response: str
    method: str
    units: str = "unitless"
    token_scores: Float[Tensor, "target source"] | None = None
    target_tokens: tuple[str, ...] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    task: TokenizedTask | None = None
    model_fingerprint: dict[str, Any] | None = None
    query: str | None = None

    @classmethod
    def from_task(
        cls,
        task: TokenizedTask,
        scores: Tensor,
        *,
        method: str,
        units: str,
        forward_passes: int,
        backward_passes: int = 0,
        token_scores: Tensor | None = None,
        target_tokens: tuple[str, ...] | None = None,
        **extra: Any,
    ) -> SourceAttribution:
        """The result of one ``attribute`` call on ``task``: what every method returns.

        ``forward_passes`` / ``backward_passes`` are this call's own (see the module docstring); ``extra`` holds
        them and any method-specific details given as keywords.
        """
        if task.response is None or task.target_text is None:
            raise InputError("task: a result needs a tokenized task with a response (a target)")
        return cls(
            scores=scores.detach().float().cpu(),
            source_texts=task.source_texts,
            source_spans=task.source_spans,
            context=task.context,
            target_text=task.target_text,
            response=task.response,
            method=method,
            units=units,
            token_scores=None if token_scores is None else token_scores.detach().float().cpu(),
            target_tokens=target_tokens,
            extra={"forward_passes": int(forward_passes), "backward_passes": int(backward_passes), **extra},
            task=task,
            query=task.query,
        )

    def __post_init__(self) -> None:
        n = len(self.source_texts)
        if self.scores.shape != (n,) or len(self.source_spans) != n:
            raise InputError(f"scores: expected shape ({n},) matching the sources, got {tuple(self.scores.shape)}")
        if not torch.isfinite(self.scores).all():
            raise NumericalError(f"scores: {self.method} produced NaN or inf scores; refusing to return them")

    @property
    def n_sources(self) -> int:
        return len(self.source_texts)

    def ranking(self) -> list[int]:
        """Source indices from highest to lowest score (ties broken by position)."""
        return rank(self.scores)

    def top_k(self, k: int = 5) -> list[tuple[int, str, float]]:
        """The ``k`` highest-scoring sources as ``(index, text, score)``."""
        check_int("k", k)
        return [(i, self.source_texts[i], float(self.scores[i])) for i in self.ranking()[:k]]

    def to_dataframe(self) -> pd.DataFrame:
        """One row per source: index, text, character span, score, rank (1 = highest)."""
        import pandas as pd

        rank = {i: r + 1 for r, i in enumerate(self.ranking())}
        return pd.DataFrame(
            {
                "source": list(range(self.n_sources)),
                "text": list(self.source_texts),
                "start": [a for a, _ in self.source_spans],
                "end": [b for _, b in self.source_spans],
                "score": self.scores.tolist(),
                "rank": [rank[i] for i in range(self.n_sources)],
            }
        )

    # ----------------------------------------------------------------------------------------------- files
    def save(self, path: Path | str, *, model: Any = None) -> Path:
        """Write this result to ``path`` (one safetensors file, written atomically); returns the path.

        With ``model`` (a TransformerLens model or its ``Backend``), its fingerprint is recorded, so ``load`` can
        check the file against a model. ``extra`` values must be JSON (numbers, strings, lists, dicts; tuples come
        back as lists) or tensors; anything else is an InputError naming the key, and no file is written.
        """
        extra, extra_tensors = json_extra(self.extra)
        tensors: dict[str, Tensor] = {"scores": self.scores.detach().float().cpu()}
        if self.token_scores is not None:
            tensors["token_scores"] = self.token_scores.detach().float().cpu()
        if self.task is not None:
            tensors["task.input_ids"] = self.task.input_ids.detach().long().cpu()
        tensors.update({f"extra.{key}": value for key, value in extra_tensors.items()})
        fingerprint = self.model_fingerprint
        if model is not None:
            from at2_lens.at2.estimator import model_fingerprint
            from at2_lens.backends import get_backend

            fingerprint = model_fingerprint(get_backend(model))
        meta = {
            "method": self.method, "units": self.units, "context": self.context,
            "source_texts": list(self.source_texts), "source_spans": [list(s) for s in self.source_spans],
            "target_text": self.target_text, "response": self.response,
            "target_tokens": None if self.target_tokens is None else list(self.target_tokens),
            "extra": extra, "extra_tensors": sorted(extra_tensors),
            "task": None if self.task is None else _task_meta(self.task),
            "model_fingerprint": fingerprint,
            "query": self.query,
        }
        return write_result(path, RESULT_FORMAT, RESULT_FORMAT_VERSION, tensors, meta)

    @classmethod
    def load(cls, path: Path | str, *, model: Any = None) -> SourceAttribution:
        """Read a result written by :meth:`save` (never executes code from the file).

        With ``model``, the fingerprint recorded in the file (if any) must match the model's. Raises ResultFileError
        for a missing, corrupted or pickle-based file, a file of another kind (e.g. an ``AttAttrResult``) or of
        another format version.
        """
        tensors, meta = read_result(path, RESULT_FORMAT, RESULT_FORMAT_VERSION)
        try:
            if not isinstance(meta["model_fingerprint"], dict | None):
                raise TypeError(f"model_fingerprint is {meta['model_fingerprint']!r}")
            extra = dict(meta["extra"])
            for key in meta["extra_tensors"]:
                extra[key] = tensors[f"extra.{key}"]
            task = None
            if meta["task"] is not None:
                task = _task_from_meta(meta["task"], tensors["task.input_ids"])
            target_tokens = meta["target_tokens"]
            result = cls(
                scores=tensors["scores"], source_texts=tuple(meta["source_texts"]),
                source_spans=tuple(_span(s) for s in meta["source_spans"]), context=meta["context"],
                target_text=meta["target_text"], response=meta["response"], method=meta["method"],
                units=meta["units"], token_scores=tensors.get("token_scores"),
                target_tokens=None if target_tokens is None else tuple(target_tokens), extra=extra, task=task,
                model_fingerprint=meta["model_fingerprint"], query=_optional_str(meta.get("query"), "query"),
            )
        except (KeyError, TypeError, ValueError, ArithmeticError) as exc:
            raise ResultFileError(f"{path}: inconsistent SourceAttribution file ({type(exc).__name__}: {exc})"
                                  ) from None
        if model is not None and result.model_fingerprint is not None:
            _check_fingerprint(path, result.model_fingerprint, model)
        return result

    # --------------------------------------------------------------------------------------------- rendering
    def _weights(self) -> list[float]:
        top = float(self.scores.abs().max()) if self.n_sources else 0.0
        return [float(s) / top if top > 0 else 0.0 for s in self.scores]

    def _pieces(self) -> list[tuple[str, int | None]]:
        """The context cut into (text, source index or None) pieces in order."""
        pieces: list[tuple[str, int | None]] = []
        pos = 0
        for i, (a, b) in sorted(enumerate(self.source_spans), key=lambda x: x[1]):
            if a > pos:
                pieces.append((self.context[pos:a], None))
            pieces.append((self.context[a:b], i))
            pos = b
        if pos < len(self.context):
            pieces.append((self.context[pos:], None))
        return pieces

    def target_char_range(self) -> Span | None:
        """The target's characters in ``response``: the task's range, else the target's first occurrence, else
        None."""
        if self.task is not None and self.task.target_char_range is not None and self.task.response == self.response:
            return self.task.target_char_range
        start = self.response.find(self.target_text)
        return None if start < 0 or not self.target_text else (start, start + len(self.target_text))

    def _token_char_ranges(self, target: Span) -> list[Span] | None:
        """Each target token's characters in ``response`` (clipped to ``target``), where they can be known: from the
        task's token offsets, else from ``target_tokens`` when they spell the target exactly; else None."""
        if self.token_scores is None:
            return None
        n = int(self.token_scores.shape[0])
        c0, c1 = target
        task = self.task
        if task is not None and task.target_token_range is not None and task.response == self.response:
            t0, t1 = task.target_token_range
            if t1 - t0 == n:
                shift = len(task.prompt)
                return [(max(s - shift, c0), min(e - shift, c1)) for s, e in task.offsets[t0:t1]]
        if self.target_tokens is not None and len(self.target_tokens) == n and "".join(self.target_tokens) == (
            self.response[c0:c1]
        ):
            out, pos = [], c0
            for tok in self.target_tokens:
                out.append((pos, pos + len(tok)))
                pos += len(tok)
            return out
        return None

    def _token_title(self, k: int, top: int = 3) -> str:
        """Hover text of target token ``k``: its text and its ``top`` highest-scoring sources."""
        assert self.token_scores is not None
        row = self.token_scores[k]
        label = repr(self.target_tokens[k]) if self.target_tokens is not None else ""
        best = rank(row)[:top]
        lines = [f"token {k} {label}".rstrip() + f" ({self.units})"]
        lines += [f"source {i}: {float(row[i]):.4g} ({_preview(self.source_texts[i])})" for i in best]
        return "\n".join(lines)

    def _token_span(self, text: str, tokens: list[int]) -> str:
        assert self.token_scores is not None
        title = "\n".join(self._token_title(k) for k in tokens)
        scores = ";".join(" ".join(f"{float(v):.6g}" for v in self.token_scores[k]) for k in tokens)
        return (f'<span class="at2-token" data-tokens="{" ".join(map(str, tokens))}" data-scores="{scores}" '
                f'title="{html.escape(title)}" style="border-bottom:1px dotted #555;cursor:help">'
                f"{html.escape(text)}</span>")

    def response_html(self) -> str:
        """The whole response with the target marked; with per-token scores, each target token carries its
        scores as hover text (a ``title``), so the page needs no script or external resource."""
        target = self.target_char_range()
        if target is None:
            return f'<span class="at2-response" style="white-space:pre-wrap">{html.escape(self.response)}</span>'
        c0, c1 = target
        inner: list[str] = []
        spans = self._token_char_ranges(target)
        if spans is None:
            inner.append(html.escape(self.response[c0:c1]))
        else:
            groups: list[tuple[int, int, list[int]]] = []  # (start, end, target tokens shown there)
            pos, pending = c0, list[int]()
            for k, (a, b) in enumerate(spans):
                a = max(a, pos)
                if b <= a:  # a token with no characters of its own here (e.g. part of one character): shown
                    pending.append(k)  # with its neighbour
                    continue
                groups.append((a, b, [*pending, k]))
                pending, pos = [], b
            if pending and groups:
                a, b, ks = groups[-1]
                groups[-1] = (a, b, [*ks, *pending])
            elif pending:
                groups.append((c0, c1, pending))
            pos = c0
            for a, b, ks in groups:
                inner.append(html.escape(self.response[pos:a]))
                inner.append(self._token_span(self.response[a:b], ks))
                pos = b
            inner.append(html.escape(self.response[pos:c1]))
        mark = (f'<mark class="at2-target" title="{html.escape("target: " + self.target_text)}" '
                f'style="background:#fff3a0;padding:0 1px">{"".join(inner)}</mark>')
        return (f'<span class="at2-response" style="white-space:pre-wrap">{html.escape(self.response[:c0])}{mark}'
                f"{html.escape(self.response[c1:])}</span>")

    def to_html(self, top: int = 5, *, query: str | None = None) -> str:
        """Self-contained HTML: the query (``query``, else the task's, when known), the whole response with the
        target marked (per-token scores on hover when computed), the context with sources shaded by score, and the
        top sources."""
        weights = self._weights()
        parts = []
        for text, i in self._pieces():
            if i is None:
                parts.append(html.escape(text))
                continue
            w = weights[i]
            color = f"rgba(255, 140, 0, {max(w, 0):.3f})" if w >= 0 else f"rgba(70, 130, 230, {-w:.3f})"
            parts.append(
                f'<span class="at2-source" data-source="{i}" data-score="{float(self.scores[i]):.6g}" '
                f'title="source {i}: score {float(self.scores[i]):.4g}" '
                f'style="background:{color}">{html.escape(text)}</span>'
            )
        rows = "".join(
            f"<tr><td>{i}</td><td>{s:.4g}</td><td>{html.escape(t)}</td></tr>" for i, t, s in self.top_k(top)
        )
        query = query if query is not None else self.query
        marked = self.target_char_range() is not None
        head = (f"<p><b>Method:</b> {html.escape(self.method)} &middot; <b>Target:</b> "
                f'<span class="{"at2-target-text" if marked else "at2-target"}">{html.escape(self.target_text)}'
                "</span></p>")
        if query is not None:
            head += f'<p><b>Query:</b> <span class="at2-query">{html.escape(query)}</span></p>'
        head += f"<p><b>Response:</b> {self.response_html()}</p>"
        if self._token_char_ranges(self.target_char_range() or (0, 0)) is not None:
            head += '<p class="at2-token-hint" style="font-size:smaller">Hover a target token for its own scores.</p>'
        return (
            '<div class="at2-lens-result" style="font-family:sans-serif;line-height:1.6">'
            f"{head}"
            f'<div class="at2-context" style="white-space:pre-wrap;border:1px solid #ddd;padding:8px">'
            f"{''.join(parts)}</div>"
            f'<table class="at2-top"><tr><th>source</th><th>score ({html.escape(self.units)})</th><th>text</th></tr>'
            f"{rows}</table></div>"
        )

    def _repr_html_(self) -> str:
        return self.to_html()

    def to_circuitsvis(self) -> CircuitsVisView:
        """A CircuitsVis ``colored_tokens`` view of the context: each token shaded by its source's score (0 outside
        every source); orange positive, blue negative, white 0.

        Tokens are the tokenized task's (``self.task``), or words for a result without one. The view's HTML inlines
        the CircuitsVis bundle, so it shows offline; ``view.save_html(path)`` writes it as a page. Needs the
        ``circuitsvis`` extra (``pip install 'at2_lens[circuitsvis]'``); without it this raises an ImportError saying
        so. See :mod:`at2_lens.viz`.
        """
        from at2_lens.viz import source_scores_view

        return source_scores_view(self)

    def __rich__(self) -> Text:
        from rich.text import Text

        weights = self._weights()
        out = Text()
        for text, i in self._pieces():
            if i is None or weights[i] <= 0.05:
                out.append(text, style="dim" if i is not None else "")
            elif weights[i] > 0.5:
                out.append(text, style="bold black on dark_orange")
            else:
                out.append(text, style="black on light_goldenrod2")
        return out

    def __repr__(self) -> str:
        top = ", ".join(f"#{i} {s:.3g}" for i, _, s in self.top_k(min(3, self.n_sources)))
        return f"SourceAttribution(method={self.method!r}, n_sources={self.n_sources}, top=[{top}])"


# ------------------------------------------------------------------------------------------- per-sentence results
def _cite_title(i: int, score: float, text: str) -> str:
    """Hover text of citation marker ``[i + 1]``."""
    return f"[{i + 1}] source {i}: score {score:.4g} - {_preview(text, 80)}"


class SentenceAttribution(NamedTuple):
    """One sentence of a response: its text, its ``(start, end)`` characters in the response, and its attribution."""

    text: str
    span: Span
    attribution: SourceAttribution


@dataclass(frozen=True)
class SentenceAttributions(Sequence[SentenceAttribution]):
    """Every sentence of one response with its own attribution (``AT2Attribution.attribute_sentences``).

    A sequence of :class:`SentenceAttribution` ``(text, span, attribution)`` in response order. ``extra`` holds the
    cost of the whole call (``forward_passes``: one feature pass for all sentences; each sentence's own
    ``attribution.extra["forward_passes"]`` is its share, so they sum to the call's). Rendered as a citation view:
    the response with each sentence followed by bracketed markers ``[n]`` naming its top sources (numbered from 1,
    source ``n - 1`` of the context), in HTML (``to_html``, a notebook's ``_repr_html_``) and in a terminal
    (``__rich__``).

    A citation is a top-``k`` source with a positive score (a score of 0 or less says the sentence does not rely
    on the source).
    """

    sentences: tuple[SentenceAttribution, ...]
    response: str
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.sentences)

    @overload
    def __getitem__(self, i: int) -> SentenceAttribution: ...
    @overload
    def __getitem__(self, i: slice) -> tuple[SentenceAttribution, ...]: ...
    def __getitem__(self, i: int | slice) -> SentenceAttribution | tuple[SentenceAttribution, ...]:
        return self.sentences[i]

    @property
    def source_texts(self) -> tuple[str, ...]:
        """The context's sources (the same for every sentence)."""
        return self.sentences[0].attribution.source_texts if self.sentences else ()

    def top(self, k: int = 3) -> list[list[tuple[int, str, float]]]:
        """Per sentence, its ``k`` highest-scoring sources as ``(index, text, score)`` (``SourceAttribution.top_k``)."""
        check_int("k", k)
        return [s.attribution.top_k(k) for s in self.sentences]

    def citations(self, k: int = 3) -> list[list[int]]:
        """Per sentence, the source indices it cites: its top-``k`` sources with a positive score, best first."""
        return [[i for i, _, score in row if score > 0] for row in self.top(k)]

    def _gaps(self) -> list[tuple[str, int | None]]:
        """The response cut into (text, sentence index or None for the text between sentences) pieces in order."""
        pieces: list[tuple[str, int | None]] = []
        pos = 0
        for n, s in enumerate(self.sentences):
            a, b = s.span
            if a > pos:
                pieces.append((self.response[pos:a], None))
            pieces.append((self.response[a:b], n))
            pos = b
        if pos < len(self.response):
            pieces.append((self.response[pos:], None))
        return pieces

    def to_html(self, k: int = 3, *, query: str | None = None, id_prefix: str = "at2") -> str:
        """Self-contained HTML citation view (no script): the query when known, the response with each sentence
        followed by markers ``[n]`` linking to source ``n - 1`` in the list of cited sources below (hover a marker
        for the source's score and text), then that list. ``id_prefix`` keeps the anchors of several views on one
        page apart."""
        cites = self.citations(k)
        sources = self.source_texts
        parts = []
        for text, n in self._gaps():
            if n is None:
                parts.append(html.escape(text))
                continue
            att = self.sentences[n].attribution
            marks = "".join(
                f'<a class="at2-cite" data-source="{i}" href="#{id_prefix}-src-{i}" '
                f'title="{html.escape(_cite_title(i, float(att.scores[i]), sources[i]))}"'
                f' style="text-decoration:none">[{i + 1}]</a>'
                for i in cites[n]
            )
            parts.append(f'<span class="at2-sentence" data-sentence="{n}">{html.escape(text)}</span>'
                         f'<sup class="at2-citations">{marks}</sup>')
        cited = sorted({i for row in cites for i in row})
        items = "".join(f'<li id="{id_prefix}-src-{i}" value="{i + 1}" data-source="{i}">{html.escape(sources[i])}'
                        "</li>" for i in cited)
        query = query if query is not None else (self.sentences[0].attribution.query if self.sentences else None)
        method = self.sentences[0].attribution.method if self.sentences else ""
        head = f"<p><b>Method:</b> {html.escape(method)} &middot; <b>Citations:</b> top {k} sources per sentence</p>"
        if query is not None:
            head += f'<p><b>Query:</b> <span class="at2-query">{html.escape(query)}</span></p>'
        return ('<div class="at2-lens-sentences" style="font-family:sans-serif;line-height:1.6">'
                f'{head}<p><b>Response:</b> <span class="at2-response" style="white-space:pre-wrap">{"".join(parts)}'
                f'</span></p><p><b>Sources cited:</b></p><ol class="at2-cited-sources">{items}</ol></div>')

    def _repr_html_(self) -> str:
        return self.to_html()

    def to_rich(self, k: int = 3) -> Text:
        """The citation view for a terminal: each sentence followed by its markers ``[n]``, then the cited sources."""
        from rich.text import Text

        cites = self.citations(k)
        out = Text()
        for text, n in self._gaps():
            out.append(text)
            if n is not None:
                out.append("".join(f"[{i + 1}]" for i in cites[n]), style="bold cyan")
        cited = sorted({i for row in cites for i in row})
        if cited:
            out.append("\n\nSources cited:\n", style="bold")
        for i in cited:
            out.append(f"[{i + 1}] ", style="bold cyan")
            out.append(_preview(self.source_texts[i], 100) + "\n")
        return out

    def __rich__(self) -> Text:
        return self.to_rich()

    def __repr__(self) -> str:
        return (f"SentenceAttributions(n_sentences={len(self)}, citations={self.citations()}, "
                f"forward_passes={self.extra.get('forward_passes')})")


# --------------------------------------------------------------------------------------------------- file helpers
_TASK_SPAN_FIELDS = ("offsets", "source_spans", "source_token_ranges", "dropped_sources")
_TASK_PLAIN_FIELDS = ("prompt", "prompt_len", "response", "context", "context_start", "granularity", "target_text",
                      "chat")


def _span(value: Any) -> Span:
    a, b = value
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in (a, b)):
        raise TypeError(f"expected a span of two ints, got {value!r}")
    return (a, b)


def _optional_str(value: Any, name: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"{name} is {value!r}, expected a string or null")
    return value


def _task_meta(task: TokenizedTask) -> dict[str, Any]:
    """Everything of a tokenized task but its token ids, as JSON."""
    meta: dict[str, Any] = {name: getattr(task, name) for name in _TASK_PLAIN_FIELDS}
    meta.update({name: [list(s) for s in getattr(task, name)] for name in _TASK_SPAN_FIELDS})
    meta["source_texts"] = list(task.source_texts)
    meta["query"] = task.query
    for name in ("target_char_range", "target_token_range"):
        value = getattr(task, name)
        meta[name] = None if value is None else list(value)
    return meta


def _task_from_meta(meta: dict[str, Any], input_ids: Tensor) -> TokenizedTask:
    fields: dict[str, Any] = {name: meta[name] for name in _TASK_PLAIN_FIELDS}
    fields.update({name: tuple(_span(s) for s in meta[name]) for name in _TASK_SPAN_FIELDS})
    fields["source_texts"] = tuple(meta["source_texts"])
    fields["query"] = _optional_str(meta.get("query"), "task query")  # absent from files written before it existed
    for name in ("target_char_range", "target_token_range"):
        fields[name] = None if meta[name] is None else _span(meta[name])
    if input_ids.dim() != 1 or input_ids.dtype != torch.int64 or len(fields["offsets"]) != input_ids.shape[0]:
        raise ValueError(f"task token ids of shape {tuple(input_ids.shape)} do not match the task's offsets")
    return TokenizedTask(input_ids=input_ids, **fields)


def _check_fingerprint(path: Path | str, recorded: dict[str, Any], model: Any) -> None:
    """ResultFileError when the ``model`` is not the one the file records."""
    from at2_lens.at2.estimator import compare_fingerprints, model_fingerprint
    from at2_lens.backends import get_backend

    diffs = compare_fingerprints(recorded, model_fingerprint(get_backend(model)), a_label="the result came from",
                                 b_label="this model has")
    if diffs:
        raise ResultFileError(f"{path}: the result belongs to another model: " + "; ".join(diffs))
