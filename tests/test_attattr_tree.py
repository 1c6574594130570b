"""Attribution trees: the construction rules on hand-made attributions, a tiny BERT, and MiniLM-SST2."""

from __future__ import annotations

from pathlib import Path

import networkx as nx
import pytest
import torch

from at2_lens.attattr import AttAttrResult, AttentionAttribution
from at2_lens.attattr.readouts import classifier_output_func
from at2_lens.attattr.tree import attribution_tree, draw_attribution_tree, layer_scores, tree_edges
from at2_lens.errors import InputError
from tests.conftest import BACKENDS
from tests.test_head_importance import TinyClassifier

pytestmark = pytest.mark.usefixtures("one_thread")


def _hand_made(scale: float = 5.0, mask: torch.Tensor | None = None, n_pos: int = 3) -> AttAttrResult:
    """Layers (0, 1), two heads whose sum gives the per-layer scores below (times ``scale``)."""
    s0 = torch.zeros(n_pos, n_pos)
    s1 = torch.zeros(n_pos, n_pos)
    s1[0, 1], s1[0, 2], s1[2, 0] = 1.0, 0.3, 0.9  # top layer: query 0 reads key 1 (max) and key 2 (weak)
    s0[1, 2], s0[2, 0], s0[0, 0] = 0.8, 1.0, -2.0  # layer 0: the max (query 2) is not reachable from root 0
    summed = torch.stack([s0, s1]) * scale  # [layer, q, k]
    heads = torch.stack([0.6 * summed, 0.4 * summed], dim=1)  # [layer, head, q, k]
    return AttAttrResult(attributions=heads, layers=(0, 1), output=torch.tensor(0.9), attention_mask=mask)


@pytest.mark.line_independent
def test_layer_scores_sum_heads_and_normalise_by_the_layer_max() -> None:
    raw, norm = layer_scores(_hand_made(scale=5.0))
    assert torch.allclose(raw[1, 0, 1], torch.tensor(5.0)) and torch.allclose(raw[0, 1, 2], torch.tensor(4.0))
    assert torch.allclose(norm.flatten(1).max(dim=1).values, torch.ones(2))
    assert torch.allclose(norm[0, 1, 2], torch.tensor(0.8)) and torch.allclose(norm[1, 0, 2], torch.tensor(0.3))


@pytest.mark.line_independent
def test_tree_is_built_top_down_from_the_roots() -> None:
    g = attribution_tree(_hand_made(), ["a", "b", "c"], roots=0)
    assert set(g.edges) == {((0, 1), (1, 0)), ((-1, 2), (0, 1))}
    # The strongest interaction of layer 0 (query 2 reads key 0) is not reachable from the root: left out.
    assert ((-1, 0), (0, 2)) not in g.edges
    assert g.nodes[(1, 0)]["root"] and g.nodes[(1, 0)]["token"] == "a"
    assert g.edges[(0, 1), (1, 0)]["weight"] == pytest.approx(1.0)
    assert g.edges[(-1, 2), (0, 1)]["attribution"] == pytest.approx(4.0)
    assert g.graph["rows"] == (-1, 0, 1)
    # From every real token at the top, the other top edge and what it reaches are kept too.
    g_all = attribution_tree(_hand_made(), ["a", "b", "c"])
    assert set(g_all.edges) == {((0, 1), (1, 0)), ((0, 0), (1, 2)), ((-1, 2), (0, 1))}
    # A lower threshold admits the weak top edge and, through it, layer 0's max (query 2 reads key 0).
    g_low = attribution_tree(_hand_made(), ["a", "b", "c"], roots=[0], threshold=0.2)
    assert ((0, 2), (1, 0)) in g_low.edges and ((-1, 0), (0, 2)) in g_low.edges
    assert ((-1, 0), (0, 0)) not in g_low.edges  # a negative score is never an edge
    # Every edge's weight is above the threshold; every node reaches a root.
    roots = [n for n, d in g_low.nodes(data=True) if d["root"]]
    for _u, v, d in g_low.edges(data=True):
        assert 0.2 < d["weight"] <= 1.0 + 1e-6
        assert any(nx.has_path(g_low, v, r) for r in roots)
    assert [e["layer"] for e in tree_edges(g_low)] == sorted((e["layer"] for e in tree_edges(g_low)), reverse=True)


