"""Attribution trees (Hao et al., AAAI 2021, §"Attribution tree"): how information flows through the layers.

``attribution_tree(result, tokens)`` turns an ``AttentionAttribution`` result for one example into a
``networkx.DiGraph``:

1. per layer, the attributions are summed over heads, ``S_l[i, j] = Σ_h Attr_{l,h}[i, j]`` (query ``i``, key ``j``),
   padding excluded, and divided by the layer's largest entry, so every layer's strongest interaction is 1;
2. an interaction is an edge when its normalised score exceeds ``threshold`` (0.4 in the paper);
3. the tree is built top-down: it starts from the root tokens at the last attributed layer (the token(s) the
   output reads: ``[CLS]`` for a CLS classifier, the last token for a decoder, every real token for a mean-pooled
   classifier) and keeps an edge of a lower layer only if its query node is already in the tree.

Nodes are ``(layer, position)``: token ``position`` as it leaves layer ``layer`` (the input row of the first
attributed layer is ``layers[0] - 1``, ``-1`` for the embeddings). The edge ``(below, j) → (l, i)`` says that, in
layer ``l``, query ``i`` read key ``j``; it points the way information flows (upwards). Where ``layers`` skips
layers, the edges of layer ``l`` start at the previous attributed layer's row. ``draw_attribution_tree`` draws the
graph with layers as rows and token positions as columns.

networkx (extra ``graph``) and matplotlib (extra ``plot``) are imported only by the functions that need them.

Why a separate function and not a method of the result: the tree needs token texts and a root choice that the
result does not know, and networkx/matplotlib stay out of the attribution path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from at2_lens._optional import require
from at2_lens._validate import check_int
from at2_lens.attattr.result import AttAttrResult
from at2_lens.errors import InputError

if TYPE_CHECKING:
    import networkx as nx
    from matplotlib.axes import Axes

DEFAULT_THRESHOLD = 0.4
"""The paper's edge threshold on per-layer max-normalised attribution scores."""


def layer_scores(result: AttAttrResult, example: int = 0) -> tuple[Tensor, Tensor]:
    """Per-layer scores of one example: ``(raw [layer, q, k], normalised [layer, q, k])``, padding set to 0.

    ``raw`` is the sum over heads; ``normalised`` divides each layer by its largest entry (a layer whose entries
    are all ≤ 0 is all zeros: nothing in it pushes the output up).
    """
    if not isinstance(result, AttAttrResult):
        raise InputError(f"result: expected an AttAttrResult from AttentionAttribution.attribute, got "
                         f"{type(result).__name__}")
    attr = result.attributions
    if result.batched:
        example = check_int("example", example, minimum=0, maximum=attr.shape[0] - 1)
        attr = attr[example]
    elif example != 0:
        raise InputError(f"example: the result holds one example, so example must be 0, got {example!r}")
    raw = attr.detach().float().sum(dim=1).cpu()  # [layer, q, k]
    real = real_positions(result, example)
    pair = real[:, None] & real[None, :]
    raw = raw.masked_fill(~pair[None], 0.0)
    top = raw.flatten(1).max(dim=1).values  # [layer]
    scale = torch.where(top > 0, top, torch.ones_like(top))
    norm = torch.where(top[:, None, None] > 0, raw / scale[:, None, None], torch.zeros_like(raw))
    return raw, norm


def real_positions(result: AttAttrResult, example: int = 0) -> Tensor:
    """``[pos]`` bool: True for the example's real (unpadded) tokens."""
    n_pos = result.attributions.shape[-1]
    mask = result.attention_mask
    if mask is None:
        return torch.ones(n_pos, dtype=torch.bool)
    mask = mask.detach().cpu()
    row = mask[example] if mask.dim() == 2 else mask
    return row.bool()


def _check_threshold(threshold: object) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0.0 <= float(threshold) < 1.0:
        raise InputError(f"threshold: expected a number in [0, 1) (scores are normalised per layer so the "
                         f"largest is 1), got {threshold!r}")
    return float(threshold)


def _check_roots(roots: int | Sequence[int] | None, real: Tensor) -> list[int]:
    n_pos = int(real.shape[0])
    if roots is None:
        return [int(i) for i in real.nonzero().reshape(-1)]
    items = [roots] if isinstance(roots, int) else roots
    if isinstance(items, str) or not isinstance(items, Sequence) or len(items) == 0:
        raise InputError(f"roots: expected None, a token position or a non-empty list of positions, got {roots!r}")
    out: list[int] = []
    for r in items:
        if isinstance(r, bool) or not isinstance(r, int) or not -n_pos <= r < n_pos:
            raise InputError(f"roots: positions must be integers in [-{n_pos}, {n_pos}), got {r!r}")
        pos = r % n_pos
        if not bool(real[pos]):
            raise InputError(f"roots: position {r} is padding")
        out.append(pos)
    return sorted(set(out))


