"""Self-contained HTML reports: the highlighted attribution plus the estimator's per-head weights heatmap."""

from __future__ import annotations

import html
from pathlib import Path

from torch import Tensor

from at2_lens.files import atomic_write_bytes
from at2_lens.results import SourceAttribution


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
    path: str | Path, result: SourceAttribution, head_weights: Tensor | None = None, *, title: str = "at2_lens",
    query: str | None = None,
) -> Path:
    """Write an HTML report (atomically) and return its path."""
    body = [f"<h1>{html.escape(title)}</h1>"]
    if query:
        body.append(f'<p><b>Query:</b> <span class="at2-query">{html.escape(query)}</span></p>')
    body.append(f'<p><b>Response:</b> <span class="at2-response">{html.escape(result.response)}</span></p>')
    body.append(result.to_html(top=min(10, result.n_sources)))
    if head_weights is not None:
        body.append(head_heatmap_html(head_weights))
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>"
            f"{html.escape(title)}</title></head><body>{''.join(body)}</body></html>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, page.encode("utf-8"))
    return path
