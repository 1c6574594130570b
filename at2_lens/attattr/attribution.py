"""``SelfAttentionAttribution`` (AttAttr): integrated gradients over attention patterns, as a Captum attribution class.

Hao, Dong, Wei, Xu (AAAI 2021), "Self-Attention Attribution: Interpreting Information Interactions Inside
Transformer". For one layer ``l`` at a time, ``Attr(A_l) = A_l ⊙ ∫₀¹ ∂F(α·A_l)/∂A_l dα``: the layer's post-softmax
attention (all heads together) is replaced by ``α·A_l`` while every other layer runs as usual, and the gradients are
integrated from the zero-attention baseline to the model's own attention by Captum's ``IntegratedGradients``.

Laid out as Captum's ``attr/_core`` classes are: the public ``attribute`` checks and formats (``_check_call`` turns
its arguments into a ``_Call``, refusing bad input before any forward pass; the result is shaped at the end), and
private steps hold the algorithm (``_clean_pass``, ``_selector``, ``_integrate_layer``). The class subclasses
Captum's ``Attribution``, as Captum's own ``LLMAttribution`` does, rather than ``GradientAttribution``: it returns
an ``AttAttrResult`` (per-layer attributions, completeness deltas and baselines) rather than the
``(attributions, delta)`` tuple ``GradientAttribution`` promises.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from captum.attr import Attribution, IntegratedGradients
from jaxtyping import Float, Int
from torch import Tensor

from at2_lens._validate import check_choice, check_int, check_optional_int, check_positive
from at2_lens.attattr import quadrature
from at2_lens.attattr.memory import chunk_rows, parse_memory_budget, step_bytes
from at2_lens.attattr.readouts import ForwardOutput, OutputFunc, resolve_hook_names
from at2_lens.attattr.result import AttAttrResult
from at2_lens.attattr.targets import (
    IGNORE_INDEX,
    OUTPUT_KINDS,
    OutputKind,
    labels_objective,
    normalise_target,
    output_index_from_target,
    row_labels_from_target,
    select_output,
)
from at2_lens.backends import Backend, get_backend, hook_names
from at2_lens.errors import InputError, NumericalError
from at2_lens.interventions import FwdHook, replace_pattern
from at2_lens.models.pooling import last_real_positions

METHODS: tuple[str, ...] = ("gausslegendre", "riemann_right", "riemann_left", "riemann_middle", "riemann_trapezoid")
"""Captum's integral approximations (integer ``n_steps``)."""

AUTO_METHODS: tuple[str, ...] = quadrature.RULES
"""The rule families of ``n_steps="auto"`` (see ``at2_lens.attattr.quadrature``); the first is its default."""

DEFAULT_RTOL = 1e-3
"""``n_steps="auto"``: relative completeness tolerance per layer."""
DEFAULT_ATOL = 1e-5
"""``n_steps="auto"``: absolute completeness tolerance per layer, in F's units (log-probability by default). It keeps
a layer whose attention barely changes F (``|F(A) − F(A_l = 0)|`` near zero, where a relative error is float noise)
from running to the cap."""
DEFAULT_MAX_STEPS = 257
"""``n_steps="auto"``: at most this many gradient evaluations per layer (Clenshaw-Curtis: up to its 257-node rule)."""
AUTO_STEPS_PER_PASS = 20
"""``n_steps="auto"`` without ``internal_batch_size``/``memory_budget``: at most this many integration points per
forward pass (the memory of the former fixed default, 20 points in one pass), however large the rule."""
DECODER_DEFAULT_STEPS: Literal["auto"] = "auto"
ENCODER_DEFAULT_STEPS = 20
"""``n_steps=None`` (the default): ``"auto"`` on decoders, whose first layers need far more than 20 points, and 20
Gauss-Legendre points on encoders (completeness error <= 1e-3 on MiniLM-SST2 there)."""


# ------------------------------------------------------------------------------------------------ argument checks
def check_n_steps(n_steps: object, method: str) -> int:
    """Integration points: Captum's Riemann rules need at least two, Gauss-Legendre one."""
    try:
        return check_int("n_steps", n_steps, minimum=1 if method == "gausslegendre" else 2)
    except InputError as err:
        raise InputError(f"{err} (method={method!r}); or n_steps='auto'") from None


