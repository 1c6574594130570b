"""Tiny random TransformerLens models for fast unit tests, offline, on both TransformerLens lines.

The same seed gives the same weights whatever the backend, because every variant is built from one tiny
Hugging Face model: a Llama-type decoder (rotary positions, grouped key/value heads, a chat template) or a
BERT-type encoder. The tokenizer is byte-level, so any Unicode text tokenizes with exact character offsets.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Literal

import torch

from at2_lens._validate import check_choice
from at2_lens.errors import InputError
from at2_lens.models import BACKEND_CHOICES, BackendChoice, DtypeLike, resolve_dtype

TinyArch = Literal["llama", "bert"]

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_DIRS: list[str] = []


@atexit.register
def _cleanup() -> None:
    for d in _DIRS:
        shutil.rmtree(d, ignore_errors=True)


def _workdir() -> Path:
    d = tempfile.mkdtemp(prefix="at2_lens_tiny_")
    _DIRS.append(d)
    return Path(d)


def tiny_tokenizer(arch: TinyArch = "llama") -> Any:
    """A byte-level fast tokenizer (256 byte tokens + specials) with offsets; a chat template for ``llama``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(set(pre_tokenizers.ByteLevel.alphabet())))}
    specials = ["<|bos|>", "<|eos|>", "<|pad|>"] if arch == "llama" else ["[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]"]
    for s in specials:
        vocab[s] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    if arch == "llama":
        tok = PreTrainedTokenizerFast(
            tokenizer_object=core, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>"
        )
        tok.chat_template = CHAT_TEMPLATE
    else:
        tok = PreTrainedTokenizerFast(
            tokenizer_object=core, cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]",
            mask_token="[MASK]", unk_token="[UNK]",
        )
    # TransformerLens re-loads the tokenizer by name; a saved copy makes that work offline.
    d = _workdir() / "tokenizer"
    tok.save_pretrained(d)
    return PreTrainedTokenizerFast.from_pretrained(d)


def tiny_hf_model(
    arch: TinyArch = "llama",
    *,
    seed: int = 0,
    n_layers: int = 2,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    d_model: int = 64,
    n_ctx: int = 512,
    tokenizer: Any = None,
) -> Any:
    """A randomly initialised tiny Hugging Face model (``LlamaForCausalLM`` or ``BertForMaskedLM``)."""
    from transformers import BertConfig, BertForMaskedLM, LlamaConfig, LlamaForCausalLM

    if arch not in ("llama", "bert"):
        raise InputError(f"arch: expected 'llama' or 'bert', got {arch!r}")
    tok = tokenizer or tiny_tokenizer(arch)
    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(
            vocab_size=len(tok), hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers,
            num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, max_position_embeddings=n_ctx,
            tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        cfg.architectures = ["LlamaForCausalLM"]
        model = LlamaForCausalLM(cfg)
    else:
        cfg = BertConfig(
            vocab_size=len(tok), hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers,
            num_attention_heads=n_heads, max_position_embeddings=n_ctx, pad_token_id=tok.pad_token_id,
        )
        cfg.architectures = ["BertForMaskedLM"]
        model = BertForMaskedLM(cfg)
    return model.eval()


def save_tiny(arch: TinyArch, directory: str | Path, *, seed: int = 0, **kwargs: Any) -> Path:
    """Save a tiny random Hugging Face model and its tokenizer to ``directory`` (loadable by ``load_model``)."""
    tok = tiny_tokenizer(arch)
    hf = tiny_hf_model(arch, seed=seed, tokenizer=tok, **kwargs)
    directory = Path(directory)
    hf.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def load_tiny(
    arch: TinyArch = "llama",
    backend: BackendChoice = "auto",
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: DtypeLike = torch.float32,
    **kwargs: Any,
) -> Any:
    """A tiny random TransformerLens model: ``hooked`` (TL 3.9 only) or ``bridge`` (both lines), on ``device`` in
    ``dtype`` (as ``load_model`` takes them).

    ``auto`` picks the hooked class where it exists. Same ``seed`` → same weights on every backend. The model is
    saved to a temporary directory and loaded back through ``load_hf``, the loader users take, so the tiny
    models exercise the real loading path.
    """
    from at2_lens.models.hf import load_hf

    check_choice("backend", backend, BACKEND_CHOICES)
    dtype = resolve_dtype(dtype)
    d = save_tiny(arch, _workdir() / "model", seed=seed, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_hf(d, backend=backend, device=device, dtype=dtype, model_name=f"at2-lens-tiny-{arch}")
