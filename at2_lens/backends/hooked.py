"""Backends for TransformerLens's own model classes, ``HookedTransformer`` and ``HookedEncoder`` (TL 3.x only).

``HookedTransformer`` allows two shortcuts the other classes do not: a forward pass can start at any block from
that block's ``hook_resid_pre`` (``start_at_layer``), and its ``unembed`` can be applied to a few positions only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from at2_lens.backends import _tl, hook_names
from at2_lens.backends.backend import Backend, ModelKind
from at2_lens.interventions import FwdHook


class HookedTransformerBackend(Backend):
    """``HookedTransformer``: decoders (and any model TransformerLens builds natively)."""

    kind: ModelKind = "hooked_transformer"

    @classmethod
    def model_class(cls) -> type[Any] | None:
        return _tl.hooked_transformer_class()

    def final_hidden_hook(self) -> str:
        return hook_names.final_normalized()

    # ------------------------------------------------------------------------------------------ start at a layer
    @property
    def can_start_at_layer(self) -> bool:
        # Shortformer models add positional embeddings to every block's input: the residual alone is not enough.
        return getattr(self.model.cfg, "positional_embedding_type", "") != "shortformer"

    @torch.no_grad()
    def start_mask(self, tokens: Tensor, attention_mask: Tensor | None) -> Tensor | None:
        # HookedTransformer derives its attention mask at the embedding, which a late start skips.
        return self.model.input_to_embed(tokens, attention_mask=attention_mask)[3]

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
        self._active_mask = attention_mask
        try:
            if rows is not None:
                return self._unembedded_rows(resid, rows, fwd_hooks, start_mask, start_at_layer=layer)
            return self.model.run_with_hooks(resid, fwd_hooks=list(fwd_hooks), return_type="logits",
                                             attention_mask=start_mask, start_at_layer=layer)
        finally:
            self._active_mask = None

    # ------------------------------------------------------------------------------------------ some logits rows
    @property
    def rows_route(self) -> str | None:
        return "unembed" if self._edits_need_no_mask() else None

    def _final_module(self) -> torch.nn.Module:
        """The module whose output is the unembedding's input."""
        model = self.model
        return model.ln_final if model.cfg.normalization_type is not None else model.blocks[-1]

    def _unembedded_rows(
        self, first: Tensor, rows: Tensor, fwd_hooks: Sequence[FwdHook], mask: Tensor | None, **start: Any
    ) -> Tensor:
        """Run the blocks (``return_type=None``) and unembed only the positions ``rows``."""
        final: dict[str, Tensor] = {}
        handle = self._final_module().register_forward_hook(lambda m, i, out: final.__setitem__("x", out))
        try:
            self.model.run_with_hooks(first, fwd_hooks=list(fwd_hooks), return_type=None, attention_mask=mask,
                                      **start)
        finally:
            handle.remove()
        return self.model.unembed(final["x"][:, rows.to(final["x"].device)])

    def run_rows(
        self,
        tokens: Int[Tensor, "batch pos"],
        rows: Int[Tensor, " rows"],
        fwd_hooks: Sequence[FwdHook] = (),
        attention_mask: Int[Tensor, "batch pos"] | None = None,
    ) -> Tensor:
        self._active_mask = attention_mask
        try:
            return self._unembedded_rows(tokens, rows, fwd_hooks, attention_mask)
        finally:
            self._active_mask = None

    def run_checking_rows(
        self,
        tokens: Int[Tensor, "batch pos"],
        rows: Int[Tensor, " rows"],
        fwd_hooks: Sequence[FwdHook] = (),
        attention_mask: Int[Tensor, "batch pos"] | None = None,
    ) -> tuple[Tensor, bool]:
        final: dict[str, Tensor] = {}
        handle = self._final_module().register_forward_hook(lambda m, i, out: final.__setitem__("x", out))
        try:
            logits = self.run(tokens, fwd_hooks, attention_mask)
        finally:
            handle.remove()
        if "x" not in final:
            return logits, False
        # The rows-only unembedding must reproduce the model's own logits (catches soft caps and the like).
        own = logits[:, rows.to(logits.device)]
        with torch.no_grad():
            mine = self.model.unembed(final["x"][:, rows.to(final["x"].device)])
        same = mine.shape == own.shape and bool(
            torch.allclose(mine, own, rtol=1e-4, atol=1e-4 * float(own.abs().max()))
        )
        return logits, same

    # ---------------------------------------------------------------------------------------------- generation
    def _generate_ids(self, ids: Tensor, limit: int, eos: int | None, *, use_cache: bool) -> Tensor:
        return self.model.generate(  # type: ignore[no-any-return]
            ids, max_new_tokens=limit, do_sample=False, stop_at_eos=eos is not None, eos_token_id=eos,
            verbose=False, return_type="tokens", use_past_kv_cache=use_cache,
        )


class HookedEncoderBackend(Backend):
    """``HookedEncoder``: BERT-type encoders built by TransformerLens."""

    kind: ModelKind = "hooked_encoder"

    @classmethod
    def model_class(cls) -> type[Any] | None:
        return _tl.hooked_encoder_class()

    def final_hidden_hook(self) -> str:
        # BERT blocks are post-LayerNorm: ``hook_resid_post`` is the residual before the block's second LayerNorm.
        return hook_names.normalized_resid_post(self.n_layers - 1)

    def _mask_kwargs(self, attention_mask: Tensor | None) -> dict[str, Any]:
        return {} if attention_mask is None else {"one_zero_attention_mask": attention_mask.to(self.device)}


__all__ = ["HookedEncoderBackend", "HookedTransformerBackend"]