@dataclass(frozen=True)
class _Tolerance:
    """``n_steps="auto"``: stop a layer at the first rule with ``|Σ attr − (F(1) − F(0))| <= rtol·|F(1) − F(0)| +
    atol`` (every row), or at ``max_steps`` gradient evaluations."""

    rtol: float
    atol: float
    max_steps: int


def check_integration(
    n_steps: object, method: object, rtol: object, atol: object, max_steps: object, *, causal: bool
) -> tuple[int | Literal["auto"], str, _Tolerance | None]:
    """``(n_steps, method, tolerance)`` from ``attribute``'s integration arguments; tolerance is None for an integer
    ``n_steps``, which takes none of ``rtol``/``atol``/``max_steps``."""
    if n_steps is None:
        n_steps = DECODER_DEFAULT_STEPS if causal else ENCODER_DEFAULT_STEPS
    if isinstance(n_steps, str):
        if n_steps != "auto":
            raise InputError(f"n_steps: expected a positive integer or 'auto', got {n_steps!r}")
        rule = check_choice("method", AUTO_METHODS[0] if method is None else method, AUTO_METHODS)
        smallest = next(quadrature.family(rule, 10**9)).size
        tol = _Tolerance(
            rtol=check_positive("rtol", DEFAULT_RTOL if rtol is None else rtol),
            atol=check_positive("atol", DEFAULT_ATOL if atol is None else atol, allow_zero=True),
            max_steps=check_int("max_steps", DEFAULT_MAX_STEPS if max_steps is None else max_steps, minimum=smallest),
        )
        if tol.rtol >= 1:
            raise InputError(f"rtol: expected a number in (0, 1), got {rtol!r}")
        return "auto", rule, tol
    for name, value in (("rtol", rtol), ("atol", atol), ("max_steps", max_steps)):
        if value is not None:
            raise InputError(f"{name}: only used with n_steps='auto' (got n_steps={n_steps!r}); leave it None")
    rule = check_choice("method", "gausslegendre" if method is None else method, METHODS)
    return check_n_steps(n_steps, rule), rule, None


def as_layer_list(layers: int | Sequence[int] | None) -> Sequence[int] | None:
    """Accept a single layer index as well as a sequence (``Backend.check_layers`` validates the values)."""
    if layers is None or isinstance(layers, Sequence):
        return layers
    if isinstance(layers, int) and not isinstance(layers, bool):
        return [layers]
    if isinstance(layers, Tensor) and layers.dim() <= 1 and not layers.is_floating_point():
        return [int(x) for x in layers.reshape(-1)]
    raise InputError(f"layers: expected None, a layer index or a sequence of layer indices, got {layers!r}")


def format_additional_args(args: object) -> tuple[Any, ...]:
    """Captum's convention: None → (), a tuple stays, anything else becomes a 1-tuple."""
    if args is None:
        return ()
    return args if isinstance(args, tuple) else (args,)


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


