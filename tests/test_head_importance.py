"""Head importance (AttAttr and baselines) and the head-pruning sweep, on the tiny BERT and on MiniLM-SST2."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import Tensor

from at2_lens.attattr.head_importance import (
    IMPORTANCE_METHODS,
    compare_pruning,
    head_importance,
    head_mask_hooks,
    importance_stability,
    layer_normalised,
    mask_heads,
    plot_pruning,
    pruning_mask,
    pruning_sweep,
    random_importance,
    random_pruning,
)
from at2_lens.backends import get_backend
from at2_lens.errors import InputError
from at2_lens.models.pooling import mean_pool
from tests.conftest import BACKENDS

TEXTS = ["a good film", "bad", "the plot was dull and far too long", "fine acting , weak script", "great"]
LABELS = [1, 0, 0, 1, 1]


class TinyClassifier:
    """Classifier-like object on the tiny BERT: mean-pooled final hidden state + a fixed random linear head."""

    def __init__(self, model: Any, seed: int = 0) -> None:
        self.model = model
        self.backend = get_backend(model)
        gen = torch.Generator().manual_seed(seed)
        self.head = SimpleNamespace(
            weight=torch.randn(2, self.backend.d_model, generator=gen), bias=torch.zeros(2), pooling="mean"
        )

    def tokenize(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        enc = self.backend.tokenizer(list(texts), padding=True, return_tensors="pt")
        return enc["input_ids"].long(), enc["attention_mask"].long()

    def forward(self, tokens: Tensor, attention_mask: Tensor | None = None, fwd_hooks: Sequence[Any] = ()) -> Tensor:
        seen: dict[str, Tensor] = {}

        def capture(x: Tensor, hook: Any) -> None:
            seen["h"] = x

        hooks = [*fwd_hooks, (self.backend.final_hidden_hook(), capture)]
        self.backend.run(tokens, fwd_hooks=hooks, attention_mask=attention_mask)
        pooled = mean_pool(seen["h"], attention_mask)
        return torch.softmax(pooled @ self.head.weight.T + self.head.bias, dim=-1)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_classifiers(tiny_bert_models: dict[str, object]) -> dict[str, TinyClassifier]:
    return {name: TinyClassifier(model) for name, model in tiny_bert_models.items()}


# ------------------------------------------------------------------------------------------------- importance
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", IMPORTANCE_METHODS)
def test_importance_shape_finite_deterministic(
    tiny_classifiers: dict[str, TinyClassifier], backend: str, method: str
) -> None:
    clf = tiny_classifiers[backend]
    kwargs = {"n_steps": 4, "batch_size": 3} if method == "attattr" else {}
    a = head_importance(method, clf, TEXTS, LABELS, **kwargs)
    b = head_importance(method, clf, TEXTS, LABELS, **kwargs)
    assert a.shape == (clf.backend.n_layers, clf.backend.n_heads)
    assert bool(torch.isfinite(a).all())
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    if method == "attention":  # a sum of maxima of probability rows: in [n / n_pos_max, n]
        assert bool((a > 0).all()) and bool((a <= len(TEXTS) + 1e-4).all())
    if method == "taylor":  # l2-normalised per layer
        assert torch.allclose(a.norm(dim=1), torch.ones(a.shape[0]), atol=1e-5)


def test_importance_agrees_across_backends(tiny_classifiers: dict[str, TinyClassifier]) -> None:
    if len(tiny_classifiers) < 2:
        pytest.skip("only one backend on this TransformerLens line")
    for method in ("attention", "taylor"):
        got = {n: head_importance(method, c, TEXTS, LABELS) for n, c in tiny_classifiers.items()}
        ref = got[BACKENDS[0]]
        for imp in got.values():
            assert torch.allclose(imp, ref, rtol=1e-3, atol=1e-5), method


def test_attattr_gold_target_and_padding_batches(tiny_classifiers: dict[str, TinyClassifier]) -> None:
    clf = tiny_classifiers[BACKENDS[0]]
    # Batching (hence padding) must not change the per-example scores: padding is excluded.
    one = head_importance("attattr", clf, TEXTS, LABELS, n_steps=4, batch_size=1, target="gold")
    all_ = head_importance("attattr", clf, TEXTS, LABELS, n_steps=4, batch_size=5, target="gold")
    assert torch.allclose(one, all_, rtol=1e-3, atol=1e-5)
    with pytest.raises(InputError, match="labels"):
        head_importance("attattr", clf, TEXTS, None, target="gold")


def test_random_importance_is_seeded(tiny_classifiers: dict[str, TinyClassifier]) -> None:
    clf = tiny_classifiers[BACKENDS[0]]
    assert torch.equal(random_importance(clf, seed=3), random_importance(clf, seed=3))
    assert not torch.equal(random_importance(clf, seed=3), random_importance(clf, seed=4))
    assert torch.equal(head_importance("random", clf, seed=3), random_importance(clf, seed=3))


def test_bad_arguments_fail_clearly(tiny_classifiers: dict[str, TinyClassifier]) -> None:
    clf = tiny_classifiers[BACKENDS[0]]
    with pytest.raises(InputError, match="method"):
        head_importance("gradient", clf, TEXTS, LABELS)
    with pytest.raises(InputError, match="labels"):
        head_importance("taylor", clf, TEXTS)
    with pytest.raises(InputError, match="importance"):
        pruning_sweep(clf, TEXTS, LABELS, torch.zeros(3, 3))
    with pytest.raises(InputError, match="fractions"):
        pruning_sweep(clf, TEXTS, LABELS, random_importance(clf), fractions=(0.0, 1.5))


# -------------------------------------------------------------------------------------------------- masking
@pytest.mark.line_independent
def test_mask_heads_zeroes_exactly_the_chosen_heads() -> None:
    pattern = torch.rand(2, 4, 5, 5)
    out = mask_heads(torch.tensor([True, False, True, False]))(pattern)
    assert torch.equal(out[:, [1, 3]], torch.zeros(2, 2, 5, 5))
    assert torch.equal(out[:, [0, 2]], pattern[:, [0, 2]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_head_mask_hooks_zero_the_chosen_heads_outputs(
    tiny_classifiers: dict[str, TinyClassifier], backend: str
) -> None:
    clf = tiny_classifiers[backend]
    b = clf.backend
    tokens, mask = clf.tokenize(TEXTS[:3])
    masked = torch.zeros(b.n_layers, b.n_heads, dtype=torch.bool)
    masked[0, 1] = True
    zs: dict[str, Tensor] = {}

    def rec(key: str) -> Any:
        def hook(z: Tensor, hook: Any) -> None:
            zs[key] = z.detach().clone()

        return hook

    with torch.no_grad():
        clf.forward(tokens, mask, fwd_hooks=[(b.z_hook(0), rec("clean"))])
        clf.forward(tokens, mask, fwd_hooks=[*head_mask_hooks(b, masked), (b.z_hook(0), rec("masked"))])
    assert torch.equal(zs["masked"][:, :, 1], torch.zeros_like(zs["masked"][:, :, 1]))
    keep = [h for h in range(b.n_heads) if h != 1]
    assert torch.allclose(zs["masked"][:, :, keep], zs["clean"][:, :, keep], atol=1e-5)
    assert len(head_mask_hooks(b, torch.zeros_like(masked))) == 0


@pytest.mark.line_independent
def test_pruning_mask_orders_least_important_first() -> None:
    imp = torch.tensor([[0.5, 0.1], [0.9, 0.3]])
    assert pruning_mask(imp, 0).sum() == 0
    assert torch.equal(pruning_mask(imp, 2), torch.tensor([[False, True], [False, True]]))
    assert bool(pruning_mask(imp, 4).all())


# -------------------------------------------------------------------------------------------------- pruning
@pytest.mark.parametrize("backend", BACKENDS)
def test_pruning_sweep_endpoints(tiny_classifiers: dict[str, TinyClassifier], backend: str) -> None:
    clf = tiny_classifiers[backend]
    b = clf.backend
    imp = head_importance("attention", clf, TEXTS, LABELS)
    df = pruning_sweep(clf, TEXTS, LABELS, imp, fractions=(0.0, 0.5, 1.0), method="attention", batch_size=2)
    assert list(df.columns) == ["fraction", "n_pruned", "accuracy", "method"]
    assert df["n_pruned"].tolist() == [0, b.n_layers * b.n_heads // 2, b.n_layers * b.n_heads]
    assert set(df["method"]) == {"attention"}
    tokens, mask = clf.tokenize(TEXTS)
    y = torch.tensor(LABELS)
    with torch.no_grad():
        clean = clf.forward(tokens, mask)
        zeroed = clf.forward(tokens, mask, fwd_hooks=b.all_layer_pattern_hooks(lambda p: p * 0))
        all_masked = clf.forward(tokens, mask, fwd_hooks=head_mask_hooks(b, pruning_mask(imp, imp.numel())))
    assert torch.allclose(all_masked, zeroed, atol=1e-6)
    assert df["accuracy"].iloc[0] == (clean.argmax(-1) == y).sum().item() / len(LABELS)
    assert df["accuracy"].iloc[-1] == (zeroed.argmax(-1) == y).sum().item() / len(LABELS)


def test_compare_pruning_and_plot(tiny_classifiers: dict[str, TinyClassifier], tmp_path: Path) -> None:
    clf = tiny_classifiers[BACKENDS[0]]
    df = compare_pruning(
        clf, TEXTS, LABELS, TEXTS, LABELS, fractions=(0.0, 1.0), method_kwargs={"attattr": {"n_steps": 2}}
    )
    assert list(df["method"].unique()) == list(IMPORTANCE_METHODS)
    assert len(df) == 2 * len(IMPORTANCE_METHODS)
    assert df[df.fraction == 0.0]["accuracy"].nunique() == 1
    assert df[df.fraction == 1.0]["accuracy"].nunique() == 1
    assert set(df.attrs["importance"]) == set(IMPORTANCE_METHODS)
    if importlib.util.find_spec("matplotlib") is None:
        with pytest.raises(ImportError, match=r"at2_lens\[plot\]"):
            plot_pruning(df)
        return
    path = tmp_path / "pruning.png"
    plot_pruning(df, str(path), title="tiny")
    assert path.stat().st_size > 0


# ------------------------------------------------------------------------------------------------ stability
STAB_TEXTS = [*TEXTS, "an awful mess", "a warm , funny story", "not worth it", "loved every minute"]
STAB_LABELS = [*LABELS, 0, 1, 0, 1]


def test_importance_stability_halves_sum_to_the_whole(tiny_classifiers: dict[str, TinyClassifier]) -> None:
    clf = tiny_classifiers[BACKENDS[0]]
    df = importance_stability(clf, STAB_TEXTS, STAB_LABELS, method_kwargs={"attattr": {"n_steps": 2}})
    assert df["method"].tolist() == ["attattr", "attention", "taylor"]
    assert (df["n_a"] == 4).all() and (df["n_b"] == 5).all()
    for method in ("attattr", "attention"):  # sums over examples: the whole set is the sum of the halves
        imp = df.attrs["importance"][method]
        whole = head_importance(method, clf, STAB_TEXTS, STAB_LABELS, **({"n_steps": 2} if method == "attattr" else {}))
        torch.testing.assert_close(torch.tensor(imp["a"]) + torch.tensor(imp["b"]), whole, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(torch.tensor(imp["all"]), whole, rtol=1e-4, atol=1e-6)
    taylor = df.attrs["importance"]["taylor"]
    torch.testing.assert_close(torch.tensor(taylor["all"]), head_importance("taylor", clf, STAB_TEXTS, STAB_LABELS),
                               rtol=1e-4, atol=1e-6)
    # Spearman is the rank correlation of the two halves' scores (checked against a hand-ranked computation).
    a, b = torch.tensor(taylor["a"]).flatten(), torch.tensor(taylor["b"]).flatten()
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    rho = float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])
    assert df.set_index("method").loc["taylor", "spearman"] == pytest.approx(rho, abs=1e-6)
    assert df["pruned_overlap"].between(0, 1).all()


def test_importance_stability_identical_halves_agree_perfectly(tiny_classifiers: dict[str, TinyClassifier]) -> None:
    clf = tiny_classifiers[BACKENDS[0]]
    df = importance_stability(clf, TEXTS[:3] * 2, LABELS[:3] * 2, ["attention", "taylor"])
    assert df["spearman"].tolist() == pytest.approx([1.0, 1.0])
    assert df["pruned_overlap"].tolist() == [1.0, 1.0]


def test_importance_stability_bad_input(tiny_classifiers: dict[str, TinyClassifier]) -> None:
    clf = tiny_classifiers[BACKENDS[0]]
    with pytest.raises(InputError, match="random"):
        importance_stability(clf, TEXTS, LABELS, ["random"])
    with pytest.raises(InputError, match="methods"):
        importance_stability(clf, TEXTS, LABELS, ["gradient"])
    with pytest.raises(InputError, match="at least 2"):
        importance_stability(clf, TEXTS[:1], LABELS[:1])
    with pytest.raises(InputError, match="prune_fraction"):
        importance_stability(clf, TEXTS, LABELS, prune_fraction=1.5)


def test_layer_normalised_rows_have_unit_norm() -> None:
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    torch.testing.assert_close(layer_normalised(x), torch.tensor([[0.6, 0.8], [0.0, 0.0]]))


def test_random_pruning_draws_and_shared_cache(tiny_classifiers: dict[str, TinyClassifier]) -> None:
    clf = tiny_classifiers[BACKENDS[0]]
    cache: dict[bytes, float] = {}
    df = random_pruning(clf, TEXTS, LABELS, (0.0, 0.5, 1.0), n_draws=3, seed=4, cache=cache)
    assert len(df) == 9 and sorted(df["draw"].unique()) == [0, 1, 2] and set(df["method"]) == {"random"}
    for draw in range(3):  # each draw is the sweep of random_importance(seed + draw)
        one = pruning_sweep(clf, TEXTS, LABELS, random_importance(clf, seed=4 + draw), (0.0, 0.5, 1.0))
        assert df[df.draw == draw]["accuracy"].tolist() == one["accuracy"].tolist()
    assert len(cache) <= 1 + 3 + 1  # 0 % and 100 % are evaluated once for all draws
    with pytest.raises(InputError, match="n_draws"):
        random_pruning(clf, TEXTS, LABELS, n_draws=0)


# ------------------------------------------------------------------------------------------------ real model
@pytest.mark.real
def test_minilm_sst2_pruning_small(minilm: object) -> None:
    from at2_lens.models.classifier import load_minilm_sst2, load_sst2

    texts, labels = load_sst2("validation", limit=40)
    clf = load_minilm_sst2(model=minilm)
    imp_texts, imp_labels = texts[:8], labels[:8]
    eval_texts, eval_labels = texts[8:40], labels[8:40]
    df = compare_pruning(
        clf, imp_texts, imp_labels, eval_texts, eval_labels, fractions=(0.0, 0.5, 1.0),
        method_kwargs={"attattr": {"n_steps": 4}},
    )
    print(df.to_string())
    for method, imp in df.attrs["importance"].items():
        t = torch.tensor(imp)
        assert t.shape == (6, 12) and bool(torch.isfinite(t).all()), method
    own = clf.accuracy(eval_texts, eval_labels)
    assert (df[df.fraction == 0.0]["accuracy"] == own).all()
    assert df["accuracy"].between(0.0, 1.0).all()
    assert df[df.fraction == 1.0]["accuracy"].nunique() == 1
    assert df[df.fraction == 1.0]["n_pruned"].eq(72).all()
