"""One view of every supported TransformerLens model class.

``Backend`` wraps a ``HookedTransformer`` or ``HookedEncoder`` (TransformerLens 3.9) or a ``TransformerBridge``
(3.9 and 4.x) and answers the questions the attribution methods ask: layer and head counts, causality, the
tokenizer, hook names, how to run a forward pass with hooks, and how to apply an attention intervention so that
it takes effect. Which hook can be edited is decided by a cheap probe at run time (see ``probe.py``), never by a
version number.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from functools import cached_property
from typing import Any, Literal

import torch
from jaxtyping import Int
from torch import Tensor

from at2_lens.backends import _tl
from at2_lens.backends.probe import AttentionProbe, probe_attention
from at2_lens.errors import InputError, ModelNotSupportedError
from at2_lens.interventions import (
    FwdHook,
    PatternTransform,
    pattern_at_hook_pattern,
    pattern_via_qk_z,
    pattern_via_z,
)

ModelKind = Literal["hooked_transformer", "hooked_encoder", "bridge"]
AccessMode = Literal["auto", "pattern", "z"]


def model_kind(model: Any) -> ModelKind:
    """Which supported TransformerLens class ``model`` is; raises ModelNotSupportedError otherwise."""
    ht, he = _tl.hooked_transformer_class(), _tl.hooked_encoder_class()
    if ht is not None and isinstance(model, ht):
        return "hooked_transformer"
    if he is not None and isinstance(model, he):
        return "hooked_encoder"
    if isinstance(model, _tl.bridge_class()):
        return "bridge"
    raise ModelNotSupportedError(
        f"model: expected a TransformerLens HookedTransformer, HookedEncoder or TransformerBridge, "
        f"got {type(model).__module__}.{type(model).__name__}"
    )


class Backend:
    """The single adapter between the attribution methods and a TransformerLens model.

    Args:
        model: a ``HookedTransformer``/``HookedEncoder`` (TL 3.9) or ``TransformerBridge`` (TL 3.9/4.x).
        attention_access: where pattern interventions are applied. ``"auto"`` (default) probes the model and
            prefers ``hook_pattern``, falling back to ``hook_z``; ``"pattern"``/``"z"`` force one (and fail
            clearly if the probe shows it does not work).
    """

    def __init__(self, model: Any, attention_access: AccessMode = "auto") -> None:
        if attention_access not in ("auto", "pattern", "z"):
            raise InputError(f"attention_access: expected 'auto', 'pattern' or 'z', got {attention_access!r}")
        self.model = model
        self.kind: ModelKind = model_kind(model)
        self.requested_access: AccessMode = attention_access
        cfg = model.cfg
        self.n_layers: int = int(cfg.n_layers)
        self.n_heads: int = int(cfg.n_heads)
        self.n_kv_heads: int = int(getattr(cfg, "n_key_value_heads", None) or self.n_heads)
        self.d_model: int = int(cfg.d_model)
        self.d_head: int = int(cfg.d_head)
        self.d_vocab: int = int(cfg.d_vocab)
        self.n_ctx: int = int(cfg.n_ctx)
        self._active_mask: Tensor | None = None
        self._cached_generation_broken = False  # set when KV-cached decoding proved wrong (generate_greedy)

    # ----------------------------------------------------------------------------------------------- identity
    @property
    def tokenizer(self) -> Any:
        """The model's Hugging Face tokenizer; raises if the model has none."""
        tok = getattr(self.model, "tokenizer", None)
        if tok is None:
            raise ModelNotSupportedError("model.tokenizer is None: load the model with a tokenizer")
        return tok

    @property
    def architecture(self) -> str:
        """Architecture name, e.g. ``LlamaForCausalLM`` (from the config or the wrapped HF model)."""
        arch = getattr(self.model.cfg, "original_architecture", None)
        if not arch and self.kind == "bridge":
            original = getattr(self.model, "original_model", None)
            arch = type(original).__name__ if original is not None else None
        return str(arch or type(self.model).__name__)

    @property
    def model_name(self) -> str:
        return str(getattr(self.model.cfg, "model_name", "") or self.architecture)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @cached_property
    def vocab_hash(self) -> str:
        """sha256 of the tokenizer's vocabulary, so estimators can check they belong to this model."""
        vocab = sorted(self.tokenizer.get_vocab().items())
        return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8")).hexdigest()

    # ------------------------------------------------------------------------------------------------- probing
    @cached_property
    def probe(self) -> AttentionProbe:
        """What this model lets us read and edit, measured once on a short input."""
        return probe_attention(self)

    @property
    def is_causal(self) -> bool:
        """Whether attention is causal (decoder) or bidirectional (encoder), as measured by the probe."""
        return self.probe.causal

    @property
    def attention_access(self) -> Literal["pattern", "z"]:
        """Where pattern interventions are applied on this model: ``hook_pattern`` or ``hook_z``."""
        p = self.probe
        if not p.pattern_readable:
            raise ModelNotSupportedError(
                f"{self.describe()}: blocks.0.attn.hook_pattern never fires, so attention cannot be read or "
                "intervened on. On TransformerLens 3.9 load encoders as HookedEncoder (backend='hooked'); "
                "TransformerLens 4.x bridges fire it."
            )
        wanted = self.requested_access
        if wanted in ("auto", "pattern") and p.pattern_editable:
            return "pattern"
        if wanted in ("auto", "z") and p.z_editable:
            return "z"
        raise ModelNotSupportedError(
            f"{self.describe()}: attention cannot be intervened on "
            f"(edits at hook_pattern take effect: {p.pattern_editable}; at hook_z: {p.z_editable}; "
            f"requested attention_access={wanted!r}). Load the model as a HookedTransformer (TL 3.9) or with "
            "TransformerBridge.boot_transformers over a Hugging Face model."
        )

    def describe(self) -> str:
        return f"{self.kind} {self.architecture} (TransformerLens {'.'.join(map(str, _tl.tl_version()))})"

    # ---------------------------------------------------------------------------------------------- hook names
    @staticmethod
    def pattern_hook(layer: int) -> str:
        return f"blocks.{layer}.attn.hook_pattern"

    @staticmethod
    def z_hook(layer: int) -> str:
        return f"blocks.{layer}.attn.hook_z"

    @staticmethod
    def q_hook(layer: int) -> str:
        return f"blocks.{layer}.attn.hook_q"

    @staticmethod
    def k_hook(layer: int) -> str:
        return f"blocks.{layer}.attn.hook_k"

    @staticmethod
    def v_hook(layer: int) -> str:
        return f"blocks.{layer}.attn.hook_v"

    @staticmethod
    def resid_pre_hook(layer: int) -> str:
        return f"blocks.{layer}.hook_resid_pre"

    @staticmethod
    def resid_post_hook(layer: int) -> str:
        return f"blocks.{layer}.hook_resid_post"

    def check_layers(self, layers: Sequence[int] | None, name: str = "layers") -> list[int]:
        """Validate a list of layer indices (None means all) and return it sorted."""
        if layers is None:
            return list(range(self.n_layers))
        out = []
        for layer in layers:
            if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.n_layers:
                raise InputError(f"{name}: expected layer indices in [0, {self.n_layers}), got {layer!r}")
            out.append(layer)
        if not out:
            raise InputError(f"{name}: expected at least one layer index")
        return sorted(set(out))

    # --------------------------------------------------------------------------------------------- forwarding
    def check_tokens(self, tokens: Tensor, attention_mask: Tensor | None = None, name: str = "tokens") -> Tensor:
        """Validate token ids ``[batch, pos]`` (or ``[pos]``) before any model work; returns a 2-D tensor."""
        if not isinstance(tokens, Tensor):
            raise InputError(f"{name}: expected a torch.Tensor of token ids, got {type(tokens).__name__}")
        if tokens.dim() == 1:
            tokens = tokens[None]
        if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise InputError(f"{name}: expected integer token ids of shape [batch, pos], got {tokens.dtype} "
                             f"{tuple(tokens.shape)}")
        if tokens.shape[1] == 0:
            raise InputError(f"{name}: expected at least one token")
        if tokens.shape[1] > self.n_ctx:
            raise InputError(f"{name}: {tokens.shape[1]} tokens exceed the model's context window of {self.n_ctx}")
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= self.d_vocab:
            raise InputError(f"{name}: token ids must lie in [0, {self.d_vocab}), got values in [{lo}, {hi}]")
        if attention_mask is not None and attention_mask.shape != tokens.shape:
            raise InputError(f"attention_mask: expected shape {tuple(tokens.shape)}, got {tuple(attention_mask.shape)}")
        return tokens

    def run(
        self,
        tokens: Int[Tensor, "batch pos"],
        fwd_hooks: Sequence[FwdHook] = (),
        attention_mask: Int[Tensor, "batch pos"] | None = None,
    ) -> Tensor:
        """Run the model on token ids with forward hooks; returns its logits ``[batch, pos, vocab]``.

        ``attention_mask`` (1 = real token, 0 = padding) is passed under the name each model class expects.
        """
        tokens = tokens.to(self.device)
        kwargs: dict[str, Any] = {"return_type": "logits"}
        if attention_mask is not None:
            key = "one_zero_attention_mask" if self.kind == "hooked_encoder" else "attention_mask"
            kwargs[key] = attention_mask.to(self.device)
        self._active_mask = attention_mask
        try:
            if not fwd_hooks:
                return self.model(tokens, **kwargs)
            return self.model.run_with_hooks(tokens, fwd_hooks=list(fwd_hooks), **kwargs)
        finally:
            self._active_mask = None

    # ------------------------------------------------------------------------------------------- interventions
    def pattern_hooks(self, layer: int, transform: PatternTransform) -> list[FwdHook]:
        """Forward hooks that replace layer ``layer``'s attention pattern by ``transform(pattern)``.

        Uses ``hook_pattern`` where edits there take effect, else recomputes ``hook_z`` from the transformed
        pattern; the result is the same either way (tested).
        """
        if self.attention_access == "pattern":
            return [(self.pattern_hook(layer), pattern_at_hook_pattern(transform))]
        if self.probe.z_route == "pattern":
            read_p, read_v, write_z = pattern_via_z(transform)
            return [(self.pattern_hook(layer), read_p), (self.v_hook(layer), read_v), (self.z_hook(layer), write_z)]
        read_q, read_k, read_v, write_z = pattern_via_qk_z(transform, self.is_causal, lambda: self._active_mask)
        return [
            (self.q_hook(layer), read_q),
            (self.k_hook(layer), read_k),
            (self.v_hook(layer), read_v),
            (self.z_hook(layer), write_z),
        ]

    def all_layer_pattern_hooks(
        self, transform: PatternTransform, layers: Sequence[int] | None = None
    ) -> list[FwdHook]:
        """``pattern_hooks`` for every layer in ``layers`` (default: all)."""
        hooks: list[FwdHook] = []
        for layer in self.check_layers(layers):
            hooks.extend(self.pattern_hooks(layer, transform))
        return hooks

    # ---------------------------------------------------------------------------------------------- generation
    @torch.no_grad()
    def generate_greedy(self, input_ids: Int[Tensor, " pos"], max_new_tokens: int = 64) -> Int[Tensor, " new"]:
        """Greedy continuation of a 1-D prompt; returns only the new token ids (EOS excluded).

        Generation uses the KV cache, and its result is checked with one uncached forward pass over prompt and
        continuation: every new token must be that pass's argmax. Some library combinations break cached decoding
        (TransformerLens 4.3 bridges under transformers 5.24 continue " Paris" with "-------"); then the
        continuation is generated again without the cache, with a warning, and this model skips the cache from then
        on.
        """
        if not self.is_causal:
            raise ModelNotSupportedError(f"{self.describe()} is an encoder: it cannot generate a response")
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens: expected >= 1, got {max_new_tokens}")
        ids = self.check_tokens(input_ids, name="input_ids")
        eos = self.tokenizer.eos_token_id
        limit = min(max_new_tokens, self.n_ctx - ids.shape[1])
        if limit < 1:
            raise InputError(f"input_ids: the prompt ({ids.shape[1]} tokens) fills the context window ({self.n_ctx})")
        ids = ids.to(self.device)
        if not self._cached_generation_broken:
            new = self._generate(ids, limit, eos, use_cache=True)
            if self._is_greedy_continuation(ids, new):
                return new
            self._cached_generation_broken = True
            warnings.warn(
                f"{self.describe()}: greedy decoding with the KV cache disagrees with an uncached forward pass (a "
                "TransformerLens/transformers incompatibility); generating without the cache from now on (slower, "
                "correct)", RuntimeWarning, stacklevel=2,
            )
        return self._generate(ids, limit, eos, use_cache=False)

    def _generate(self, ids: Tensor, limit: int, eos: int | None, *, use_cache: bool) -> Tensor:
        """``limit`` greedy tokens after ``ids`` [1, pos] (cut at the first EOS, which is dropped), on the CPU."""
        if self.kind == "bridge":
            out = self.model.original_model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=limit, do_sample=False, use_cache=use_cache,
                eos_token_id=eos, pad_token_id=eos if eos is not None else 0,
            )
        else:
            out = self.model.generate(
                ids, max_new_tokens=limit, do_sample=False, stop_at_eos=eos is not None, eos_token_id=eos,
                verbose=False, return_type="tokens", use_past_kv_cache=use_cache,
            )
        new = out[0, ids.shape[1]:].cpu()
        if eos is not None:
            stop = (new == eos).nonzero()
            if len(stop):
                new = new[: int(stop[0, 0])]
        return new

    def _is_greedy_continuation(self, ids: Tensor, new: Tensor) -> bool:
        """Whether each token of ``new`` is the argmax of one uncached forward pass over ``ids`` + ``new``."""
        if len(new) < 2:  # the first new token comes from the prompt's own pass, which the cache does not touch
            return True
        full = torch.cat([ids, new[None].to(ids.device)], dim=1)
        logits = self.run(full)
        p = ids.shape[1]
        predicted = logits[0, p - 1 : p - 1 + len(new)].argmax(dim=-1).cpu()
        return bool((predicted == new).all())


_CACHE_ATTR = "_at2_lens_backends"


def get_backend(model: Any, attention_access: AccessMode = "auto") -> Backend:
    """The (cached) ``Backend`` of a model; pass a ``Backend`` through unchanged."""
    if isinstance(model, Backend):
        return model
    cache: dict[str, Backend] | None = getattr(model, _CACHE_ATTR, None)
    if cache is None:
        cache = {}
        try:
            object.__setattr__(model, _CACHE_ATTR, cache)
        except (AttributeError, TypeError):
            return Backend(model, attention_access)
    if attention_access not in cache:
        cache[attention_access] = Backend(model, attention_access)
    return cache[attention_access]
