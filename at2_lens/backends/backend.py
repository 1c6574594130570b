"""One view of every supported TransformerLens model class.

``Backend`` answers the questions the attribution methods ask of a model: layer and head counts, causality, the
tokenizer, hook names, how to run a forward pass with hooks, and how to apply an attention intervention so that it
takes effect. There is one subclass per model class (``hooked.py``: ``HookedTransformer``, ``HookedEncoder``;
``bridge.py``: ``TransformerBridge``), chosen once from the model's type by ``Backend(model)`` / ``get_backend``;
code outside ``at2_lens.backends`` never branches on the model class. Which hook can be edited is decided by a
cheap probe at run time (see ``probe.py``), never by a version number.
"""

from __future__ import annotations

import hashlib
import json
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar, Literal

import torch
from jaxtyping import Int
from torch import Tensor

from at2_lens._validate import check_choice, check_int
from at2_lens.backends import _tl, hook_names
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
ACCESS_MODES: tuple[AccessMode, ...] = ("auto", "pattern", "z")


@dataclass
class ModelFacts:
    """What was measured on one model, shared by the backends ``get_backend`` makes for it.

    Holds no reference to the model, so caching it per model (weakly keyed) never keeps a model alive.
    """

    probe: AttentionProbe | None = None
    vocab_hash: str | None = None
    cached_generation_broken: bool = False  # KV-cached decoding proved wrong (see generate_greedy)
    extra: dict[str, Any] = field(default_factory=dict)  # subclass-specific measurements


def _backend_classes() -> tuple[type[Backend], ...]:
    """The backend subclasses, in the order they are tried (imported here: they import this module)."""
    from at2_lens.backends.bridge import BridgeBackend
    from at2_lens.backends.hooked import HookedEncoderBackend, HookedTransformerBackend

    return (HookedTransformerBackend, HookedEncoderBackend, BridgeBackend)


def backend_class(model: Any) -> type[Backend]:
    """The ``Backend`` subclass for ``model``'s class; raises ModelNotSupportedError for anything else."""
    for cls in _backend_classes():
        if cls.accepts(model):
            return cls
    raise ModelNotSupportedError(
        f"model: expected a TransformerLens HookedTransformer, HookedEncoder or TransformerBridge, "
        f"got {type(model).__module__}.{type(model).__name__}"
    )


def model_kind(model: Any) -> ModelKind:
    """Which supported TransformerLens class ``model`` is; raises ModelNotSupportedError otherwise."""
    return backend_class(model).kind