def attribution_tree(
    result: AttAttrResult,
    tokens: Sequence[str] | None = None,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    roots: int | Sequence[int] | None = None,
    example: int = 0,
) -> nx.DiGraph:
    """The attribution tree of one example as a ``networkx.DiGraph`` (see the module docstring).

    Args:
        result: ``AttentionAttribution.attribute(...)`` output; any number of layers, in the order given there.
        tokens: the token texts, one per position (default ``"#0"``, ``"#1"``, ...).
        threshold: keep interactions whose per-layer max-normalised score is above this (default 0.4).
        roots: the top-layer token position(s) the tree starts from (negative counts from the end). None (default):
            every real token, right for a mean-pooled classifier; pass ``0`` for ``[CLS]`` or ``-1`` for a
            decoder's last token (with padding, give the last real position).
        example: which example of a batched result.

    Returns:
        A DiGraph. Nodes ``(layer, position)`` carry ``layer``, ``position``, ``token`` and ``root`` (True for the
        starting nodes); edges ``(below, j) → (layer, i)`` carry ``layer`` (whose attention), ``weight`` (normalised
        score, in (threshold, 1]) and ``attribution`` (the raw sum over heads). ``graph.graph`` holds
        ``threshold``, ``layers``, ``rows`` (bottom to top) and ``tokens``.
    """
    nx = require("networkx", "graph", "building the attribution tree")
    threshold = _check_threshold(threshold)
    raw, norm = layer_scores(result, example)
    n_pos = raw.shape[-1]
    real = real_positions(result, example)
    if tokens is None:
        texts = [f"#{i}" for i in range(n_pos)]
    else:
        if isinstance(tokens, str) or not isinstance(tokens, Sequence) or len(tokens) != n_pos:
            raise InputError(f"tokens: expected {n_pos} token strings (one per position), got "
                             f"{len(tokens) if isinstance(tokens, Sequence) else type(tokens).__name__}")
        texts = [str(t) for t in tokens]
    start = _check_roots(roots, real)
    layers = list(result.layers)
    rows = [layers[0] - 1, *layers]  # rows[k] is the input row of layers[k]

    graph = nx.DiGraph(threshold=threshold, layers=tuple(layers), rows=tuple(rows), tokens=tuple(texts))

    def add_node(row: int, pos: int, root: bool = False) -> None:
        if (row, pos) not in graph:
            graph.add_node((row, pos), layer=row, position=pos, token=texts[pos], root=root)

    frontier = set(start)
    for pos in start:
        add_node(layers[-1], pos, root=True)
    for k in range(len(layers) - 1, -1, -1):
        layer, below = layers[k], rows[k]
        reached: set[int] = set()
        for i in sorted(frontier):
            keys = (norm[k, i] > threshold).nonzero().reshape(-1).tolist()
            for j in keys:
                add_node(below, j)
                graph.add_edge((below, j), (layer, i), layer=layer, weight=float(norm[k, i, j]),
                               attribution=float(raw[k, i, j]))
                reached.add(j)
        frontier = reached
        if not frontier:
            break
    return graph


def tree_edges(graph: nx.DiGraph) -> list[dict[str, Any]]:
    """The edges as records, top layer first, strongest first within a layer: ``layer``, ``key_position``,
    ``key_token``, ``query_position``, ``query_token``, ``weight``, ``attribution``."""
    rows = []
    for (_, j), (_, i), data in graph.edges(data=True):
        rows.append({"layer": data["layer"], "key_position": j, "key_token": graph.graph["tokens"][j],
                     "query_position": i, "query_token": graph.graph["tokens"][i], "weight": data["weight"],
                     "attribution": data["attribution"]})
    rows.sort(key=lambda r: (-r["layer"], -r["weight"], r["query_position"], r["key_position"]))
    return rows


def draw_attribution_tree(graph: nx.DiGraph, ax: Axes | None = None, *, title: str | None = None) -> Axes:
    """Draw an ``attribution_tree`` with matplotlib: one row per layer (input at the bottom), one column per token.

    Edge width and opacity grow with the normalised score; root nodes are drawn larger. Returns the Axes (a new
    Figure's, sized to the sentence, when ``ax`` is None; save it with ``ax.figure.savefig(path)``).
    """
    # matplotlib's object-oriented API: no pyplot state, no backend switch.
    Figure = require("matplotlib.figure", "plot", "drawing the attribution tree").Figure
    for key in ("rows", "tokens", "threshold"):
        if key not in graph.graph:
            raise InputError(f"graph: expected a graph from attribution_tree (graph.graph lacks {key!r})")
    rows: list[int] = list(graph.graph["rows"])
    tokens: list[str] = list(graph.graph["tokens"])
    y_of = {row: k for k, row in enumerate(rows)}
    if ax is None:
        fig = Figure(figsize=(max(4.0, 0.7 * len(tokens) + 1.5), max(3.0, 0.6 * len(rows) + 1.2)))
        ax = fig.subplots()
    for (rb, j), (rt, i), data in graph.edges(data=True):
        w = float(data["weight"])
        ax.plot([j, i], [y_of[rb], y_of[rt]], color="tab:blue", linewidth=0.5 + 2.5 * w, alpha=0.3 + 0.7 * w,
                zorder=1)
    for (row, pos), data in graph.nodes(data=True):
        size = 80 if data.get("root") else 40
        ax.scatter([pos], [y_of[row]], s=size, color="tab:red" if data.get("root") else "tab:orange", zorder=2)
    ax.set_xticks(range(len(tokens)))
    ax.set_xticklabels(tokens, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(["input" if r < 0 else f"layer {r}" for r in rows], fontsize=8)
    ax.set_xlim(-0.5, len(tokens) - 0.5)
    ax.set_ylim(-0.5, len(rows) - 0.5)
    ax.set_title(title or f"attribution tree (threshold {graph.graph['threshold']:g})", fontsize=9)
    ax.figure.tight_layout()
    return ax


__all__ = [
    "DEFAULT_THRESHOLD",
    "attribution_tree",
    "draw_attribution_tree",
    "layer_scores",
    "real_positions",
    "tree_edges",
]