@dataclass(frozen=True)
class _Call:
    """One ``attribute`` call, checked: everything the algorithm needs that is known before a forward pass."""

    tokens: Tensor  # [batch, pos] on the model's device
    mask: Tensor | None  # [batch, pos] 0/1 on the device, or None
    inputs_1d: bool
    target: Tensor | None  # normalised
    extra: tuple[Any, ...]  # additional_forward_args
    layers: list[int]
    n_steps: int | Literal["auto"]
    method: str
    tolerance: _Tolerance | None  # n_steps="auto" only
    labels: Tensor | None  # [batch, pos] labels, where they are known before the unmodified pass
    rows: Tensor | None  # the logits rows F reads (decoder targets without output_func), else None
    rows_only: bool  # whether only those rows are computed (may still be revoked by the unmodified pass)
    start: dict[int, bool]  # per layer: whether its forwards start at that block
    chunks: dict[int, int | None]  # per layer: Captum's internal_batch_size
    return_convergence_delta: bool

    @property
    def n_rows(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_pos(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def start_layers(self) -> list[int]:
        return [layer for layer in self.layers if self.start[layer]]


class SelfAttentionAttribution(Attribution):
    r"""Self-attention attribution (AttAttr): integrated gradients of F with respect to each layer's attention.

    Hao, Dong, Wei, Xu (2021), "Self-Attention Attribution: Interpreting Information Interactions Inside
    Transformer", AAAI. https://arxiv.org/abs/2004.11207

    For layer ``l`` with attention ``A_l`` ``[head, query, key]``, the attribution is
    ``A_l ⊙ ∫₀¹ ∂F(α·A_l)/∂A_l dα``, computed by Captum's ``IntegratedGradients`` on a function of the pattern
    that injects it at ``blocks.{l}.attn.hook_pattern`` (or through ``hook_z`` where the model drops pattern
    edits; ``Backend`` decides). Baseline: zero attention at layer ``l`` only. By completeness, the attributions
    of a layer sum to ``F(A) − F(A_l = 0)``. ``AttentionAttribution`` is the same class under its former name.

    What F is:

    - Decoders, no ``output_func``: the log-probability (or probability, ``output="prob"``) of the target
      token(s); see ``attribute``'s ``target``.
    - Encoders with an MLM head, no ``output_func``: the log-probability of labelled tokens (labels as target).
    - Any model, with ``output_func(out, inputs, *additional_forward_args)``: ``out`` is a ``ForwardOutput``
      holding the logits and the activations of ``output_hooks`` (default ``output_func.hook_names``), gradients
      attached. It returns ``[batch]`` (F itself) or ``[batch, n]`` (``target`` picks a column, default the
      predicted one). E.g. a sentiment classifier on the mean-pooled final hidden state of MiniLM:
      ``SelfAttentionAttribution(model, PooledOutput(classifier))``.

    Args:
        forward_func: a TransformerLens ``HookedTransformer``/``HookedEncoder`` (TL 3.9), a ``TransformerBridge``,
            or a ``Backend`` (e.g. ``Backend(model, attention_access="z")`` to force the ``hook_z`` route).
        output_func: optional scalar readout, see above.
        output_hooks: hook names (or ``"final_hidden"``) whose activations ``output_func`` reads.
        output: ``"log_prob"`` (default) or ``"prob"``; only used without ``output_func``.
        shortcuts: skip work that cannot change F (default True; False runs the full model every time, for
            checking). (1) Where the model class allows it (``HookedTransformer``), each forward starts at layer
            ``l`` from the cached ``blocks.{l}.hook_resid_pre``: the layers below do not depend on ``A_l``.
            (2) Without ``output_func`` on a decoder, only the logits rows F reads are computed
            (``HookedTransformer``: its ``unembed`` on those rows; bridges whose Hugging Face model takes
            ``logits_to_keep``). Both are checked against the full computation at run time and give the same
            numbers up to float rounding.
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
        self.output: OutputKind = check_choice("output", output, OUTPUT_KINDS)
        self.shortcuts = bool(shortcuts)

    # ------------------------------------------------------------------------------------------- captum contract
    def has_convergence_delta(self) -> bool:
        return True

    @property
    def multiplies_by_inputs(self) -> bool:
        return True

    def compute_convergence_delta(self, *args: Any, **kwargs: Any) -> Tensor:
        """Not available separately: F is defined per layer; use ``attribute(..., return_convergence_delta=True)``."""
        raise NotImplementedError(
            "SelfAttentionAttribution: use attribute(..., return_convergence_delta=True); the delta is per layer"
        )

    @property
    def starts_at_layer(self) -> bool:
        """Whether forwards start at the attributed layer (skipping the layers below) on this model."""
        return self.shortcuts and self.backend.can_start_at_layer

    @property
    def unembeds_read_rows_only(self) -> bool:
        """Whether only the logits rows F reads are computed (decoder targets without ``output_func``)."""
        return self._rows_route() is not None

    # ---------------------------------------------------------------------------------------------------- public
    def attribute(  # type: ignore[override]
        self,
        inputs: Int[Tensor, "batch pos"] | Int[Tensor, " pos"],
        target: Any = None,
        additional_forward_args: Any = None,
        *,
        layers: int | Sequence[int] | None = None,
        n_steps: int | Literal["auto"] | None = None,
        method: str | None = None,
        internal_batch_size: int | None = None,
        memory_budget: int | str | None = None,
        attention_mask: Int[Tensor, "batch pos"] | Int[Tensor, " pos"] | None = None,
        return_convergence_delta: bool = False,
        rtol: float | None = None,
        atol: float | None = None,
        max_steps: int | None = None,
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
            n_steps: integration points per layer, or ``"auto"``: per layer, the fewest points whose completeness
                error ``|Σ attributions − (F(A) − F(A_l = 0))|`` is at most ``rtol·|F(A) − F(A_l = 0)| + atol`` for
                every row, found by a nested rule that reuses the points already evaluated (see ``method``).
                Default (None): ``"auto"`` on decoders, 20 on encoders. A fixed 20 Gauss-Legendre points keep the
                error under 0.1 % on most layers, but the first layers of decoders can need far more (SmolLM2 on a
                SQuAD task: layer 1 7 % at 20 points; "The capital of France is": layer 0 needs 257 Clenshaw-Curtis
                points), and Gauss-Legendre's error is not monotone in the count (layer 0: 0.04 % at 20, 1.1 % at
                24); see ``benchmarks/results/attattr_steps.md``.
            method: the quadrature. Integer ``n_steps``: Captum's ``"gausslegendre"`` (default), ``"riemann_right"``,
                ``"riemann_left"``, ``"riemann_middle"`` or ``"riemann_trapezoid"``. ``n_steps="auto"``: a rule
                family of ``at2_lens.attattr.quadrature``: ``"clenshaw_curtis"`` (default; nested, 5, 9, 17, ...
                points), ``"romberg"`` (nested) or ``"gausslegendre"`` (4, 8, 16, ... points, none reused).
            internal_batch_size: at most this many rows per forward pass (examples × steps), to bound memory.
                ``n_steps="auto"`` without it (or ``memory_budget``) runs at most 20 points per pass.
            memory_budget: instead of ``internal_batch_size``, the memory the integration steps may use, in bytes or
                as a string (``"2GB"``, ``"512MiB"``): each layer's steps are chunked so that a chunk's estimated
                activations fit (see ``at2_lens.attattr.memory``; weights and the clean pass are not counted).
                Chunking changes only the order of float sums. A budget too small for one step is an InputError.
            attention_mask: ``[batch, pos]``, 1 for real tokens, 0 for padding.
            return_convergence_delta: also compute, per layer, ``Σ attributions − (F(A) − F(A_l = 0))`` (one extra
                forward per layer). Always computed with ``n_steps="auto"``.
            rtol: ``n_steps="auto"`` only: the relative completeness tolerance per layer (default ``1e-3``): a
                layer is done when ``|sum of attributions - (F(A) - F(A_l = 0))| <= rtol * |F(A) - F(A_l = 0)| +
                atol``.
            atol: ``n_steps="auto"`` only: the absolute part of that tolerance, in F's units (default ``1e-5``); it
                keeps layers with ``F(A) ≈ F(A_l = 0)`` from chasing float noise.
            max_steps: ``n_steps="auto"`` only: at most this many gradient evaluations per layer (default 257). A
                layer that has not met the tolerance by then keeps its best rule's attributions, is marked in
                ``result.converged`` and raises a ``UserWarning``.

        Returns:
            an ``AttAttrResult``: ``.attributions`` ``[layer, head, query, key]`` for one example (``[batch, layer,
            head, query, key]`` for several), ``.by_hook_name()``, ``.head_importance()``, ``.convergence_delta``;
            with ``n_steps="auto"`` also ``.steps`` (gradient evaluations per layer), ``.converged`` and
            ``.relative_convergence_delta()`` (the achieved error).
        """
        call = self._check_call(
            inputs, target, additional_forward_args, layers=layers, n_steps=n_steps, method=method,
            internal_batch_size=internal_batch_size, memory_budget=memory_budget, attention_mask=attention_mask,
            return_convergence_delta=return_convergence_delta, rtol=rtol, atol=atol, max_steps=max_steps,
        )
        attributions, f_full, delta, base, steps, converged = self._attribute(call)
        single = call.n_rows == 1
        return AttAttrResult(
            attributions=attributions[0] if single else attributions,
            layers=tuple(call.layers),
            output=f_full[0] if single else f_full,
            convergence_delta=delta[0] if (single and delta is not None) else delta,
            baseline_output=base[0] if (single and base is not None) else base,
            attention_mask=call.mask,
            method=call.method,
            n_steps=call.n_steps,
            steps=steps,
            converged=converged,
            rtol=call.tolerance.rtol if call.tolerance else None,
            atol=call.tolerance.atol if call.tolerance else None,
            max_steps=call.tolerance.max_steps if call.tolerance else None,
        )

    def internal_batch_size_for(
        self, n_pos: int, memory_budget: int | str, *, n_steps: int = 20, n_rows: int = 1, layer: int = 0
    ) -> int | None:
        """The ``internal_batch_size`` that ``attribute(..., memory_budget=...)`` picks for ``layer`` (None: all
        steps in one chunk), assuming the full logits are computed. InputError if one step does not fit."""
        budget = parse_memory_budget(memory_budget)
        n_pos = check_int("n_pos", n_pos)
        n_rows = check_int("n_rows", n_rows)
        layer = self.backend.check_layers([layer])[0]
        n_steps = check_n_steps(n_steps, "gausslegendre")
        return self._chunk_rows(budget, n_rows, n_pos, n_steps, layer, self.starts_at_layer and layer > 0, n_pos)

    # ------------------------------------------------------------------------------------------- checking a call
    def _check_call(
        self,
        inputs: Any,
        target: Any,
        additional_forward_args: Any,
        *,
        layers: int | Sequence[int] | None,
        n_steps: object,
        method: object,
        internal_batch_size: int | None,
        memory_budget: int | str | None,
        attention_mask: Any,
        return_convergence_delta: bool,
        rtol: object = None,
        atol: object = None,
        max_steps: object = None,
    ) -> _Call:
        """Every argument of ``attribute`` checked and formatted; everything checkable without a forward pass fails
        here (a too-small memory budget included)."""
        backend = self.backend
        n_steps, method, tolerance = check_integration(n_steps, method, rtol, atol, max_steps,
                                                       causal=backend.is_causal)
        internal_batch_size = check_optional_int("internal_batch_size", internal_batch_size)
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
            and all(hook_names.first_block(name, backend.n_layers) >= layer for name in self.output_hooks.values())
            for layer in layer_list
        }
        rows = self._read_rows(labels, mask, n_rows, n_pos) if self.output_func is None and causal else None
        rows_only = rows is not None and self._rows_route() is not None
        chunks: dict[int, int | None] = {layer: internal_batch_size for layer in layer_list}
        if budget is not None:
            logit_rows = len(rows) if (rows_only and rows is not None) else n_pos
            most = n_steps if tolerance is None else quadrature.max_cost(method, tolerance.max_steps)
            chunks = {layer: self._chunk_rows(budget, n_rows, n_pos, most, layer, start[layer], logit_rows)
                      for layer in layer_list}
        return _Call(
            tokens=tokens, mask=mask, inputs_1d=inputs_1d, target=tgt, extra=extra, layers=layer_list,
            n_steps=n_steps, method=method, tolerance=tolerance, labels=labels, rows=rows, rows_only=rows_only,
            start=start, chunks=chunks, return_convergence_delta=bool(return_convergence_delta),
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

    def _read_rows(self, labels: Tensor | None, mask: Tensor | None, n_rows: int, n_pos: int) -> Tensor:
        """The logits rows (positions) F reads: each row's last real token, or the labelled rows."""
        if labels is None:
            return torch.unique(last_real_positions(n_rows, n_pos, mask))
        return (labels != IGNORE_INDEX).any(dim=0).nonzero().squeeze(-1)

    def _rows_route(self) -> str | None:
        """How only some logits rows are computed on this model (see ``Backend.rows_route``), or None."""
        if not self.shortcuts or self.output_func is not None or not self.backend.is_causal:
            return None
        return self.backend.rows_route

    def _chunk_rows(
        self, budget: int, n_rows: int, n_pos: int, n_steps: int, layer: int, starts_here: bool, logit_rows: int
    ) -> int | None:
        """Rows per integration chunk of ``layer`` within ``budget`` bytes (see ``at2_lens.attattr.memory``)."""
        b = self.backend
        per_step = step_bytes(
            n_pos=n_pos, n_layers=b.n_layers - layer if starts_here else b.n_layers, n_heads=b.n_heads,
            d_model=b.d_model, d_mlp=b.d_mlp, d_vocab=b.d_vocab, logit_rows=logit_rows,
        )
        return chunk_rows(budget, per_step, n_rows, n_steps)

    # ------------------------------------------------------------------------------------------------ algorithm
    def _attribute(
        self, call: _Call
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
        """Attributions ``[batch, layer, head, q, k]``, F ``[batch]``, the completeness deltas and baselines
        ``[batch, layer]`` (if asked or ``n_steps="auto"``) and, with ``"auto"``, the gradient evaluations and
        convergence per layer ``[layer]``."""
        patterns, resids, clean_out, rows_ok = self._clean_pass(call)
        selector = self._selector(call, clean_out)
        with torch.no_grad():
            f_full = self._objective(clean_out, call.tokens, selector, call.extra).detach()
        if not bool(torch.isfinite(f_full).all()):
            raise NumericalError(f"output: F of the unmodified model is not finite ({f_full.tolist()})")
        rows = call.rows if (call.rows_only and rows_ok) else None
        start_mask = self.backend.start_mask(call.tokens, call.mask) if call.start_layers else None
        attrs: list[Tensor] = []
        deltas: list[Tensor] = []
        baselines: list[Tensor] = []
        steps: list[int] = []
        converged: list[bool] = []
        for layer in call.layers:
            inputs = (call, layer, patterns[layer], resids.get(layer), start_mask, selector, rows)
            if call.tolerance is None:
                attr, f_zero = self._integrate_layer(*inputs)
            else:
                attr, f_zero, used, ok = self._integrate_layer_auto(*inputs, f_full)
                steps.append(used)
                converged.append(ok)
            attrs.append(attr)
            if f_zero is not None:
                baselines.append(f_zero)
                deltas.append(attr.sum(dim=(1, 2, 3)).to(f_full.dtype) - (f_full - f_zero))
        delta = torch.stack(deltas, dim=1) if deltas else None
        base = torch.stack(baselines, dim=1) if baselines else None
        if call.tolerance is None:
            return torch.stack(attrs, dim=1), f_full, delta, base, None, None
        return (torch.stack(attrs, dim=1), f_full, delta, base, torch.tensor(steps, dtype=torch.long),
                torch.tensor(converged, dtype=torch.bool))

    @torch.no_grad()
    def _clean_pass(self, call: _Call) -> tuple[dict[int, Tensor], dict[int, Tensor], ForwardOutput, bool]:
        """One unmodified forward: each layer's pattern, the residuals to start from, the output F reads, and
        whether the rows-only route reproduces this pass's logits (where it is used)."""
        backend = self.backend
        patterns: dict[int, Tensor] = {}
        resids: dict[int, Tensor] = {}
        captured: dict[str, Tensor] = {}

        def keep(store: dict[int, Tensor], layer: int) -> Any:
            def hook(x: Tensor, hook: Any) -> None:
                store[layer] = x.detach().clone()

            return hook

        hooks: list[FwdHook] = [(backend.pattern_hook(lyr), keep(patterns, lyr)) for lyr in call.layers]
        hooks += [(backend.resid_pre_hook(lyr), keep(resids, lyr)) for lyr in call.start_layers]
        hooks += self._capture_hooks(captured)
        if call.rows_only and call.rows is not None:
            logits, rows_ok = backend.run_checking_rows(call.tokens, call.rows, hooks, call.mask)
        else:
            logits, rows_ok = backend.run(call.tokens, hooks, call.mask), False
        missing = [lyr for lyr in call.layers if lyr not in patterns]
        if missing:
            raise RuntimeError(f"{backend.describe()}: hook_pattern did not fire for layers {missing}")
        for layer, pattern in patterns.items():
            if not bool(torch.isfinite(pattern).all()):
                raise NumericalError(
                    f"attention of layer {layer} holds NaN or inf (e.g. a row whose every key is masked); "
                    "refusing to integrate gradients over it"
                )
        return patterns, resids, ForwardOutput(logits, captured, call.mask), rows_ok

    def _selector(self, call: _Call, clean_out: ForwardOutput) -> Tensor | None:
        """What F reads, resolved now that the unmodified output is known: labels ``[batch, pos]`` (no
        ``output_func``) or the ``output_func`` column per row (None for ``[batch]`` outputs)."""
        backend = self.backend
        if self.output_func is None:
            labels = call.labels
            if labels is None:
                logits = clean_out.logits
                last = last_real_positions(call.n_rows, call.n_pos, call.mask)
                rows = torch.arange(call.n_rows, device=logits.device)
                predicted = logits[rows, last.to(logits.device)].argmax(dim=-1)
                labels = row_labels_from_target(
                    None, n_rows=call.n_rows, n_pos=call.n_pos, inputs_1d=call.inputs_1d, causal=backend.is_causal,
                    d_vocab=backend.d_vocab, attention_mask=call.mask, predicted=lambda: predicted,
                )
            return labels.to(backend.device)
        with torch.no_grad():
            raw = self.output_func(clean_out, call.tokens, *call.extra)
        if not isinstance(raw, Tensor) or raw.shape[:1] != (call.n_rows,):
            raise InputError(f"output_func: expected a tensor with one row per input ({call.n_rows}), got "
                             f"{tuple(raw.shape) if isinstance(raw, Tensor) else type(raw).__name__}")
        index = output_index_from_target(call.target, raw)
        return index.to(backend.device) if index is not None else None

    def _integrate_layer(
        self,
        call: _Call,
        layer: int,
        pattern: Tensor,
        resid: Tensor | None,
        start_mask: Tensor | None,
        selector: Tensor | None,
        rows: Tensor | None,
    ) -> tuple[Tensor, Tensor | None]:
        """Captum's ``IntegratedGradients`` over layer ``layer``'s pattern: the attributions ``[batch, head, q, k]``
        and, with ``return_convergence_delta``, F with this layer's attention zeroed (``[batch]``)."""
        forward = self._layer_forward(layer, rows)
        args = (call.tokens, call.mask, start_mask, resid, selector, *call.extra)
        attr = IntegratedGradients(forward).attribute(
            pattern, additional_forward_args=args, n_steps=call.n_steps, method=call.method,
            internal_batch_size=call.chunks[layer],
        )
        if not bool(torch.isfinite(attr).all()):
            raise NumericalError(f"attributions of layer {layer} hold NaN or inf; refusing to return them")
        f_zero = None
        if call.return_convergence_delta:
            with torch.no_grad():
                f_zero = forward(torch.zeros_like(pattern), *args).detach()
        return attr.detach(), f_zero

    def _integrate_layer_auto(
        self,
        call: _Call,
        layer: int,
        pattern: Tensor,
        resid: Tensor | None,
        start_mask: Tensor | None,
        selector: Tensor | None,
        rows: Tensor | None,
        f_full: Tensor,
    ) -> tuple[Tensor, Tensor, int, bool]:
        """``n_steps="auto"`` on one layer: the rules of ``call.method``'s family in order of size, each node's
        gradient evaluated once, until the completeness tolerance holds for every row or ``max_steps`` is reached.

        Returns the attributions ``[batch, head, q, k]``, F with the layer's attention zeroed ``[batch]``, the
        gradient evaluations made and whether the tolerance was met.
        """
        tol = call.tolerance
        assert tol is not None
        forward = self._layer_forward(layer, rows)
        args = (call.tokens, call.mask, start_mask, resid, selector, *call.extra)
        rules = list(quadrature.family(call.method, tol.max_steps))
        # One running weighted sum of gradients per rule: each node adds its gradient, weighted, to the sums of every
        # rule (not yet ruled out) that contains it, so no per-node gradient is kept.
        sums: list[Tensor | None] = [torch.zeros_like(pattern) for _ in rules]
        weights = [dict(zip(rule.keys, rule.weights, strict=True)) for rule in rules]
        done: set[object] = set()
        chunk = call.chunks[layer]
        per_chunk = max(1, chunk // call.n_rows) if chunk is not None else AUTO_STEPS_PER_PASS
        f_zero: Tensor | None = None
        attr = pattern
        ok = False
        for i, rule in enumerate(rules):
            new = [(key, alpha) for key, alpha in zip(rule.keys, rule.alphas, strict=True) if key not in done]
            for lo in range(0, len(new), per_chunk):
                part = new[lo:lo + per_chunk]
                f_alpha, grads = self._node_gradients(forward, pattern, args, [alpha for _, alpha in part])
                for j, (key, alpha) in enumerate(part):
                    done.add(key)
                    if alpha == 0.0:
                        f_zero = f_alpha[j]
                    for later in range(i, len(rules)):
                        total, weight = sums[later], weights[later].get(key)
                        if total is not None and weight is not None:
                            total.add_(grads[j], alpha=weight)
                del grads
            total = sums[i]
            assert total is not None
            attr = pattern * total
            sums[i] = None  # this rule is done with
            if not bool(torch.isfinite(attr).all()):
                raise NumericalError(f"attributions of layer {layer} hold NaN or inf; refusing to return them")
            if f_zero is None:
                with torch.no_grad():
                    f_zero = forward(torch.zeros_like(pattern), *args).detach()
            change = f_full - f_zero
            error = (attr.sum(dim=(1, 2, 3)).to(change.dtype) - change).abs()
            if bool((error <= tol.rtol * change.abs() + tol.atol).all()):
                ok = True
                break
        if not ok:
            worst = float((error / change.abs().clamp_min(torch.finfo(change.dtype).tiny)).max())
            warnings.warn(
                f"AttAttr: layer {layer} did not reach rtol={tol.rtol:g} (atol={tol.atol:g}) within "
                f"max_steps={tol.max_steps} gradient evaluations ({len(done)} made, relative completeness error "
                f"{worst:.2e}); its attributions come from the largest rule tried (result.converged marks it). "
                "Raise max_steps or rtol.",
                UserWarning,
                stacklevel=4,
            )
        assert f_zero is not None
        return attr.detach(), f_zero.detach(), len(done), ok

    def _node_gradients(
        self, forward: Any, pattern: Tensor, args: tuple[Any, ...], alphas: list[float]
    ) -> tuple[Tensor, Tensor]:
        """F and ∂F/∂pattern at ``alphas[i]·pattern``: ``[node, batch]`` and ``[node, batch, head, q, k]``, the
        nodes in one forward and backward pass (inputs repeated per node along the batch axis, as Captum does)."""
        n, rows = len(alphas), pattern.shape[0]
        scale = torch.tensor(alphas, dtype=pattern.dtype, device=pattern.device)
        scaled = (scale[:, None, None, None, None] * pattern[None]).reshape(n * rows, *pattern.shape[1:])
        expanded = tuple(torch.cat([a] * n, dim=0) if isinstance(a, Tensor) else a for a in args)
        with torch.enable_grad():
            scaled.requires_grad_(True)
            f = forward(scaled, *expanded)
            (grad,) = torch.autograd.grad(f.sum(), scaled)
        return f.detach().reshape(n, rows), grad.reshape(n, *pattern.shape)

    def _capture_hooks(self, store: dict[str, Tensor]) -> list[FwdHook]:
        hooks: list[FwdHook] = []
        for alias, name in self.output_hooks.items():
            def hook(x: Tensor, hook: Any, alias: str = alias) -> None:
                store[alias] = x

            hooks.append((name, hook))
        return hooks

    def _objective(self, out: ForwardOutput, tokens: Tensor, selector: Tensor | None, extra: tuple[Any, ...]) -> Tensor:
        if self.output_func is None:
            assert selector is not None
            return labels_objective(out.logits, selector, self.output)
        return select_output(self.output_func(out, tokens, *extra), selector)

    def _layer_forward(self, layer: int, rows: Tensor | None) -> Any:
        """F as a function of layer ``layer``'s pattern (Captum's ``forward_func``); other arguments come expanded.

        ``rows``: compute only these logits rows (see ``Backend.rows_route``); the selector is cut to match.
        """
        backend = self.backend

        def forward(
            pattern: Float[Tensor, "batch head query key"],
            tokens: Tensor,
            mask: Tensor | None,
            start_mask: Tensor | None,
            resid: Tensor | None,
            selector: Tensor | None,
            *extra: Any,
        ) -> Tensor:
            captured: dict[str, Tensor] = {}
            hooks = backend.pattern_hooks(layer, replace_pattern(pattern)) + self._capture_hooks(captured)
            if rows is not None:
                assert selector is not None
                if resid is None:
                    logits = backend.run_rows(tokens, rows, hooks, mask)
                else:
                    logits = backend.run_from_layer(resid, layer, hooks, start_mask, mask, rows=rows)
                return labels_objective(logits, selector[:, rows.to(selector.device)], self.output)
            if resid is None:
                logits = backend.run(tokens, hooks, mask)
            else:
                logits = backend.run_from_layer(resid, layer, hooks, start_mask, mask)
            return self._objective(ForwardOutput(logits, captured, mask), tokens, selector, extra)

        return forward


AttentionAttribution = SelfAttentionAttribution
"""The former name of ``SelfAttentionAttribution`` (kept: ``at2_lens.AttentionAttribution``)."""

__all__ = ["AUTO_METHODS", "METHODS", "AttentionAttribution", "SelfAttentionAttribution"]