class Backend:
    """The single adapter between the attribution methods and a TransformerLens model.

    ``Backend(model)`` returns the subclass instance for the model's class. Subclasses override what differs
    between model classes; everything else is shared here.

    Args:
        model: a ``HookedTransformer``/``HookedEncoder`` (TL 3.9) or ``TransformerBridge`` (TL 3.9/4.x).
        attention_access: where pattern interventions are applied. ``"auto"`` (default) probes the model and
            prefers ``hook_pattern``, falling back to ``hook_z``; ``"pattern"``/``"z"`` force one (and fail
            clearly if the probe shows it does not work).
        facts: measurements to share with other backends of the same model (``get_backend`` passes them).
    """

    kind: ClassVar[ModelKind]
    """Which model class this backend serves (for messages and records; never branch on it)."""

    def __new__(cls, model: Any = None, *args: Any, **kwargs: Any) -> Backend:
        # ``Backend(model)`` picks the subclass for the model's class (einops-style dispatch, done once here).
        if cls is Backend and model is not None:
            cls = backend_class(model)
        return super().__new__(cls)

    def __init__(self, model: Any, attention_access: AccessMode = "auto", *, facts: ModelFacts | None = None) -> None:
        check_choice("attention_access", attention_access, ACCESS_MODES)
        if not type(self).accepts(model):
            backend_class(model)  # raises for unsupported models
            raise ModelNotSupportedError(f"model: {type(self).__name__} cannot serve a {type(model).__name__}")
        self.model = model
        self.requested_access: AccessMode = attention_access
        self.facts = facts if facts is not None else ModelFacts()
        cfg = model.cfg
        self.n_layers: int = int(cfg.n_layers)
        self.n_heads: int = int(cfg.n_heads)
        self.n_kv_heads: int = int(getattr(cfg, "n_key_value_heads", None) or self.n_heads)
        self.d_model: int = int(cfg.d_model)
        self.d_head: int = int(cfg.d_head)
        self.d_mlp: int = int(getattr(cfg, "d_mlp", None) or 4 * self.d_model)
        self.d_vocab: int = int(cfg.d_vocab)
        self.n_ctx: int = int(cfg.n_ctx)
        self._active_mask: Tensor | None = None

    @classmethod
    def model_class(cls) -> type[Any] | None:
        """The TransformerLens class this backend serves, or None where this TransformerLens line lacks it."""
        raise NotImplementedError

    @classmethod
    def accepts(cls, model: Any) -> bool:
        """Whether this backend serves ``model``."""
        model_cls = cls.model_class()
        return model_cls is not None and isinstance(model, model_cls)

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
        """Architecture name, e.g. ``LlamaForCausalLM`` (from the config)."""
        arch = getattr(self.model.cfg, "original_architecture", None)
        return str(arch or type(self.model).__name__)

    @property
    def model_name(self) -> str:
        return str(getattr(self.model.cfg, "model_name", "") or self.architecture)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def state_token(self) -> tuple[Any, ...]:
        """A cheap token that changes when the model's weights may have: their dtypes and devices, which tensors
        they are (``id`` and ``data_ptr``, so replaced or moved tensors count), and the sum of their autograd
        version counters (bumped by in-place edits such as ``p.mul_(2)`` under ``no_grad`` or
        ``load_state_dict``). Edits through ``p.data`` bypass the version counter and are not seen.

        Results cached per input (AT2's feature pass) are keyed on it, so a model cast, moved or edited after a
        call is run again instead of answering from the old weights.
        """
        kinds: set[tuple[str, str]] = set()
        version = 0
        which = []
        for t in (*self.model.parameters(), *self.model.buffers()):
            kinds.add((str(t.dtype), str(t.device)))
            version += t._version
            which.append((id(t), t.data_ptr() if t.device.type != "meta" else 0))
        return tuple(sorted(kinds)), version, hash(tuple(which))

    @property
    def vocab_hash(self) -> str:
        """sha256 of the tokenizer's vocabulary, so estimators can check they belong to this model."""
        if self.facts.vocab_hash is None:
            vocab = sorted(self.tokenizer.get_vocab().items())
            self.facts.vocab_hash = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8")).hexdigest()
        return self.facts.vocab_hash

    # ------------------------------------------------------------------------------------------------- probing
    @cached_property
    def probe(self) -> AttentionProbe:
        """What this model lets us read and edit, measured once on a short input."""
        if self.facts.probe is None:
            self.facts.probe = probe_attention(self)
        return self.facts.probe

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
    # The names every supported class shares, from ``hook_names`` (TransformerLens's ``get_act_name``).
    pattern_hook = staticmethod(hook_names.pattern)
    z_hook = staticmethod(hook_names.z)
    q_hook = staticmethod(hook_names.q)
    k_hook = staticmethod(hook_names.k)
    v_hook = staticmethod(hook_names.v)
    resid_pre_hook = staticmethod(hook_names.resid_pre)
    resid_post_hook = staticmethod(hook_names.resid_post)

    def final_hidden_hook(self) -> str:
        """The hook holding the model's final hidden state ``[batch, pos, d_model]`` (the unembedding's input,
        or an encoder's ``last_hidden_state``). Each model class names it differently."""
        raise NotImplementedError

    def has_hook(self, name: str) -> bool:
        """Whether ``name`` is a hook point of this model."""
        return name in getattr(self.model, "hook_dict", {})

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

    def _mask_kwargs(self, attention_mask: Tensor | None) -> dict[str, Any]:
        """``attention_mask`` (1 = real token, 0 = padding) under the keyword this model class expects."""
        return {} if attention_mask is None else {"attention_mask": attention_mask.to(self.device)}

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
        kwargs: dict[str, Any] = {"return_type": "logits", **self._mask_kwargs(attention_mask)}
        self._active_mask = attention_mask
        try:
            if not fwd_hooks:
                return self.model(tokens, **kwargs)
            return self.model.run_with_hooks(tokens, fwd_hooks=list(fwd_hooks), **kwargs)
        finally:
            self._active_mask = None

    # ------------------------------------------------------------------ cheaper forwards (where the class allows)
    @property
    def can_start_at_layer(self) -> bool:
        """Whether ``run_from_layer`` can start a forward at a block from its cached ``hook_resid_pre``."""
        return False

    def start_mask(self, tokens: Tensor, attention_mask: Tensor | None) -> Tensor | None:
        """The attention mask the model derives for ``tokens`` at the embedding, for ``run_from_layer``."""
        raise ModelNotSupportedError(f"{self.describe()} cannot start a forward pass at a later layer")

    def run_from_layer(
        self,
        resid: Tensor,
        layer: int,
        fwd_hooks: Sequence[FwdHook] = (),
        start_mask: Tensor | None = None,
        attention_mask: Tensor | None = None,
        *,
        rows: Tensor | None = None,
    ) -> Tensor:
        """Logits of a forward pass that starts at block ``layer`` from ``resid`` (its ``hook_resid_pre``).

        ``start_mask`` is ``start_mask(tokens, attention_mask)``; with ``rows`` only those logits rows are computed
        (``[batch, len(rows), vocab]``), as ``run_rows``.
        """
        raise ModelNotSupportedError(f"{self.describe()} cannot start a forward pass at a later layer")

    def _edits_need_no_mask(self) -> bool:
        """Whether attention edits on this model work without knowing the padding mask (the rows-only routes run
        the model in ways that were checked only for these)."""
        return self.attention_access == "pattern" or self.probe.z_route == "pattern"

    @property
    def rows_route(self) -> str | None:
        """How ``run_rows`` computes only some logits rows on this model, or None where it cannot."""
        return None

    def run_rows(
        self,
        tokens: Int[Tensor, "batch pos"],
        rows: Int[Tensor, " rows"],
        fwd_hooks: Sequence[FwdHook] = (),
        attention_mask: Int[Tensor, "batch pos"] | None = None,
    ) -> Tensor:
        """Logits rows ``rows`` (positions) only, ``[batch, len(rows), vocab]``, from one forward pass with hooks.

        Only the chosen rows are computed where ``rows_route`` is set; elsewhere the full logits are sliced.
        """
        logits = self.run(tokens, fwd_hooks, attention_mask)
        return logits[:, rows.to(logits.device)]

    def run_checking_rows(
        self,
        tokens: Int[Tensor, "batch pos"],
        rows: Int[Tensor, " rows"],
        fwd_hooks: Sequence[FwdHook] = (),
        attention_mask: Int[Tensor, "batch pos"] | None = None,
    ) -> tuple[Tensor, bool]:
        """``run``'s full logits, and whether ``run_rows`` reproduces them at ``rows`` on this very input (checked
        from the same forward pass where the rows route could differ, e.g. a logit soft cap)."""
        return self.run(tokens, fwd_hooks, attention_mask), True

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
        on. A caller that runs its own uncached pass over prompt + continuation anyway (AT2's feature pass) uses
        ``generate_greedy_unchecked`` and ``confirm_greedy`` instead, so that one pass does both jobs.
        """
        new, checked = self.generate_greedy_unchecked(input_ids, max_new_tokens)
        if checked:
            return new
        ids = input_ids.reshape(1, -1).to(self.device)
        if self.confirm_greedy(new, self._greedy_predictions(ids, new), stacklevel=3):
            return new
        return self.generate_greedy_unchecked(input_ids, max_new_tokens)[0]  # the cache is now known broken

    @torch.no_grad()
    def generate_greedy_unchecked(
        self, input_ids: Int[Tensor, " pos"], max_new_tokens: int = 64
    ) -> tuple[Int[Tensor, " new"], bool]:
        """``generate_greedy`` without its checking pass: the new token ids, and whether they are already known to
        be right (True when generated without the KV cache, because the cache was found broken on this model).

        When the second value is False the caller must check the ids with ``confirm_greedy`` on the argmax of its
        own uncached forward pass over prompt + continuation, and generate again if that fails.
        """
        if not self.is_causal:
            raise ModelNotSupportedError(f"{self.describe()} is an encoder: it cannot generate a response")
        max_new_tokens = check_int("max_new_tokens", max_new_tokens)
        ids = self.check_tokens(input_ids, name="input_ids")
        eos = self.tokenizer.eos_token_id
        limit = min(max_new_tokens, self.n_ctx - ids.shape[1])
        if limit < 1:
            raise InputError(f"input_ids: the prompt ({ids.shape[1]} tokens) fills the context window ({self.n_ctx})")
        ids = ids.to(self.device)
        if self.facts.cached_generation_broken:
            return self._generate(ids, limit, eos, use_cache=False), True
        new = self._generate(ids, limit, eos, use_cache=True)
        # the first new token comes from the prompt's own pass, which the cache does not touch
        return new, len(new) < 2

    def confirm_greedy(
        self, new: Int[Tensor, " new"], predicted: Int[Tensor, " new"], *, stacklevel: int = 1
    ) -> bool:
        """Whether KV-cached ``new`` is the greedy continuation, given ``predicted``: the argmax of an uncached
        forward pass over prompt + ``new`` at the rows that produce ``new`` (hooks that only read may be attached).

        On disagreement this model is marked as having broken cached decoding (``generate_greedy`` then skips the
        cache) and a RuntimeWarning is issued (``stacklevel`` counts from the caller: 1 names the caller's line);
        the caller generates again.
        """
        if predicted.shape != new.shape:
            raise InputError(f"predicted: expected shape {tuple(new.shape)}, got {tuple(predicted.shape)}")
        if bool((predicted.cpu() == new.cpu()).all()):
            return True
        self.facts.cached_generation_broken = True
        warnings.warn(
            f"{self.describe()}: greedy decoding with the KV cache disagrees with an uncached forward pass (a "
            "TransformerLens/transformers incompatibility); generating without the cache from now on (slower, "
            "correct)", RuntimeWarning, stacklevel=stacklevel + 1,
        )
        return False

    def _generate_ids(self, ids: Tensor, limit: int, eos: int | None, *, use_cache: bool) -> Tensor:
        """The model's own greedy generation: prompt ``ids`` [1, pos] followed by up to ``limit`` new ids."""
        raise ModelNotSupportedError(f"{self.describe()} cannot generate a response")

    def _generate(self, ids: Tensor, limit: int, eos: int | None, *, use_cache: bool) -> Tensor:
        """``limit`` greedy tokens after ``ids`` [1, pos] (cut at the first EOS, which is dropped), on the CPU."""
        out = self._generate_ids(ids, limit, eos, use_cache=use_cache)
        new = out[0, ids.shape[1]:].cpu()
        if eos is not None:
            stop = (new == eos).nonzero()
            if len(stop):
                new = new[: int(stop[0, 0])]
        return new

    def _greedy_predictions(self, ids: Tensor, new: Tensor) -> Tensor:
        """The argmax of one uncached forward pass over ``ids`` [1, pos] + ``new`` at the rows producing ``new``."""
        full = torch.cat([ids, new[None].to(ids.device)], dim=1)
        logits = self.run(full)
        p = ids.shape[1]
        return logits[0, p - 1 : p - 1 + len(new)].argmax(dim=-1).cpu()


# -------------------------------------------------------------------------------------------------------- cache
@dataclass
class _CacheEntry:
    facts: ModelFacts
    backends: weakref.WeakValueDictionary[str, Backend]


# Keyed weakly by the model, so neither the model object is touched nor kept alive. The backends themselves are
# held weakly too (each one references its model); what was measured survives them in ``facts``.
_CACHE: weakref.WeakKeyDictionary[Any, _CacheEntry] = weakref.WeakKeyDictionary()


def get_backend(model: Any, attention_access: AccessMode = "auto") -> Backend:
    """The (cached) ``Backend`` of a model; pass a ``Backend`` through unchanged.

    While a backend is in use, the same object is returned for the same model and ``attention_access``; the probe
    and other measurements are kept per model for as long as the model lives.
    """
    if isinstance(model, Backend):
        return model
    check_choice("attention_access", attention_access, ACCESS_MODES)
    try:
        entry = _CACHE.get(model)
        if entry is None:
            entry = _CacheEntry(ModelFacts(), weakref.WeakValueDictionary())
            _CACHE[model] = entry
    except TypeError:  # not weakly referenceable or not hashable: no cache
        return Backend(model, attention_access)
    backend = entry.backends.get(attention_access)
    if backend is None:
        backend = Backend(model, attention_access, facts=entry.facts)
        entry.backends[attention_access] = backend
    return backend


__all__ = ["ACCESS_MODES", "AccessMode", "Backend", "ModelFacts", "ModelKind", "backend_class", "get_backend",
           "model_kind"]