@pytest.mark.line_independent
def test_padding_is_never_part_of_the_tree() -> None:
    res = _hand_made(mask=torch.tensor([[1, 1, 1, 0]]), n_pos=4)
    attr = res.attributions.clone()
    attr[:, :, 0, 3] = 100.0  # huge score on a padded key
    res = AttAttrResult(attributions=attr, layers=res.layers, output=res.output, attention_mask=res.attention_mask)
    g = attribution_tree(res)
    assert all(pos != 3 for _, pos in g.nodes)
    assert set(g.edges) == {((0, 1), (1, 0)), ((0, 0), (1, 2)), ((-1, 2), (0, 1))}
    with pytest.raises(InputError, match="roots"):
        attribution_tree(res, roots=3)


@pytest.mark.line_independent
def test_bad_arguments_fail_clearly() -> None:
    res = _hand_made()
    with pytest.raises(InputError, match="threshold"):
        attribution_tree(res, threshold=1.5)
    with pytest.raises(InputError, match="tokens"):
        attribution_tree(res, ["a", "b"])
    with pytest.raises(InputError, match="roots"):
        attribution_tree(res, roots=[7])
    with pytest.raises(InputError, match="example"):
        attribution_tree(res, example=1)
    with pytest.raises(InputError, match="result"):
        attribution_tree(torch.zeros(2, 2, 3, 3))  # type: ignore[arg-type]
    with pytest.raises(InputError, match="graph"):
        draw_attribution_tree(nx.DiGraph())


@pytest.mark.line_independent
def test_draw_writes_one_line_per_edge(tmp_path: Path) -> None:
    g = attribution_tree(_hand_made(), ["a", "b", "c"])
    ax = draw_attribution_tree(g)
    assert len(ax.lines) == g.number_of_edges()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c"]
    path = tmp_path / "tree.png"
    ax.figure.savefig(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("backend", BACKENDS)
def test_tree_from_a_real_attribution_on_the_tiny_bert(tiny_bert_models: dict[str, object], backend: str) -> None:
    clf = TinyClassifier(tiny_bert_models[backend])
    tokens, mask = clf.tokenize(["a good film", "bad"])
    res = AttentionAttribution(clf.backend, classifier_output_func(clf)).attribute(
        tokens, attention_mask=mask, n_steps=4
    )
    g = attribution_tree(res, example=1, threshold=0.3)
    n_real = int(mask[1].sum())
    assert all(pos < n_real for _, pos in g.nodes)
    _, norm = layer_scores(res, example=1)
    for (rb, j), (rt, i), d in g.edges(data=True):
        k = res.layers.index(rt)
        assert d["weight"] == pytest.approx(float(norm[k, i, j]))
        assert d["weight"] > 0.3 and rb == (res.layers[k - 1] if k else -1)
    # With every real token as a root, the top layer's strongest interaction is always an edge.
    top = [d["weight"] for _, _, d in g.edges(data=True) if d["layer"] == res.layers[-1]]
    assert max(top) == pytest.approx(1.0)


@pytest.mark.real
def test_minilm_sst2_tree(minilm: object) -> None:
    from at2_lens.models.classifier import load_minilm_sst2

    clf = load_minilm_sst2(model=minilm)
    tokens, mask = clf.tokenize(["a gorgeous, witty, seductive movie."])
    res = AttentionAttribution(clf.backend, classifier_output_func(clf)).attribute(
        tokens, attention_mask=mask, n_steps=8
    )
    texts = clf.tokenizer.convert_ids_to_tokens(tokens[0].tolist())
    g = attribution_tree(res, texts)
    assert g.graph["rows"] == (-1, 0, 1, 2, 3, 4, 5)
    assert g.number_of_edges() > 0
    assert {d["token"] for _, d in g.nodes(data=True)} <= set(texts)
    # Top-down: every edge below the top layer leads into a node that has an outgoing edge or is a root.
    for u, v, d in g.edges(data=True):
        assert g.nodes[v]["root"] or g.out_degree(v) > 0, (u, v, d)
    top = [d["weight"] for _, _, d in g.edges(data=True) if d["layer"] == 5]
    assert max(top) == pytest.approx(1.0)
    # A CLS-rooted tree is a sub-graph of the all-roots tree's edges.
    g_cls = attribution_tree(res, texts, roots=0)
    assert set(g_cls.edges) <= set(g.edges)
