"""AttAttr's ``memory_budget``: the integration steps are chunked to fit, with the same attributions as one chunk."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import torch

import at2_lens.attattr.attribution as attribution_module
from at2_lens.attattr import AttentionAttribution
from at2_lens.attattr.memory import chunk_rows, parse_memory_budget, step_bytes
from at2_lens.backends import get_backend
from at2_lens.errors import InputError

TOKENS = torch.tensor([5, 70, 71, 72, 33, 90, 100, 44, 45, 46, 120, 7])


@pytest.mark.parametrize(("value", "expected"), [
    (1024, 1024), ("2GB", 2 * 10**9), ("512MiB", 512 * 2**20), ("1.5 gib", 3 * 2**29), ("800", 800), ("3kb", 3000),
])
def test_budget_strings(value: Any, expected: int) -> None:
    assert parse_memory_budget(value) == expected


@pytest.mark.parametrize("value", [0, -5, True, "2 parsecs", "GB", "", 1.5e9, None, "0.1B"])
def test_bad_budgets_name_the_argument(value: Any) -> None:
    with pytest.raises(InputError, match="memory_budget"):
        parse_memory_budget(value)


def test_chunk_rows_arithmetic() -> None:
    assert chunk_rows(10_000, 1_000, 1, 20) == 10  # ten steps per chunk
    assert chunk_rows(10_000, 1_000, 2, 20) == 10  # five steps x two examples
    assert chunk_rows(10**9, 1_000, 2, 20) is None  # everything fits: no chunking
    with pytest.raises(InputError, match="too small for even one integration step"):
        chunk_rows(1_999, 1_000, 2, 20)
    # the estimate grows with the square of the length (attention) and linearly with layers
    small = step_bytes(n_pos=100, n_layers=2, n_heads=4, d_model=64, d_mlp=256, d_vocab=300, logit_rows=1)
    long = step_bytes(n_pos=200, n_layers=2, n_heads=4, d_model=64, d_mlp=256, d_vocab=300, logit_rows=1)
    assert 2 < long / small < 4


class _RecordingIG(attribution_module.IntegratedGradients):  # type: ignore[misc, name-defined]
    sizes: ClassVar[list[int | None]] = []

    def attribute(self, *args: Any, **kwargs: Any) -> Any:
        _RecordingIG.sizes.append(kwargs.get("internal_batch_size"))
        return super().attribute(*args, **kwargs)


def test_chunked_attributions_equal_unchunked(tiny_llama: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    att = AttentionAttribution(tiny_llama)
    b = get_backend(tiny_llama)
    n_pos = TOKENS.shape[0]
    one_step = step_bytes(n_pos=n_pos, n_layers=b.n_layers, n_heads=b.n_heads, d_model=b.d_model,
                          d_mlp=int(b.model.cfg.d_mlp), d_vocab=b.d_vocab, logit_rows=n_pos)
    assert att.internal_batch_size_for(n_pos, one_step, n_steps=16) == 1  # a tiny budget: one step at a time
    assert att.internal_batch_size_for(n_pos, 3 * one_step, n_steps=16) == 3
    assert att.internal_batch_size_for(n_pos, "1GB", n_steps=16) is None
    assert att.internal_batch_size_for(n_pos, 4 * one_step, n_steps=16, n_rows=2) == 4  # 2 steps x 2 rows
    with pytest.raises(InputError, match=r"memory_budget.*too small"):
        att.internal_batch_size_for(n_pos, one_step - 1, n_steps=16)

    _RecordingIG.sizes = []
    monkeypatch.setattr(attribution_module, "IntegratedGradients", _RecordingIG)
    full = att.attribute(TOKENS, target=101, n_steps=16, return_convergence_delta=True)
    chunked = att.attribute(TOKENS, target=101, n_steps=16, memory_budget=2 * one_step, return_convergence_delta=True)
    n_layers = b.n_layers
    assert _RecordingIG.sizes[:n_layers] == [None] * n_layers
    chunks = _RecordingIG.sizes[n_layers:]
    assert len(chunks) == n_layers and all(c is not None and 1 <= c < 16 for c in chunks)
    # Same integral; chunking only changes the order of float sums.
    torch.testing.assert_close(chunked.attributions, full.attributions, rtol=1e-5, atol=1e-7)
    assert chunked.convergence_delta is not None and full.convergence_delta is not None
    torch.testing.assert_close(chunked.convergence_delta, full.convergence_delta, rtol=1e-4, atol=1e-6)


def test_budget_errors_come_before_any_forward_pass(tiny_llama: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    att = AttentionAttribution(tiny_llama)

    def no_forward(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a forward pass ran before the budget was checked")

    monkeypatch.setattr(att.backend, "run", no_forward)
    with pytest.raises(InputError, match=r"memory_budget.*too small for even one integration step"):
        att.attribute(TOKENS, target=101, n_steps=8, memory_budget=1000)
    with pytest.raises(InputError, match=r"memory_budget.*not both"):
        att.attribute(TOKENS, target=101, memory_budget="1GB", internal_batch_size=4)
    with pytest.raises(InputError, match="memory_budget"):
        att.attribute(TOKENS, target=101, memory_budget="lots")


@pytest.mark.real
@pytest.mark.slow
def test_smollm2_chunked_steps_match_one_chunk(smollm2: Any) -> None:
    b = get_backend(smollm2)
    ids = b.tokenizer("The capital of France is", return_tensors="pt")["input_ids"][0]
    att = AttentionAttribution(smollm2)
    full = att.attribute(ids, layers=[29], n_steps=3)
    assert att.internal_batch_size_for(ids.shape[0], "1GB", n_steps=3, layer=29) is None  # a short input fits
    one = step_bytes(n_pos=ids.shape[0], n_layers=b.n_layers, n_heads=b.n_heads, d_model=b.d_model,
                     d_mlp=int(smollm2.cfg.d_mlp), d_vocab=b.d_vocab, logit_rows=ids.shape[0])
    assert att.internal_batch_size_for(ids.shape[0], one, n_steps=3) == 1
    chunked = att.attribute(ids, layers=[29], n_steps=3, memory_budget=one)
    # Same integral; batched and one-at-a-time float32 matmuls differ only in rounding.
    scale = float(full.attributions.abs().max())
    assert scale > 0 and float((chunked.attributions - full.attributions).abs().max()) <= 1e-4 * scale
