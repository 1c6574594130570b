"""``AttentionAttribution``: AttAttr, integrated gradients over attention patterns, as a Captum attribution class.

Hao, Dong, Wei, Xu (AAAI 2021), "Self-Attention Attribution: Interpreting Information Interactions Inside
Transformer". For one layer ``l`` at a time, ``Attr(A_l) = A_l ⊙ ∫₀¹ ∂F(α·A_l)/∂A_l dα``: the layer's post-softmax
attention (all heads together) is replaced by ``α·A_l`` while every other layer runs as usual, and the gradients are
integrated from the zero-attention baseline to the model's own attention by Captum's ``IntegratedGradients``.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from captum.attr import GradientAttribution, IntegratedGradients
from jaxtyping import Float, Int
from torch import Tensor

from at2_lens.attattr._utils import (
    IGNORE_INDEX,
    AttAttrResult,
    ForwardOutput,
    OutputFunc,
    OutputKind,
    as_layer_list,
    check_internal_batch_size,
    check_method,
    check_n_steps,
    check_output,
    format_additional_args,
    hook_fires_from,
    labels_objective,
    last_real_positions,
    normalise_target,
    output_index_from_target,
    resolve_hook_names,
    row_labels_from_target,
    select_output,
)
from at2_lens.attattr.memory import chunk_rows, parse_memory_budget, step_bytes
from at2_lens.backends import Backend, get_backend
from at2_lens.errors import InputError, NumericalError
from at2_lens.interventions import FwdHook, replace_pattern


def _check_not_ragged(inputs: object) -> None:
    """A list of token sequences of different lengths gets a clear error (pad them and pass ``attention_mask``)."""
    if isinstance(inputs, Tensor) or not isinstance(inputs, list | tuple) or not inputs:
        return
    lengths = [len(row) if isinstance(row, Sequence | Tensor) else None for row in inputs]
    if None not in lengths and len(set(lengths)) > 1:
        raise InputError(
            f"inputs: examples differ in length ({lengths}); pad them into one [batch, pos] tensor and pass "
            "attention_mask (1 = real token, 0 = padding)"
        )


class AttentionAttribution(GradientAttribution):
    r"""Self-attention attribution (AttAttr): integrated gradients of F with respect to each layer's attention.

    Hao, Dong, Wei, Xu (2021), "Self-Attention Attribution: Interpreting Information Interactions Inside
    Transformer", AAAI. https://arxiv.org/abs/2004.11207

    For layer ``l`` with attention ``A_l`` ``[head, query, key]``, the attribution is
    ``A_l ⊙ ∫₀¹ ∂F(α·A_l)/∂A_l dα``, computed by Captum's ``IntegratedGradients`` on a function of the pattern
    that injects it at ``blocks.{l}.attn.hook_pattern`` (or through ``hook_z`` where the model drops pattern
    edits; ``Backend`` decides). Baseline: zero attention at layer ``l`` only. By completeness, the attributions
    of a layer sum to ``F(A) − F(A_l = 0)``.

    What F is:

    - Decoders, no ``output_func``: the log-probability (or probability, ``output="prob"``) of the target
      token(s); see ``attribute``'s ``target``.
    - Encoders with an MLM head, no ``output_func``: the log-probability of labelled tokens (labels as target).
    - Any model, with ``output_func(out, inputs, *additional_forward_args)``: ``out`` is a ``ForwardOutput``
      holding the logits and the activations of ``output_hooks`` (default ``output_func.hook_names``), gradients
      attached. It returns ``[batch]`` (F itself) or ``[batch, n]`` (``target`` picks a column, default the
      predicted one). E.g. a sentiment classifier on the mean-pooled final hidden state of MiniLM:
      ``AttentionAttribution(model, PooledOutput(classifier))``.

    Args:
        forward_func: a TransformerLens ``HookedTransformer``/``HookedEncoder`` (TL 3.9), a ``TransformerBridge``,
            or a ``Backend`` (e.g. ``Backend(model, attention_access="z")`` to force the ``hook_z`` route).
        output_func: optional scalar readout, see above.
        output_hooks: hook names (or ``"final_hidden"``) whose activations ``output_func`` reads.
        output: ``"log_prob"`` (default) or ``"prob"``; only used without ``output_func``.
        shortcuts: skip work that cannot change F (default True; False runs the full model every time, for
            checking). (1) On a ``HookedTransformer``, each forward starts at layer ``l`` from the cached
            ``blocks.{l}.hook_resid_pre``: the layers below do not depend on ``A_l``. (2) Without
            ``output_func`` on a decoder, only the logits rows F reads are unembedded (``HookedTransformer``:
            its ``unembed`` on those rows; bridges whose Hugging Face model takes ``logits_to_keep``). Both are
            checked against the full computation at run time and give the same numbers up to float rounding.
    """

    def __init__(
        self,
        forward_func: Any,
        output_func: OutputFunc | None = None,
        *,
        output_hooks: Sequence[str] | None = None,
        output: OutputKind = "log_prob",
        shortcuts: bool = True,
    ) -> None:
        backend = get_backend(forward_func)
        super().__init__(backend.model)
        self.backend: Backend = backend
        _ = backend.attention_access  # fails now, with the reason, if attention cannot be intervened on
        if output_func is not None and not callable(output_func):
            raise InputError(f"output_func: expected a callable or None, got {type(output_func).__name__}")
        if output_hooks is None:
            output_hooks = tuple(getattr(output_func, "hook_names", ()))
        elif isinstance(output_hooks, str):
            output_hooks = (output_hooks,)
        self.output_func = output_func
        self.output_hooks: dict[str, str] = resolve_hook_names(backend, output_hooks)
        self.output: OutputKind = check_output(output)
        self.shortcuts = bool(shortcuts)
        self._keep_ok: bool | None = None  # whether the bridge's logits_to_keep was checked to work

    # ------------------------------------------------------------------------------------------- captum contract
    def has_convergence_delta(self) -> bool:
        return True

    @property
    def multiplies_by_inputs(self) -> bool:
        return True

    def compute_convergence_delta(self, *args: Any, **kwargs: Any) -> Tensor:  # type: ignore[override]
        """Not available separately: F is defined per layer; use ``attribute(..., return_convergence_delta=True)``."""
        raise NotImplementedError(
            "AttentionAttribution: use attribute(..., return_convergence_delta=True); the delta is per layer"
        )

    @property
    def starts_at_layer(self) -> bool:
        """Whether forwards start at the attributed layer (skipping the layers below) on this model."""
        cfg = self.backend.model.cfg
        return (
            self.shortcuts
            and self.backend.kind == "hooked_transformer"
            and getattr(cfg, "positional_embedding_type", "") != "shortformer"
        )

    @property
    def unembeds_read_rows_only(self) -> bool:
        """Whether only the logits rows F reads are computed (decoder targets without ``output_func``)."""
        return self._rows_mode() is not None

    # ---------------------------------------------------------------------------------------------------- public
    def attribute(  # type: ignore[override]
        self,
        inputs: Int[Tensor, "batch pos"] | Int[Tensor, " pos"],
        target: Any = None,
        additional_forward_args: Any = None,
        *,
        layers: int | Sequence[int] | None = None,
        n_steps: int = 20,
        method: str = "gausslegendre",
        internal_batch_size: int | None = None,
        memory_budget: int | str | None = None,
        attention_mask: Int[Tensor, "batch pos"] | Int[Tensor, " pos"] | None = None,
        return_convergence_delta: bool = False,
    ) -> AttAttrResult:
        """Attribute F to the attention of each layer in ``layers``, one layer at a time.

        Args:
            inputs: token ids ``[batch, pos]`` or ``[pos]``.
            target: what F reads.
                Without ``output_func`` on a decoder (positions are token positions; the token at position ``j``
                is predicted from positions ``< j``):
                ``None``: the model's predicted next token after the last real token of each row;
                an ``int``: that token id as the next token;
                a ``[batch]`` tensor/list (2-D inputs only): one next-token id per row;
                labels shaped like ``inputs`` (``[batch, pos]``, or ``[pos]`` for 1-D inputs), optionally with
                one extra column for the token after the input: every position not ``-100`` is a target token
                and F sums their log-probabilities (e.g. ``inputs = prompt + response`` and labels ``-100`` on
                the prompt and the response ids on the response).
                Without ``output_func`` on an encoder: labels shaped like ``inputs``, read without a shift (the
                token at position ``i`` from logits row ``i``, masked-LM style).
                With an ``output_func`` returning ``[batch, n]``: a column index, one per row, or None (the
                predicted column); for ``[batch]`` outputs it must be None.
            additional_forward_args: passed to ``output_func`` after ``inputs`` (tensors are expanded per
                integration step along their first axis, as in Captum).
            layers: a layer index or indices to attribute (default all).
            n_steps: integration points per layer. 20 Gauss-Legendre points keep the completeness error under
                0.1 % on most layers, but the first layers of real models can need 100+ (SmolLM2 layer 0: 5-25 %
                at 20 points, 0.07 % at 128): check ``return_convergence_delta``.
            method: Captum's ``"gausslegendre"`` (default), ``"riemann_right"``, ``"riemann_left"``,
                ``"riemann_middle"`` or ``"riemann_trapezoid"``.
            internal_batch_size: at most this many rows per forward pass (examples × steps), to bound memory.
            memory_budget: instead of ``internal_batch_size``, the memory the integration steps may use, in bytes or
                as a string (``"2GB"``, ``"512MiB"``): each layer's steps are chunked so that a chunk's estimated
                activations fit (see ``at2_lens.attattr.memory``; weights and the clean pass are not counted).
                Chunking changes only the order of float sums. A budget too small for one step is an InputError.
            attention_mask: ``[batch, pos]``, 1 for real tokens, 0 for padding.
            return_convergence_delta: also compute, per layer, ``Σ attributions − (F(A) − F(A_l = 0))`` (one extra
                forward per layer).

        Returns:
            an ``AttAttrResult``: ``.attributions`` ``[layer, head, query, key]`` for one example (``[batch, layer,
            head, query, key]`` for several), ``.by_hook_name()``, ``.head_importance()``, ``.convergence_delta``.
        """
        backend = self.backend
        method = check_method(method)
        n_steps = check_n_steps(n_steps, method)
        internal_batch_size = check_internal_batch_size(internal_batch_size)
        if memory_budget is not None and internal_batch_size is not None:
            raise InputError("memory_budget: give either memory_budget or internal_batch_size, not both")
        budget = parse_memory_budget(memory_budget) if memory_budget is not None else None
        layer_list = backend.check_layers(as_layer_list(layers))
        _check_not_ragged(inputs)
        inputs_1d = isinstance(inputs, Tensor) and inputs.dim() == 1
        tokens = backend.check_tokens(inputs, name="inputs").to(backend.device)
        mask = self._check_mask(attention_mask, tokens.shape)
        if mask is None:
            self._check_unmasked_padding(tokens)
        n_rows, n_pos = tokens.shape
        tgt = normalise_target(target)
        extra = format_additional_args(additional_forward_args)
        causal = backend.is_causal

        # Everything that can be checked without a forward pass is checked here.
        labels: Tensor | None = None
        if self.output_func is None and (tgt is not None or not causal):
            labels = row_labels_from_target(
                tgt, n_rows=n_rows, n_pos=n_pos, inputs_1d=inputs_1d, causal=causal, d_vocab=backend.d_vocab,
                attention_mask=mask,
            )
        if self.output_func is not None and tgt is not None and (
            tgt.dim() > 1 or (tgt.dim() == 1 and tgt.shape[0] != n_rows)
        ):
            raise InputError(f"target: expected None, an output index or one index per row ({n_rows}), "
                             f"got shape {tuple(tgt.shape)}")

        start = {
            layer: self.starts_at_layer
            and layer > 0
            and all(hook_fires_from(name, backend.n_layers) >= layer for name in self.output_hooks.values())
            for layer in layer_list
        }
        start_layers = [lyr for lyr in layer_list if start[lyr]]
        rows = self._read_rows(labels, mask, n_rows, n_pos) if self.output_func is None and causal else None
        mode = self._rows_mode() if rows is not None else None
        chunks = {layer: internal_batch_size for layer in layer_list}
        if budget is not None:  # checked here, before the clean pass: a too-small budget fails before any work
            logit_rows = len(rows) if (mode is not None and rows is not None) else n_pos
            chunks = {layer: self._chunk_rows(budget, n_rows, n_pos, n_steps, layer, start[layer], logit_rows)
                      for layer in layer_list}
        patterns, resids, clean_out, final = self._clean_pass(tokens, mask, layer_list, start_layers, mode == "hooked")
        for layer, pattern in patterns.items():
            if not bool(torch.isfinite(pattern).all()):
                raise NumericalError(
                    f"attention of layer {layer} holds NaN or inf (e.g. a row whose every key is masked); "
                    "refusing to integrate gradients over it"
                )

        # Resolve F's selector now that the unmodified output is known.
        if self.output_func is None:
            if labels is None:
                logits = clean_out.logits
                last = last_real_positions(n_rows, n_pos, mask)
                predicted = logits[torch.arange(n_rows), last.to(logits.device)].argmax(dim=-1)
                labels = row_labels_from_target(
                    None, n_rows=n_rows, n_pos=n_pos, inputs_1d=inputs_1d, causal=causal,
                    d_vocab=backend.d_vocab, attention_mask=mask, predicted=lambda: predicted,
                )
            selector: Tensor | None = labels.to(backend.device)
        else:
            with torch.no_grad():
                raw = self.output_func(clean_out, tokens, *extra)
            if not isinstance(raw, Tensor) or raw.shape[:1] != (n_rows,):
                raise InputError(f"output_func: expected a tensor with one row per input ({n_rows}), got "
                                 f"{tuple(raw.shape) if isinstance(raw, Tensor) else type(raw).__name__}")
            index = output_index_from_target(tgt, raw)
            selector = index.to(backend.device) if index is not None else None
        with torch.no_grad():
            f_full = self._objective(clean_out, tokens, selector, extra).detach()
        if not bool(torch.isfinite(f_full).all()):
            raise NumericalError(f"output: F of the unmodified model is not finite ({f_full.tolist()})")
        if mode == "hooked" and rows is not None and final is not None:
            # The rows-only unembedding must reproduce the model's own logits (catches soft caps and the like).
            own = clean_out.logits[:, rows.to(clean_out.logits.device)]
            with torch.no_grad():
                mine = backend.model.unembed(final[:, rows.to(final.device)])
            if mine.shape != own.shape or not torch.allclose(mine, own, rtol=1e-4, atol=1e-4 * float(own.abs().max())):
                mode = None

        tl_mask = self._start_mask(tokens, mask) if start_layers else None
        attrs: list[Tensor] = []
        deltas: list[Tensor] = []
        baselines: list[Tensor] = []
        for layer in layer_list:
            forward = self._layer_forward(layer, mode, rows)
            args = (tokens, mask, tl_mask, resids.get(layer), selector, *extra)
            ig = IntegratedGradients(forward)
            attr = ig.attribute(
                patterns[layer], additional_forward_args=args, n_steps=n_steps, method=method,
                internal_batch_size=chunks[layer],
            )
            if not bool(torch.isfinite(attr).all()):
                raise NumericalError(f"attributions of layer {layer} hold NaN or inf; refusing to return them")
            attrs.append(attr.detach())
            if return_convergence_delta:
                with torch.no_grad():
                    f_zero = forward(torch.zeros_like(patterns[layer]), *args).detach()
                baselines.append(f_zero)
                deltas.append(attr.detach().sum(dim=(1, 2, 3)).to(f_full.dtype) - (f_full - f_zero))

        attributions = torch.stack(attrs, dim=1)  # [batch, layer, head, q, k]
        delta = torch.stack(deltas, dim=1) if deltas else None
        base = torch.stack(baselines, dim=1) if baselines else None
        single = n_rows == 1
        return AttAttrResult(
            attributions=attributions[0] if single else attributions,
            layers=tuple(layer_list),
            output=f_full[0] if single else f_full,
            convergence_delta=delta[0] if (single and delta is not None) else delta,
            baseline_output=base[0] if (single and base is not None) else base,
            attention_mask=mask,
            method=method,
            n_steps=n_steps,
        )

    def internal_batch_size_for(
        self, n_pos: int, memory_budget: int | str, *, n_steps: int = 20, n_rows: int = 1, layer: int = 0
    ) -> int | None:
        """The ``internal_batch_size`` that ``attribute(..., memory_budget=...)`` picks for ``layer`` (None: all
        steps in one chunk), assuming the full logits are computed. InputError if one step does not fit."""
        budget = parse_memory_budget(memory_budget)
        for name, value in (("n_pos", n_pos), ("n_rows", n_rows)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name}: expected an integer >= 1, got {value!r}")
        layer = self.backend.check_layers([layer])[0]
        n_steps = check_n_steps(n_steps, "gausslegendre")
        return self._chunk_rows(budget, n_rows, n_pos, n_steps, layer, self.starts_at_layer and layer > 0, n_pos)

    # --------------------------------------------------------------------------------------------------- internals
    def _chunk_rows(
        self, budget: int, n_rows: int, n_pos: int, n_steps: int, layer: int, starts_here: bool, logit_rows: int
    ) -> int | None:
        """Rows per integration chunk of ``layer`` within ``budget`` bytes (see ``at2_lens.attattr.memory``)."""
        b = self.backend
        cfg = b.model.cfg
        d_mlp = getattr(cfg, "d_mlp", None) or 4 * b.d_model
        per_step = step_bytes(
            n_pos=n_pos, n_layers=b.n_layers - layer if starts_here else b.n_layers, n_heads=b.n_heads,
            d_model=b.d_model, d_mlp=int(d_mlp), d_vocab=b.d_vocab, logit_rows=logit_rows,
        )
        return chunk_rows(budget, per_step, n_rows, n_steps)

    def _check_unmasked_padding(self, tokens: Tensor) -> None:
        """Refuse a padded batch given without ``attention_mask``: rows whose runs of pad tokens at the end (or the
        start) differ in length are examples of different lengths, and the padding would be attended to."""
        if tokens.shape[0] < 2:
            return
        pad = getattr(getattr(self.backend.model, "tokenizer", None), "pad_token_id", None)
        if not isinstance(pad, int) or isinstance(pad, bool):
            return
        is_pad = (tokens == pad).cpu()
        # length of the run of pad tokens at the end / the start of each row
        trailing = is_pad.flip(1).long().cumprod(dim=1).sum(dim=1)
        leading = is_pad.long().cumprod(dim=1).sum(dim=1)
        for side, runs in (("end", trailing), ("start", leading)):
            if bool((runs != runs[0]).any()):
                raise InputError(
                    f"attention_mask: the rows of inputs have different numbers of pad tokens (id {pad}) at the "
                    f"{side} ({runs.tolist()}): examples of different lengths need an attention_mask (1 = real "
                    "token, 0 = padding); if those tokens are real, pass attention_mask=torch.ones_like(inputs)"
                )

    def _check_mask(self, attention_mask: object, shape: torch.Size) -> Tensor | None:
        if attention_mask is None:
            return None
        if not isinstance(attention_mask, Tensor) or attention_mask.is_floating_point():
            raise InputError("attention_mask: expected an integer or bool tensor of 0/1, shaped like the inputs")
        if attention_mask.dim() == 1:
            attention_mask = attention_mask[None]
        if attention_mask.shape != shape:
            raise InputError(f"attention_mask: expected shape {tuple(shape)} (like the inputs), "
                             f"got {tuple(attention_mask.shape)}")
        if bool(((attention_mask != 0) & (attention_mask != 1)).any()):
            raise InputError("attention_mask: expected only 0 (padding) and 1 (real token)")
        if not bool(attention_mask.bool().any(dim=1).all()):
            raise InputError("attention_mask: every row needs at least one real token")
        return attention_mask.long().to(self.backend.device)

    def _capture_hooks(self, store: dict[str, Tensor]) -> list[FwdHook]:
        hooks: list[FwdHook] = []
        for alias, name in self.output_hooks.items():
            def hook(x: Tensor, hook: Any, alias: str = alias) -> None:
                store[alias] = x

            hooks.append((name, hook))
        return hooks

    # ------------------------------------------------------------------------------- rows-only unembedding
    def _read_rows(self, labels: Tensor | None, mask: Tensor | None, n_rows: int, n_pos: int) -> Tensor:
        """The logits rows (positions) F reads: each row's last real token, or the labelled rows."""
        if labels is None:
            return torch.unique(last_real_positions(n_rows, n_pos, mask))
        return (labels != IGNORE_INDEX).any(dim=0).nonzero().squeeze(-1)

    def _rows_mode(self) -> str | None:
        """How only some logits rows can be computed on this model: ``"hooked"``, ``"keep"`` or None."""
        backend = self.backend
        if not self.shortcuts or self.output_func is not None or not backend.is_causal:
            return None
        # Both routes below call the model directly; that is safe only where interventions need no padding mask.
        if backend.attention_access != "pattern" and backend.probe.z_route != "pattern":
            return None
        if backend.kind == "hooked_transformer":
            return "hooked"
        if backend.kind == "bridge":
            if self._keep_ok is None:
                self._keep_ok = self._check_logits_to_keep()
            return "keep" if self._keep_ok else None
        return None

    @torch.no_grad()
    def _check_logits_to_keep(self) -> bool:
        """Whether the bridge's Hugging Face model honours ``logits_to_keep`` (checked once on six tokens)."""
        hf = getattr(self.backend.model, "original_model", None)
        try:
            if hf is None or "logits_to_keep" not in inspect.signature(hf.forward).parameters:
                return False
            tokens = torch.linspace(1, self.backend.d_vocab - 1, 6).long()[None].to(self.backend.device)
            rows = torch.tensor([1, 5], device=self.backend.device)
            full = self.backend.model(tokens, return_type="logits")[:, rows]
            kept = self.backend.model(tokens, return_type="logits", logits_to_keep=rows)
        except (TypeError, ValueError, RuntimeError):
            return False
        return kept.shape == full.shape and bool(torch.allclose(kept, full, rtol=1e-4, atol=1e-5))

    def _final_module(self) -> torch.nn.Module:
        """The ``HookedTransformer`` module whose output is the unembedding's input."""
        model = self.backend.model
        return model.ln_final if model.cfg.normalization_type is not None else model.blocks[-1]

    # ----------------------------------------------------------------------------------------------- passes
    @torch.no_grad()
    def _clean_pass(
        self, tokens: Tensor, mask: Tensor | None, layers: list[int], start_layers: list[int], keep_final: bool
    ) -> tuple[dict[int, Tensor], dict[int, Tensor], ForwardOutput, Tensor | None]:
        """One unmodified forward: each layer's pattern, the residuals to start from, the output F reads, and
        (``keep_final``) the unembedding's input."""
        patterns: dict[int, Tensor] = {}
        resids: dict[int, Tensor] = {}
        captured: dict[str, Tensor] = {}
        final: dict[str, Tensor] = {}

        def keep(store: dict[int, Tensor], layer: int) -> Any:
            def hook(x: Tensor, hook: Any) -> None:
                store[layer] = x.detach().clone()

            return hook

        hooks: list[FwdHook] = [(self.backend.pattern_hook(lyr), keep(patterns, lyr)) for lyr in layers]
        hooks += [(self.backend.resid_pre_hook(lyr), keep(resids, lyr)) for lyr in start_layers]
        hooks += self._capture_hooks(captured)
        handle = (
            self._final_module().register_forward_hook(lambda m, i, out: final.__setitem__("x", out))
            if keep_final else None
        )
        try:
            logits = self.backend.run(tokens, hooks, mask)
        finally:
            if handle is not None:
                handle.remove()
        missing = [lyr for lyr in layers if lyr not in patterns]
        if missing:
            raise RuntimeError(f"{self.backend.describe()}: hook_pattern did not fire for layers {missing}")
        return patterns, resids, ForwardOutput(logits, captured, mask), final.get("x")

    def _start_mask(self, tokens: Tensor, mask: Tensor | None) -> Tensor | None:
        """The attention mask ``HookedTransformer`` derives for these tokens (it is not derived when starting late)."""
        with torch.no_grad():
            return self.backend.model.input_to_embed(tokens, attention_mask=mask)[3]

    def _objective(self, out: ForwardOutput, tokens: Tensor, selector: Tensor | None, extra: tuple[Any, ...]) -> Tensor:
        if self.output_func is None:
            assert selector is not None
            return labels_objective(out.logits, selector, self.output)
        return select_output(self.output_func(out, tokens, *extra), selector)

    def _layer_forward(self, layer: int, mode: str | None, rows: Tensor | None) -> Any:
        """F as a function of layer ``layer``'s pattern (Captum's ``forward_func``); other arguments come expanded.

        ``mode``/``rows``: compute only these logits rows (see ``_rows_mode``); the selector is cut to match.
        """
        backend = self.backend
        model = backend.model

        def forward(
            pattern: Float[Tensor, "batch head query key"],
            tokens: Tensor,
            mask: Tensor | None,
            tl_mask: Tensor | None,
            resid: Tensor | None,
            selector: Tensor | None,
            *extra: Any,
        ) -> Tensor:
            captured: dict[str, Tensor] = {}
            hooks = backend.pattern_hooks(layer, replace_pattern(pattern)) + self._capture_hooks(captured)
            start: dict[str, Any] = {} if resid is None else {"start_at_layer": layer}
            first = tokens if resid is None else resid
            run_mask = mask if resid is None else tl_mask
            if mode == "hooked":
                assert rows is not None and selector is not None
                final: dict[str, Tensor] = {}
                handle = self._final_module().register_forward_hook(lambda m, i, out: final.__setitem__("x", out))
                try:
                    model.run_with_hooks(first, fwd_hooks=hooks, return_type=None, attention_mask=run_mask, **start)
                finally:
                    handle.remove()
                logits = model.unembed(final["x"][:, rows.to(final["x"].device)])
                return labels_objective(logits, selector[:, rows.to(selector.device)], self.output)
            if mode == "keep":
                assert rows is not None and selector is not None
                keep_rows = rows.to(tokens.device)
                logits = model.run_with_hooks(
                    tokens, fwd_hooks=hooks, return_type="logits", attention_mask=mask, logits_to_keep=keep_rows
                )
                return labels_objective(logits, selector[:, keep_rows], self.output)
            if resid is None:
                logits = backend.run(tokens, hooks, mask)
            else:
                logits = model.run_with_hooks(resid, fwd_hooks=hooks, return_type="logits", attention_mask=tl_mask,
                                              **start)
            return self._objective(ForwardOutput(logits, captured, mask), tokens, selector, extra)

        return forward
