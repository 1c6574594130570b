"""The MiniLM SST-2 sentiment classifier: head file, data reader, pooling, hooks, and the shipped accuracy."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from at2_lens.errors import InputError, ModelLoadError
from at2_lens.models.classifier import (
    MINILM_SST2_HEAD,
    SST2_LABELS,
    ClassifierHead,
    DatasetNotFoundError,
    SentimentClassifier,
    load_minilm_sst2,
    load_sst2,
    mean_pool,
    pool,
    read_head,
    write_head,
)
from tests.conftest import BACKENDS

TEXTS = [
    "a gripping , beautifully acted film .",
    "dull",
    "it 's not bad at all , but the ending drags on and on and never seems to stop .",
]


def _head(meta: dict | None = None, d_model: int = 384) -> ClassifierHead:
    g = torch.Generator().manual_seed(0)
    base = {"labels": list(SST2_LABELS), "pooling": "mean", "format": 1}
    return ClassifierHead(torch.randn(2, d_model, generator=g), torch.randn(2, generator=g), {**base, **(meta or {})})


# ------------------------------------------------------------------------------------------------ no model needed
@pytest.mark.line_independent
def test_shipped_head_reads_and_records_its_provenance() -> None:
    head = read_head(MINILM_SST2_HEAD)
    assert head.weight.shape == (2, 384) and head.bias.shape == (2,)
    assert head.labels == ("negative", "positive")
    # Moderate weights: the head must not amplify float noise (MiniLM has near-constant output dimensions).
    assert head.weight.abs().max().item() < 100
    meta = head.meta
    assert meta["pooling"] in ("mean", "mean_l2")
    assert meta["model"]["n_layers"] == 6 and meta["model"]["d_model"] == 384 and meta["model"]["d_vocab"] == 30522
    assert meta["model"]["weights_sha256"] == "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
    assert meta["training"]["data"] == "sst2/train.tsv" and meta["training"]["rows_used"] >= 8000
    assert meta["validation"]["rows"] == 872
    assert meta["validation_accuracy"] > 0.776  # better than the 4,000-phrase reference probe
    assert meta["command"].startswith("PYTHONPATH=. python scripts/train_minilm_sst2.py")


@pytest.mark.line_independent
def test_head_round_trip(tmp_path: Path) -> None:
    head = _head({"note": "x"})
    path = write_head(tmp_path / "h.safetensors", head)
    back = read_head(path)
    assert torch.equal(back.weight, head.weight) and torch.equal(back.bias, head.bias)
    assert back.meta["note"] == "x" and back.pooling == "mean"


@pytest.mark.line_independent
def test_pickle_head_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "head.safetensors"
    path.write_bytes(pickle.dumps({"weight": [[0.0] * 384] * 2, "bias": [0.0, 0.0]}))
    with pytest.raises(ModelLoadError, match="pickle"):
        read_head(path)
    zipped = tmp_path / "head.pt"
    torch.save({"weight": torch.zeros(2, 384)}, zipped)  # a zip holding a pickle
    with pytest.raises(ModelLoadError, match="pickle"):
        read_head(zipped)


@pytest.mark.line_independent
def test_corrupted_or_missing_head_is_refused(tmp_path: Path) -> None:
    data = MINILM_SST2_HEAD.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[:-7])
    with pytest.raises(ModelLoadError, match="refused"):
        read_head(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(ModelLoadError, match="refused"):
        read_head(garbage)
    with pytest.raises(ModelLoadError, match="missing"):
        read_head(tmp_path / "absent.safetensors")
    with pytest.raises(ModelLoadError, match="missing"):
        load_minilm_sst2(head_path=tmp_path / "absent.safetensors")


@pytest.mark.line_independent
def test_head_with_wrong_tensors_or_metadata_is_refused(tmp_path: Path) -> None:
    from at2_lens.files import safetensors_bytes

    path = tmp_path / "h.safetensors"
    meta = {"labels": ["negative", "positive"], "pooling": "mean", "format": 1}
    path.write_bytes(safetensors_bytes({"weight": torch.zeros(2, 384)}, "at2_lens.classifier_head", meta))
    with pytest.raises(ModelLoadError, match="'weight' and 'bias'"):
        read_head(path)
    bad = {**meta, "pooling": "max"}
    path.write_bytes(
        safetensors_bytes({"weight": torch.zeros(2, 384), "bias": torch.zeros(2)}, "at2_lens.classifier_head", bad)
    )
    with pytest.raises(ModelLoadError, match="pooling"):
        read_head(path)


@pytest.mark.line_independent
def test_mean_pool_ignores_padding() -> None:
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    got = mean_pool(hidden, mask)
    assert torch.allclose(got[0], hidden[0, :2].mean(0)) and torch.allclose(got[1], hidden[1].mean(0))
    assert torch.allclose(pool(hidden, mask, "mean_l2").norm(dim=-1), torch.ones(2))
    with pytest.raises(InputError, match="pooling"):
        pool(hidden, mask, "max")


@pytest.mark.line_independent
def test_load_sst2_reads_and_fails_clearly(tmp_path: Path) -> None:
    (tmp_path / "sst2").mkdir()
    (tmp_path / "sst2" / "validation.tsv").write_text("sentence\tlabel\ngood film \t1\nbad\t0\n", encoding="utf-8")
    assert load_sst2("validation", data_dir=tmp_path) == (["good film", "bad"], [1, 0])
    assert load_sst2("validation", limit=1, data_dir=tmp_path) == (["good film"], [1])
    with pytest.raises(DatasetNotFoundError, match="absent"):
        load_sst2("train", data_dir=tmp_path)
    with pytest.raises(InputError, match="split"):
        load_sst2("test", data_dir=tmp_path)
    (tmp_path / "sst2" / "train.tsv").write_text("text\tlabel\nx\t1\n", encoding="utf-8")
    with pytest.raises(InputError, match="header"):
        load_sst2("train", data_dir=tmp_path)


@pytest.mark.line_independent
def test_load_sst2_real_files() -> None:
    texts, labels = load_sst2("validation")
    assert len(texts) == 872 and sum(labels) == 444


# ----------------------------------------------------------------------------------------------- the real model
def _zero(x: torch.Tensor, hook: object) -> torch.Tensor:
    return torch.zeros_like(x)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def classifiers(minilm: object) -> dict[str, SentimentClassifier]:
    """The shipped classifier on every backend of this TransformerLens line (the default one reuses ``minilm``)."""
    out = {BACKENDS[0]: load_minilm_sst2(model=minilm)}
    for backend in BACKENDS[1:]:
        out[backend] = load_minilm_sst2(backend)
    return out


@pytest.fixture(scope="module")
def validation_probs(classifiers: dict[str, SentimentClassifier]) -> dict[str, torch.Tensor]:
    texts, _ = load_sst2("validation")
    return {name: clf.predict_proba(texts) for name, clf in classifiers.items()}


@pytest.mark.real
@pytest.mark.slow
def test_recorded_validation_accuracy_is_reproduced_on_every_backend(
    classifiers: dict[str, SentimentClassifier], validation_probs: dict[str, torch.Tensor]
) -> None:
    _, labels = load_sst2("validation")
    y = torch.tensor(labels)
    for name, probs in validation_probs.items():
        recorded = classifiers[name].head.meta["validation_accuracy"]
        acc = (probs.argmax(-1) == y).float().mean().item()
        assert abs(acc - recorded) <= 0.005, (name, acc, recorded)
        assert torch.allclose(probs.sum(-1), torch.ones(len(y)), atol=1e-5)
    ref = validation_probs[BACKENDS[0]]
    for name, probs in validation_probs.items():
        assert (probs - ref).abs().max().item() < 1e-4, name


@pytest.mark.real
def test_pooled_state_equals_hugging_face_mean_pooling(classifiers: dict[str, SentimentClassifier]) -> None:
    from transformers import BertModel

    from at2_lens.models.embedded import minilm_dir

    hf = BertModel.from_pretrained(str(minilm_dir()), attn_implementation="eager").eval()
    for name, clf in classifiers.items():
        tokens, mask = clf.tokenize(TEXTS)
        assert bool((mask == 0).any()), "the texts must need padding"
        with torch.no_grad():
            hidden = hf(input_ids=tokens, attention_mask=mask).last_hidden_state
            want = pool(hidden, mask, clf.head.pooling)
            got = clf.pooled(tokens, mask)
        assert (got - want).abs().max().item() < 1e-4, name


@pytest.mark.real
def test_fwd_hooks_reach_the_model_and_carry_gradients(classifiers: dict[str, SentimentClassifier]) -> None:
    for name, clf in classifiers.items():
        tokens, mask = clf.tokenize(TEXTS)
        with torch.no_grad():
            clean = clf.forward(tokens, mask)
            zeroed = clf.forward(tokens, mask, fwd_hooks=[("blocks.0.attn.hook_z", _zero)])
            again = clf.forward(tokens, mask)
        assert clean.shape == (3, 2) and torch.allclose(clean.sum(-1), torch.ones(3))
        assert (clean - zeroed).abs().max().item() > 1e-3, name
        assert torch.equal(clean, again), f"{name}: a hook outlived its pass"
        # The contract an integrated-gradients-over-attention method relies on: scale a layer's attention
        # pattern through injected hooks and differentiate the class probability.
        alpha = torch.ones((), requires_grad=True)
        hooks = clf.backend.pattern_hooks(2, lambda p, alpha=alpha: p * alpha)
        clf.forward(tokens, mask, fwd_hooks=hooks)[:, 1].sum().backward()
        assert alpha.grad is not None and alpha.grad.abs().item() > 0, name
        assert clf.predict(TEXTS) == clean.argmax(-1).tolist()


@pytest.mark.real
def test_head_must_match_the_model(minilm: object, tmp_path: Path) -> None:
    path = write_head(tmp_path / "h.safetensors", _head({"model": {"n_layers": 7}}))
    with pytest.raises(ModelLoadError, match="n_layers=7"):
        load_minilm_sst2(model=minilm, head_path=path)
    path = write_head(tmp_path / "w.safetensors", _head(d_model=512))
    with pytest.raises(ModelLoadError, match="d_model"):
        load_minilm_sst2(model=minilm, head_path=path)
    clf = load_minilm_sst2(model=minilm)
    with pytest.raises(InputError, match="texts"):
        clf.predict("not a list")
    with pytest.raises(InputError, match="labels"):
        clf.accuracy(["a", "b"], [1])
