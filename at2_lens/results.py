"""The result of a source attribution: scores per source, with a table, the top-k and a highlighted view.

Every context-attribution method of at2_lens (AT2, its baselines) returns this type, built the same way by
:meth:`SourceAttribution.from_task`, so results compare and render the same way: ``to_dataframe()`` for analysis,
``top_k()`` for a quick look, ``_repr_html_`` in a notebook and ``__rich__`` in a terminal.

Cost contract: ``extra["forward_passes"]`` and ``extra["backward_passes"]`` are the passes of the ``attribute``
call that made the result (sequences through the model; a batch of 8 counts 8), so a call served from a cache
reports 0.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from at2_lens._validate import check_int
from at2_lens.errors import InputError, NumericalError
from at2_lens.ranking import rank
from at2_lens.tasks import Span, TokenizedTask

if TYPE_CHECKING:
    import pandas as pd
    from rich.text import Text


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

    def to_html(self, top: int = 5) -> str:
        """Self-contained HTML: the context with sources shaded by score, then the target and the top sources."""
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
        return (
            '<div class="at2-lens-result" style="font-family:sans-serif;line-height:1.6">'
            f"<p><b>Method:</b> {html.escape(self.method)} &middot; <b>Target:</b> "
            f'<span class="at2-target">{html.escape(self.target_text)}</span></p>'
            f'<div class="at2-context" style="white-space:pre-wrap;border:1px solid #ddd;padding:8px">'
            f"{''.join(parts)}</div>"
            f'<table class="at2-top"><tr><th>source</th><th>score ({html.escape(self.units)})</th><th>text</th></tr>'
            f"{rows}</table></div>"
        )

    def _repr_html_(self) -> str:
        return self.to_html()

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
