"""Tests for AT2 training on synthetic ablation data, and for the LDS / Pearson metrics it reports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr

from at2_lens.ablation import random_masks
from at2_lens.at2.estimator import LinearEstimator, load_estimator_file
from at2_lens.at2.store import AblationExample, AblationStore, StoreSettings
from at2_lens.at2.training import _neg_pearson_loss, train_estimator, train_from_store
from at2_lens.errors import InputError
from at2_lens.evaluation.correlation import lds, lds_per_example, mean_ignoring_nan, pearson, spearman

pytestmark = pytest.mark.line_independent  # no TransformerLens model or backend code runs here

L, H = 3, 4
FAST = {"steps": 200, "lr": 1e-2, "batch_size": 64, "progress": False, "num_threads": 1}


def w_sparse() -> torch.Tensor:
    """A few informative heads; the rest attend to sources unrelated to the output."""
    w = torch.zeros(L, H)
    w[0, 1], w[2, 3], w[1, 0] = 1.0, 0.5, 0.25
    return w


def synthetic(
    n: int, w_true: torch.Tensor, *, offset: int = 0, noise: float = 0.05, n_masks: int = 32, seed: int = 0
) -> list[AblationExample]:
    """Examples whose outputs follow AT2's surrogate exactly, y(m) = Σ_s (2 m_s − 1) (w_true · φ[s]), plus noise.

    Features are independent heavy-tailed attention-like values (each head's column sums to 1 over sources), so
    averaging all heads (the uniform init) is only a mediocre predictor.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + offset)
    out = []
    for i in range(n):
        s = int(torch.randint(4, 30, (1,), generator=g))
        phi = -(torch.log(torch.rand(s, L, H, generator=g)) ** 2)
        phi = phi / phi.sum(0, keepdim=True)
        masks = random_masks(s, n_masks, 0.5, seed=seed, index=offset + i)
        y = (2 * masks.float() - 1) @ (phi * w_true).sum(dim=(1, 2))
        y = y + noise * y.std() * torch.randn(n_masks, generator=g)
        out.append(AblationExample(offset + i, phi, masks, y, float(y.max()), meta={"n_sources": s}))
    return out


def test_recovers_true_weights_and_beats_uniform(capsys: pytest.CaptureFixture[str]) -> None:
    w_true = w_sparse()
    train, held = synthetic(200, w_true), synthetic(100, w_true, offset=10_000)
    est, summary = train_estimator(train, held_out=held, **FAST)
    assert summary.lds_held_out is not None and summary.lds_held_out_init is not None
    assert summary.lds_held_out > 0.95
    assert summary.lds_held_out > summary.lds_held_out_init + 0.1

    # Independent check of the reported numbers with scipy.
    def mean_lds(weights: torch.Tensor) -> float:
        vals = [
            spearmanr((2 * ex.masks.float() - 1) @ LinearEstimator(weights).score(ex.features), ex.outputs).statistic
            for ex in held
        ]
        return float(np.mean(vals))

    assert mean_lds(est.weights) == pytest.approx(summary.lds_held_out, abs=1e-6)
    assert mean_lds(torch.ones(L, H)) == pytest.approx(summary.lds_held_out_init, abs=1e-6)
    cos = torch.nn.functional.cosine_similarity(est.weights.flatten(), w_true.flatten(), dim=0)
    assert cos > 0.99
    assert float(est.weights.abs().sum()) == pytest.approx(1.0, abs=1e-5)
    assert summary.n_examples == 200 and summary.n_held_out == 100 and summary.n_skipped == 0
    assert summary.history and summary.history[-1]["step"] == 200
    with capsys.disabled():
        print(
            f"\n[synthetic AT2] held-out LDS uniform init {summary.lds_held_out_init:.4f} -> trained "
            f"{summary.lds_held_out:.4f}; train LDS {summary.lds_train_init:.4f} -> {summary.lds_train:.4f}; "
            f"cos(w, w_true) {float(cos):.5f}"
        )


def test_default_hyperparameters_also_work() -> None:
    """The reference settings (lr 1e-3, 1000 steps, batch 512 > N so sampled with replacement)."""
    threads_before = torch.get_num_threads()
    w_true = w_sparse()
    _, summary = train_estimator(
        synthetic(100, w_true), held_out=synthetic(50, w_true, offset=5000), progress=False, num_threads=1
    )
    assert torch.get_num_threads() == threads_before
    assert summary.lds_held_out is not None and summary.lds_held_out > 0.95
    assert summary.steps == 1000 and summary.batch_size == 512


def test_non_negative_keeps_weights_non_negative() -> None:
    w_true = w_sparse()
    w_true[1, 2] = -0.5
    data = synthetic(150, w_true)
    free, _ = train_estimator(data, **FAST)
    assert float(free.weights.min()) < -0.05  # the unconstrained fit does want a negative weight
    constrained, summary = train_estimator(data, non_negative=True, **FAST)
    assert float(constrained.weights.min()) >= 0.0
    assert float(constrained.weights.abs().sum()) == pytest.approx(1.0, abs=1e-5)
    assert summary.non_negative


