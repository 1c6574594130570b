"""CircuitsVis views of attributions: source scores over the context's tokens, and the AT2 estimator's top heads.

``SourceAttribution.to_circuitsvis()`` (built by :func:`source_scores_view`) is a CircuitsVis ``colored_tokens`` view
of the context, each token shaded by its source's score (0 outside every source); :func:`top_heads_attention` draws
the attention patterns of the estimator's ``k`` highest-weighted heads with CircuitsVis ``attention_heads``, one
head per ``"L{layer}H{head}"`` label, over the task's tokens (prompt and response).

Both return a :class:`CircuitsVisView`, which works offline: its HTML carries the JavaScript bundle that ships in the
``circuitsvis`` wheel (CircuitsVis's own "local" rendering), never a CDN import, so it shows in a notebook (it has
``_repr_html_``) or, through :meth:`CircuitsVisView.save_html`, as a page with nothing fetched from outside it.

CircuitsVis is an optional dependency (``pip install 'at2_lens[circuitsvis]'``); it is imported only when a view is
made, and a missing install is an ``OptionalDependencyError`` (an ``ImportError``) naming that extra.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from at2_lens._optional import require
from at2_lens.errors import InputError, ModelNotSupportedError
from at2_lens.files import atomic_write_text

if TYPE_CHECKING:
    from at2_lens.at2.attribution import AT2Attribution
    from at2_lens.at2.estimator import LinearEstimator
    from at2_lens.results import SourceAttribution
    from at2_lens.tasks import ContextTask, TokenizedTask

EXTRA = "circuitsvis"
"""The at2_lens extra that installs CircuitsVis."""

POSITIVE_COLOR = "#ff8c00"  # the HTML report's colours: orange for positive scores,
NEGATIVE_COLOR = "#4682e6"  # blue for negative ones


def _circuitsvis(feature: str) -> ModuleType:
    """Import CircuitsVis for ``feature``, or raise OptionalDependencyError (an ImportError) naming the extra."""
    for module in ("circuitsvis.attention", "circuitsvis.tokens"):
        require(module, EXTRA, feature)
    return require("circuitsvis", EXTRA, feature)


@dataclass(frozen=True)
class CircuitsVisView:
    """A rendered CircuitsVis component whose HTML needs nothing from outside itself.

    Attributes:
        component: the CircuitsVis React component (``"ColoredTokens"``, ``"AttentionHeads"``).
        tokens: the tokens shown, as plain text.
        props: the properties the component was given (JSON values). ``ColoredTokens`` inserts token strings into
            the page as HTML, so there ``props["tokens"]`` holds them HTML-escaped (``AttentionHeads`` draws them as
            text and gets them as they are); ``tokens`` always holds them as they are.
        html: the HTML fragment: a ``<div>`` and a ``<script type="module">`` carrying the CircuitsVis bundle.
    """

    component: str
    tokens: tuple[str, ...]
    props: dict[str, Any] = field(repr=False)
    html: str = field(repr=False)

    def _repr_html_(self) -> str:
        return self.html

    def __html__(self) -> str:
        return self.html

    def show_code(self) -> str:
        """The HTML fragment (self-contained, unlike CircuitsVis's own ``show_code``, which imports from a CDN)."""
        return self.html

    def to_page(self, title: str = "at2_lens") -> str:
        """A whole HTML document holding the view."""
        return (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title></head>\n'
                f"<body>\n{self.html}\n</body></html>\n")

    def save_html(self, path: Path | str, *, title: str = "at2_lens") -> Path:
        """Write the view as a self-contained HTML page to ``path`` (atomically); returns the path."""
        return atomic_write_text(path, self.to_page(title))

    def __repr__(self) -> str:
        return f"CircuitsVisView(component={self.component!r}, n_tokens={len(self.tokens)})"


def _render(component: str, build: Any, tokens: Sequence[str], *, html_tokens: bool, **props: Any) -> CircuitsVisView:
    """Call the CircuitsVis function ``build`` and keep its inline ("local") rendering, made safe to embed.

    CircuitsVis renders two ways: ``local_src`` inlines the bundle shipped in its wheel, ``cdn_src`` imports it from
    unpkg.com (its ``_repr_html_`` picks between them by trying to reach google.com). We always take the local one.
    The props are written into the script as JSON, where a ``</script>`` inside a token would end the script: every
    ``<`` in them becomes ``\\u003c``, the same string to JavaScript. With ``html_tokens`` (a component that sets
    each token as a node's inner HTML, like ``ColoredTokens``), tokens are HTML-escaped first, so text such as
    ``<b>`` or ``&amp;`` shows as written.
    """
    given_tokens = [html.escape(t, quote=False) for t in tokens] if html_tokens else list(tokens)
    rendered = build(tokens=given_tokens, **props)
    source: str = rendered.local_src
    marker = f"CircuitsVis.{component},"
    start = source.rfind(marker)
    end = source.rfind(")")
    if start < 0 or end < start:  # pragma: no cover - a CircuitsVis release rendering in another way
        raise RuntimeError(f"CircuitsVis rendered {component} in a form at2_lens does not recognise")
    start += len(marker)
    given = json.loads(source[start:end])
    safe = json.dumps(given).replace("<", "\\u003c")
    page = f"{source[:start]}\n      {safe}\n    {source[end:]}"
    return CircuitsVisView(component=component, tokens=tuple(tokens), props=given, html=page)


# ------------------------------------------------------------------------------------------------ context tokens
def _context_pieces_from_task(result: SourceAttribution) -> list[tuple[str, int]] | None:
    """The context cut at the task's token boundaries, each piece with its token's source (-1 for none); None when
    the result has no task for this context."""
    task = result.task
    if task is None or task.context != result.context or len(task.offsets) != task.seq_len:
        return None
    c0 = task.context_start
    c1 = c0 + len(task.context)
    source_of = task.token_source_index()
    pieces: list[tuple[str, int]] = []
    pos = c0
    for i, (a, b) in enumerate(task.offsets[: task.prompt_len]):
        if b <= a or b <= c0 or a >= c1:  # special tokens (no characters) and tokens outside the context
            continue
        b = min(b, c1)
        if b <= pos:  # a token sharing characters with the one before (e.g. bytes of one character)
            pieces.append(("", source_of[i]))
            continue
        pieces.append((task.prompt[pos:b], source_of[i]))
        pos = b
    if not pieces:
        return None
    if pos < c1:  # trailing characters no token covers (whitespace a tokenizer left out of its offsets)
        text, source = pieces[-1]
        pieces[-1] = (text + task.prompt[pos:c1], source)
    return pieces


def _context_pieces_from_words(result: SourceAttribution) -> list[tuple[str, int]]:
    """The context cut into words (each with the whitespace before it), each with the source holding its first
    non-space character (-1 for none): the fallback for a result without its tokenized task."""
    pieces = []
    for m in re.finditer(r"\s*\S+|\s+$", result.context):
        first = m.start() + len(m.group()) - len(m.group().lstrip())
        source = next((i for i, (a, b) in enumerate(result.source_spans) if a <= first < b), -1)
        pieces.append((m.group(), source))
    return pieces


def context_token_scores(result: SourceAttribution) -> tuple[list[str], list[float]]:
    """The context's tokens and, for each, its source's score (0 outside every source).

    Tokens come from the result's tokenized task (``result.task``): each token's text in the context, whitespace the
    tokenizer left out of its offsets joined to the next token, so the tokens spell the context exactly. A result
    without a task (built by hand) is cut into words instead.
    """
    pieces = _context_pieces_from_task(result) or _context_pieces_from_words(result)
    scores = result.scores.tolist()
    return [text for text, _ in pieces], [float(scores[s]) if s >= 0 else 0.0 for _, s in pieces]


def source_scores_view(result: SourceAttribution) -> CircuitsVisView:
    """CircuitsVis ``colored_tokens`` over ``result``'s context: each token shaded by its source's score.

    The colour scale is symmetric about 0 (white), orange for positive scores and blue for negative ones, as in the
    HTML report. Same as ``result.to_circuitsvis()``.
    """
    cv = _circuitsvis("SourceAttribution.to_circuitsvis")
    tokens, values = context_token_scores(result)
    top = max((abs(v) for v in values), default=0.0) or 1.0
    return _render("ColoredTokens", cv.tokens.colored_tokens, tokens, html_tokens=True, values=values,
                   min_value=-top, max_value=top, negative_color=NEGATIVE_COLOR, positive_color=POSITIVE_COLOR)


# -------------------------------------------------------------------------------------------------- top heads
def head_label(layer: int, head: int) -> str:
    """The label of a head in the views: ``"L3H5"``."""
    return f"L{layer}H{head}"


def _token_strings(task: TokenizedTask, tokenizer: Any) -> list[str]:
    """Every token of ``task`` as text: its characters in ``task.text`` (whitespace before it included), or for a
    token with no characters of its own (special tokens) the tokenizer's spelling of it."""
    text = task.text
    ids = task.input_ids.tolist()
    out, pos = [], 0
    for tid, (a, b) in zip(ids, task.offsets, strict=True):
        if b > a and b > pos:
            out.append(text[pos:b])
            pos = b
        elif tokenizer is not None:
            out.append(str(tokenizer.convert_ids_to_tokens(int(tid))))
        else:
            out.append(f"<{tid}>")
    return out


def _estimator(backend: Any, estimator: Any) -> LinearEstimator:
    """``estimator`` (a LinearEstimator, an estimator file, an AT2Attribution, or None for the one shipped for the
    model) as a LinearEstimator checked against the model."""
    from at2_lens.at2.estimator import LinearEstimator, load_estimator_file, model_fingerprint
    from at2_lens.at2.pretrained import default_estimator_for

    fingerprint = model_fingerprint(backend)
    if estimator is None:
        found = default_estimator_for(backend)
        if found is None:
            raise InputError("estimator: at2_lens ships no estimator for this model; pass one (a LinearEstimator, "
                             "an estimator file or an AT2Attribution)")
        return found
    if isinstance(estimator, str | Path):
        return load_estimator_file(estimator, expected_fingerprint=fingerprint)
    inner = getattr(estimator, "estimator", None)  # an AT2Attribution (or AT2Refined) carries its estimator
    if not isinstance(estimator, LinearEstimator) and isinstance(inner, LinearEstimator):
        estimator = inner
    if not isinstance(estimator, LinearEstimator):
        raise InputError(f"estimator: expected a LinearEstimator, an estimator file, an AT2Attribution or None, got "
                         f"{type(estimator).__name__}")
    estimator.check_fingerprint(fingerprint)
    return estimator


def _tokenized(backend: Any, result_or_task: Any) -> TokenizedTask:
    from at2_lens.results import SourceAttribution
    from at2_lens.tasks import ContextTask, TokenizedTask, prepare_task

    if isinstance(result_or_task, SourceAttribution):
        if result_or_task.task is None:
            raise InputError("result_or_task: this result carries no tokenized task (results made by an attribute "
                             "call or loaded from a file do); pass the task instead")
        return result_or_task.task
    if isinstance(result_or_task, TokenizedTask):
        return result_or_task
    if isinstance(result_or_task, ContextTask):
        return prepare_task(backend, result_or_task)
    raise InputError("result_or_task: expected a SourceAttribution, a TokenizedTask or a ContextTask, got "
                     f"{type(result_or_task).__name__}")


def top_heads_attention(
    model: Any,
    result_or_task: SourceAttribution | TokenizedTask | ContextTask,
    estimator: LinearEstimator | AT2Attribution | str | Path | None = None,
    k: int = 8,
) -> CircuitsVisView:
    """The attention patterns of the AT2 estimator's ``k`` highest-weighted heads, as CircuitsVis ``attention_heads``.

    One forward pass over the task's tokens (prompt and response) reads each chosen head's pattern at
    ``hook_pattern``; heads are labelled ``"L{layer}H{head}"``, best first (:func:`at2_lens.top_heads` on the
    estimator's weights).

    Args:
        model: a TransformerLens model (or its ``Backend``).
        result_or_task: a ``SourceAttribution`` (its ``task`` is used), a ``TokenizedTask``, or a ``ContextTask``
            (tokenized here; a task without a response gets one generated greedily).
        estimator: a ``LinearEstimator``, an estimator file, an ``AT2Attribution`` (its estimator), or None for the
            estimator shipped for ``model``. Its model fingerprint must match the model's.
        k: how many heads to draw.

    Raises:
        ImportError: CircuitsVis is not installed (``pip install 'at2_lens[circuitsvis]'``).
        InputError: a bad ``k``, task or estimator. EstimatorFileError: the estimator belongs to another model.
        ModelNotSupportedError: the model's ``hook_pattern`` does not fire (attention cannot be read).
    """
    from at2_lens.backends import get_backend
    from at2_lens.head_ablation import top_heads

    cv = _circuitsvis("top_heads_attention")
    backend = get_backend(model)
    est = _estimator(backend, estimator)
    heads = top_heads(est.weights, k)
    task = _tokenized(backend, result_or_task)
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)
    seen: dict[int, Tensor] = {}

    def reader(layer: int) -> Any:
        def hook(pattern: Tensor, hook: Any) -> None:
            seen[layer] = pattern[0, by_layer[layer]].detach().float().cpu()

        return hook

    hooks = [(backend.pattern_hook(layer), reader(layer)) for layer in by_layer]
    with torch.no_grad():
        backend.run(task.input_ids[None], fwd_hooks=hooks)
    missing = sorted(set(by_layer) - set(seen))
    if missing:
        raise ModelNotSupportedError(f"{backend.describe()}: hook_pattern did not fire in layer(s) {missing}, so the "
                                     "heads' attention cannot be read")
    attention = torch.stack([seen[layer][by_layer[layer].index(head)] for layer, head in heads])
    causal = bool((attention.triu(diagonal=1) == 0).all())
    rounded = np.round(attention.double().numpy(), 5).tolist()  # short numbers: the page holds k · seq² of them
    return _render("AttentionHeads", cv.attention.attention_heads, _token_strings(task, backend.tokenizer),
                   html_tokens=False, attention=rounded, attention_head_names=[head_label(*h) for h in heads],
                   min_value=0.0, max_value=1.0, mask_upper_tri=causal)
