"""Self-contained HTML reports: query, response with the target marked (per-token scores on hover), the
highlighted context and the estimator's per-head weights heatmap; or, for per-sentence results, the response as a
citation view (each sentence followed by markers linking to its top sources)."""

from __future__ import annotations

import html
from pathlib import Path

from torch import Tensor

from at2_lens.files import atomic_write_bytes
from at2_lens.results import SentenceAttributions, SourceAttribution


def head_heatmap_html(weights: Tensor, title: str = "Estimator weight per head") -> str:
    """A ``[layer, head]`` weight matrix as an HTML table with shaded cells (no plotting dependency)."""
    top = float(weights.abs().max()) or 1.0
    n_layers, n_heads = weights.shape
    head_cells = "".join(f"<th>H{h}</th>" for h in range(n_heads))
    rows = []
    for layer in range(n_layers):
        cells = []
        for h in range(n_heads):
            w = float(weights[layer, h])
            a = abs(w) / top
            color = f"rgba(200, 60, 20, {a:.3f})" if w >= 0 else f"rgba(30, 90, 200, {a:.3f})"
            cells.append(f'<td title="blocks.{layer}.attn head {h}: {w:.4g}" style="background:{color}">'
                         f"{w:.3f}</td>")
        rows.append(f"<tr><th>L{layer}</th>{''.join(cells)}</tr>")
    return (f'<h3>{html.escape(title)}</h3><table class="at2-heads" style="font-size:10px;border-collapse:collapse">'
            f"<tr><th></th>{head_cells}</tr>{''.join(rows)}</table>")


def write_report(
    path: str | Path, result: SourceAttribution | SentenceAttributions, head_weights: Tensor | None = None, *,
    title: str = "at2_lens", query: str | None = None, citations: int = 3,
) -> Path:
    """Write a self-contained HTML report (atomically; no script, no external request) and return its path.

    The page shows the query (``query``, else the one recorded with the result's task; a note when neither is
    known), the whole response with the target marked, each target token's own scores on hover when per-token
    scores were computed (``attribute(..., per_token=True)``), the context shaded by source score, the top sources,
    and ``head_weights`` as a heatmap when given.

    A :class:`~at2_lens.results.SentenceAttributions` (``AT2Attribution.attribute_sentences``) is shown as a
    citation view instead: the response with each sentence followed by markers ``[n]`` for its top ``citations``
    sources (hover for score and text, click for the source), then the cited sources.
    """
    body = [f"<h1>{html.escape(title)}</h1>"]
    if isinstance(result, SentenceAttributions):
        known = result.sentences[0].attribution.query if len(result) else None
        query = query if query is not None else known
    else:
        query = query if query is not None else result.query
    if query is None:
        body.append('<p><b>Query:</b> <i class="at2-query-missing">(not recorded with this result)</i></p>')
    if isinstance(result, SentenceAttributions):
        body.append(result.to_html(citations, query=query))
    else:
        body.append(result.to_html(top=min(10, result.n_sources), query=query))
    if head_weights is not None:
        body.append(head_heatmap_html(head_weights))
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>"
            f"{html.escape(title)}</title></head><body>{''.join(body)}</body></html>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, page.encode("utf-8"))
    return path