def test_deterministic_given_seed() -> None:
    data = synthetic(60, w_sparse())
    a, sa = train_estimator(data, seed=5, **{**FAST, "steps": 50})
    b, sb = train_estimator(data, seed=5, **{**FAST, "steps": 50})
    c, _ = train_estimator(data, seed=6, **{**FAST, "steps": 50})
    assert torch.equal(a.weights, b.weights) and sa.to_dict() == sb.to_dict()
    assert not torch.equal(a.weights, c.weights)


def test_varying_mask_counts_and_held_out_fraction() -> None:
    w_true = w_sparse()
    data = synthetic(60, w_true, n_masks=32) + synthetic(60, w_true, offset=500, n_masks=12)
    _, summary = train_estimator(data, held_out=0.25, **FAST)
    assert summary.n_held_out == 30 and summary.n_examples == 90
    assert summary.lds_held_out is not None and summary.lds_held_out > 0.9


def test_constant_output_examples_are_skipped() -> None:
    data = synthetic(40, w_sparse())
    flat = [
        AblationExample(1000 + i, ex.features, ex.masks, torch.full_like(ex.outputs, 2.5), 2.5)
        for i, ex in enumerate(data[:5])
    ]
    _, summary = train_estimator(data + flat, **{**FAST, "steps": 20})
    assert summary.n_skipped == 5 and summary.n_examples == 40
    with pytest.raises(InputError, match="constant outputs"):
        train_estimator(flat, **FAST)


def test_input_validation() -> None:
    data = synthetic(5, w_sparse())
    with pytest.raises(InputError, match="empty"):
        train_estimator([], **FAST)
    odd = AblationExample(99, torch.rand(4, L + 1, H), data[0].masks[:, :4], data[0].outputs, 0.0)
    with pytest.raises(InputError, match=r"examples\[5\].*layers"):
        train_estimator([*data, odd], **FAST)
    with pytest.raises(InputError, match="lr"):
        train_estimator(data, **{**FAST, "lr": -1.0})
    with pytest.raises(InputError, match="held_out"):
        train_estimator(data, held_out=1.5, **FAST)


def test_train_from_store_records_settings(tmp_path: Path) -> None:
    fp = {"architecture": "fake", "n_layers": L, "n_heads": H}
    settings = StoreSettings(
        model_fingerprint=fp, n_layers=L, n_heads=H, granularity="sentence", output_type="log_prob", seed=0
    )
    store = AblationStore(tmp_path / "store", settings)
    for ex in synthetic(40, w_sparse()):
        store.write(ex)
    est, summary = train_from_store(store, held_out=0.25, **{**FAST, "steps": 60})
    assert (est.granularity, est.output_type, est.ablation_mode) == ("sentence", "log_prob", "mask")
    assert est.model_fingerprint == fp
    path = est.save(tmp_path / "est.safetensors")
    back = load_estimator_file(path, expected_fingerprint=fp)
    assert torch.equal(back.weights, est.weights)
    assert back.training is not None and back.training["lds_held_out"] == pytest.approx(summary.lds_held_out)
    assert back.training["n_examples"] == 30


# --- metrics ---------------------------------------------------------------------------------------------------


def test_metrics_agree_with_scipy() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=32), rng.normal(size=32)
    y_ties = np.round(y, 0)
    assert pearson(x, y) == pytest.approx(pearsonr(x, y).statistic, abs=1e-12)
    assert spearman(x, y_ties) == pytest.approx(spearmanr(x, y_ties).statistic, abs=1e-12)
    assert lds(torch.tensor(x), torch.tensor(y_ties)) == pytest.approx(spearmanr(x, y_ties).statistic, abs=1e-12)
    preds, actual = rng.normal(size=(6, 20)), np.round(rng.normal(size=(6, 20)))
    expected = [spearmanr(p, a).statistic for p, a in zip(preds, actual, strict=True)]
    np.testing.assert_allclose(lds_per_example(preds, actual), expected, atol=1e-12)


def test_metrics_constant_and_bad_inputs() -> None:
    assert np.isnan(lds(np.ones(5), np.arange(5.0)))
    assert np.isnan(pearson(np.full(5, 0.1), np.arange(5.0)))
    assert mean_ignoring_nan([0.5, float("nan"), 1.0]) == pytest.approx(0.75)
    assert np.isnan(mean_ignoring_nan([float("nan")]))
    with pytest.raises(InputError, match="at least 2"):
        lds(np.ones(1), np.ones(1))
    with pytest.raises(InputError, match="NaN"):
        pearson(np.array([1.0, np.nan]), np.array([1.0, 2.0]))


def test_loss_is_negative_pearson() -> None:
    g = torch.Generator().manual_seed(1)
    pred, y = torch.randn(3, 10, generator=g), torch.randn(3, 10, generator=g)
    valid = torch.ones(3, 10, dtype=torch.bool)
    valid[2, 7:] = False
    yc = torch.where(valid, y - (y * valid).sum(1, keepdim=True) / valid.sum(1, keepdim=True), 0.0)
    yn = yc / yc.norm(dim=1, keepdim=True)
    expected = -np.mean([pearson(pred[0], y[0]), pearson(pred[1], y[1]), pearson(pred[2, :7], y[2, :7])])
    assert float(_neg_pearson_loss(pred, yn, valid)) == pytest.approx(expected, abs=1e-6)
