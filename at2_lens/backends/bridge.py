"""Backend for ``TransformerBridge`` (TransformerLens 3.9 and 4.x): TransformerLens hooks around a Hugging Face model.

A bridge can be a decoder or an encoder; which one is measured by the probe. Generation and the rows-only logits
(``logits_to_keep``) go through the wrapped Hugging Face model.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from at2_lens.backends import _tl, hook_names
from at2_lens.backends.backend import Backend, ModelKind
from at2_lens.interventions import FwdHook

_KEEP_CHECKED = "logits_to_keep"


class BridgeBackend(Backend):
    """``TransformerBridge`` over a Hugging Face decoder or encoder."""

    kind: ModelKind = "bridge"

    @classmethod
    def model_class(cls) -> type[Any] | None:
        return _tl.bridge_class()

    @property
    def architecture(self) -> str:
        arch = getattr(self.model.cfg, "original_architecture", None)
        if not arch:
            original = getattr(self.model, "original_model", None)
            arch = type(original).__name__ if original is not None else None
        return str(arch or type(self.model).__name__)

    def final_hidden_hook(self) -> str:
        if self.is_causal:
            return hook_names.final_normalized()
        # BERT bridges: the Hugging Face layer's output (``hook_normalized_resid_post`` does not fire there on TL 3.9
        # and does not exist on 4.x).
        return hook_names.resid_post(self.n_layers - 1)

    # ------------------------------------------------------------------------------------------ some logits rows
    @property
    def rows_route(self) -> str | None:
        return "logits_to_keep" if self._edits_need_no_mask() and self.honours_logits_to_keep else None

    @property
    def honours_logits_to_keep(self) -> bool:
        """Whether the wrapped Hugging Face model honours ``logits_to_keep`` (checked once on six tokens)."""
        ok = self.facts.extra.get(_KEEP_CHECKED)
        if ok is None:
            ok = self.facts.extra[_KEEP_CHECKED] = self._check_logits_to_keep()
        return bool(ok)

    @torch.no_grad()
    def _check_logits_to_keep(self) -> bool:
        hf = getattr(self.model, "original_model", None)
        try:
            if hf is None or "logits_to_keep" not in inspect.signature(hf.forward).parameters:
                return False
            tokens = torch.linspace(1, self.d_vocab - 1, 6).long()[None].to(self.device)
            rows = torch.tensor([1, 5], device=self.device)
            full = self.model(tokens, return_type="logits")[:, rows]
            kept = self.model(tokens, return_type="logits", logits_to_keep=rows)
        except (TypeError, ValueError, RuntimeError):
            return False
        return kept.shape == full.shape and bool(torch.allclose(kept, full, rtol=1e-4, atol=1e-5))

    def run_rows(
        self,
        tokens: Int[Tensor, "batch pos"],
        rows: Int[Tensor, " rows"],
        fwd_hooks: Sequence[FwdHook] = (),
        attention_mask: Int[Tensor, "batch pos"] | None = None,
    ) -> Tensor:
        if self.rows_route is None:
            return super().run_rows(tokens, rows, fwd_hooks, attention_mask)
        tokens = tokens.to(self.device)
        self._active_mask = attention_mask
        try:
            return self.model.run_with_hooks(  # type: ignore[no-any-return]
                tokens, fwd_hooks=list(fwd_hooks), return_type="logits", attention_mask=attention_mask,
                logits_to_keep=rows.to(tokens.device),
            )
        finally:
            self._active_mask = None

    # ---------------------------------------------------------------------------------------------- generation
    def _generate_ids(self, ids: Tensor, limit: int, eos: int | None, *, use_cache: bool) -> Tensor:
        return self.model.original_model.generate(  # type: ignore[no-any-return]
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=limit, do_sample=False, use_cache=use_cache,
            eos_token_id=eos, pad_token_id=eos if eos is not None else 0,
        )


__all__ = ["BridgeBackend"]
