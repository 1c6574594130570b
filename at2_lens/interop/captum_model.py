"""``CaptumLM``: a TransformerLens model dressed as the Hugging Face causal LM that Captum's LLM classes expect.

Captum's ``LLMAttribution`` (FeatureAblation, ShapleyValueSampling, Lime, KernelShap) and
``LLMGradientAttribution`` (LayerIntegratedGradients, LayerGradientXActivation, LayerGradientShap) call
``model.forward(input_ids=..., attention_mask=...)`` and read ``.logits``, read ``model.device``, call
``model.generate(...)`` when no target is given, and ``prepare_inputs_for_generation`` /
``_update_model_kwargs_for_generation`` in their token-by-token mode. A ``HookedTransformer`` or
``TransformerBridge`` has none of these in that form; this adapter provides them on top of
:class:`at2_lens.backends.Backend`, so one adapter serves every supported model class on both TransformerLens
lines. Its ``tokenizer`` adds the tokenizer's special tokens exactly where at2_lens does (not in front of an
already-rendered chat prompt), so Captum and at2_lens see the same token ids for the same text.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor
from transformers.modeling_outputs import CausalLMOutput

from at2_lens.backends import Backend, get_backend
from at2_lens.errors import InputError, ModelNotSupportedError
from at2_lens.tasks import DEFAULT_MAX_NEW_TOKENS, prepare_task

__all__ = ["CaptumLM"]


class _PromptTokenizer:
    """The model's tokenizer, except that ``encode``/``__call__`` without an explicit ``add_special_tokens`` add
    special tokens only when the text does not already start with one (a rendered chat prompt carries its own).

    Everything else is the wrapped Hugging Face tokenizer's.
    """

    def __init__(self, tokenizer: Any, add_special_tokens: bool | None) -> None:
        self._tokenizer = tokenizer
        self._fixed = add_special_tokens
        self._specials = sorted(
            (t for t in getattr(tokenizer, "all_special_tokens", []) if isinstance(t, str) and t), key=len
        )

    def wants_special_tokens(self, text: object) -> bool:
        """Whether ``text`` gets the tokenizer's special tokens (BOS, [CLS]…) when none is asked for explicitly."""
        if self._fixed is not None:
            return self._fixed
        return not (isinstance(text, str) and any(text.startswith(t) for t in self._specials))

    def encode(self, text: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("add_special_tokens", self.wants_special_tokens(text))
        return self._tokenizer.encode(text, *args, **kwargs)

    def __call__(self, text: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("add_special_tokens", self.wants_special_tokens(text))
        return self._tokenizer(text, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)

    def __repr__(self) -> str:
        return f"_PromptTokenizer({self._tokenizer!r})"


class CaptumLM(torch.nn.Module):
    """A TransformerLens decoder that Captum's ``LLMAttribution`` and ``LLMGradientAttribution`` can run.

    Wrap the model once and hand the adapter (and its ``tokenizer``) to Captum where it expects a Hugging Face
    model. Both of Captum's forward modes work: ``forward_in_tokens=False`` (one pass over prompt + target) and
    the default token-by-token mode (with ``use_cached_outputs`` True or False; there is no key/value cache, each
    step re-runs the sequence, so the results are identical and only the cost differs).

    Example::

        from captum.attr import FeatureAblation, LLMAttribution, LayerIntegratedGradients, LLMGradientAttribution
        lm = CaptumLM(model)
        llm_attr = LLMAttribution(FeatureAblation(lm), lm.tokenizer)
        inp, target = lm.template_input(task)           # one feature per at2_lens source
        res = llm_attr.attribute(inp, target=target, forward_in_tokens=False)
        lig = LLMGradientAttribution(LayerIntegratedGradients(lm, lm.embedding_layer), lm.tokenizer)

    Args:
        model: a TransformerLens ``HookedTransformer`` (TL 3.9) or ``TransformerBridge`` decoder with a tokenizer
            (or an at2_lens ``Backend``).
        add_special_tokens: whether the adapter's tokenizer adds special tokens (e.g. BOS) to text it encodes.
            None (default) adds them unless the text already starts with a special token, which is what at2_lens
            does for plain and chat-template prompts.
    """

    def __init__(self, model: Any, add_special_tokens: bool | None = None) -> None:
        super().__init__()
        if add_special_tokens is not None and not isinstance(add_special_tokens, bool):
            raise InputError(f"add_special_tokens: expected True, False or None, got {add_special_tokens!r}")
        backend = get_backend(model)
        if not backend.is_causal:
            raise ModelNotSupportedError(
                f"model: Captum's LLM attribution scores generated text and needs a decoder; "
                f"{backend.describe()} is an encoder"
            )
        self.backend: Backend = backend
        self.model = backend.model
        self.tokenizer = _PromptTokenizer(backend.tokenizer, add_special_tokens)

    # ------------------------------------------------------------------------------------ Hugging Face surface
    @property
    def device(self) -> torch.device:
        """The device of the model's parameters (Captum moves its inputs there)."""
        return self.backend.device

    @property
    def config(self) -> Any:
        """The TransformerLens config (``n_layers``, ``n_heads``, ``d_vocab`` …)."""
        return self.model.cfg

    @property
    def embedding_layer(self) -> torch.nn.Module:
        """The token-embedding hook point, the layer to give ``LayerIntegratedGradients`` & co."""
        from at2_lens.baselines import embedding_hook_point

        return embedding_hook_point(self.model)

    def forward(
        self,
        input_ids: Int[Tensor, "batch pos"],
        attention_mask: Int[Tensor, "batch pos"] | None = None,
        **kwargs: Any,
    ) -> CausalLMOutput:
        """Logits of the TransformerLens model, as ``CausalLMOutput(logits=[batch, pos, vocab])``.

        Generation-only keywords Captum passes (``use_cache``, ``cache_position``, ``past_key_values``) are
        accepted and ignored; any other keyword is an error. ``attention_mask`` is passed on only when it masks
        something (1 = real token, 0 = padding).
        """
        unknown = set(kwargs) - {"use_cache", "cache_position", "past_key_values", "return_dict"}
        if unknown:
            raise InputError(f"forward: unsupported keyword arguments {sorted(unknown)}")
        ids = self.backend.check_tokens(input_ids, attention_mask, name="input_ids")
        mask = None
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            mask = attention_mask
        return CausalLMOutput(logits=self.backend.run(ids, attention_mask=mask))

    @torch.no_grad()
    def generate(
        self,
        input_ids: Int[Tensor, "1 pos"],
        attention_mask: Int[Tensor, "1 pos"] | None = None,
        max_new_tokens: int = 25,
        do_sample: bool = False,
        **kwargs: Any,
    ) -> Int[Tensor, "1 total"]:
        """Greedy generation (what Captum asks for by default): prompt ids followed by the new ids, ``[1, total]``.

        The end-of-sequence token is not included, as in at2_lens. Sampling is refused (attribution of a sampled
        response is better done by giving the response as ``target``); ``temperature``/``top_p`` of None are
        accepted.
        """
        if do_sample:
            raise InputError("do_sample: CaptumLM.generate is greedy only; pass the response as target instead")
        extra = {k: v for k, v in kwargs.items() if v is not None and k not in ("pad_token_id", "eos_token_id")}
        if extra:
            raise InputError(f"generate: unsupported generation arguments {sorted(extra)}")
        ids = self.backend.check_tokens(input_ids, attention_mask, name="input_ids")
        if ids.shape[0] != 1:
            raise InputError(f"input_ids: generate takes one sequence, got a batch of {ids.shape[0]}")
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise InputError("attention_mask: generate does not support padding")
        new = self.backend.generate_greedy(ids[0].cpu(), max_new_tokens=max_new_tokens)
        return torch.cat([ids[0].cpu(), new])[None].to(ids.device)

    def prepare_inputs_for_generation(
        self, input_ids: Int[Tensor, "batch pos"], attention_mask: Tensor | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        """The inputs of the next decoding step: the whole sequence (there is no key/value cache)."""
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}

    def _update_model_kwargs_for_generation(self, outputs: Any, model_kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """Keep ``attention_mask`` as long as ``input_ids`` after Captum appended a token."""
        out = dict(model_kwargs)
        out["attention_mask"] = torch.ones_like(out["input_ids"])
        return out

    # ---------------------------------------------------------------------------------------- at2_lens tasks
    def template_input(
        self, task: Any, target: Any = None, *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    ) -> tuple[Any, Int[Tensor, " target"]]:
        """A Captum ``TextTemplateInput`` with one feature per source of an at2_lens task, and the target's ids.

        Ablating a feature deletes that source's text from the prompt (baseline ``""``), which is at2_lens's
        ``remove`` ablation mode: Captum's ``FeatureAblation`` with ``attr_target="log_prob"`` then gives
        ``LeaveOneOut(model, mode="remove", output="log_prob")``'s scores. The response is generated greedily
        when the task has none. When the target is not the whole response, the response text before it is
        appended to the prompt as literal text (re-tokenised, which may differ slightly from the generated ids).

        Args:
            task: a ``ContextTask`` or ``TokenizedTask``.
            target: as in ``AT2Attribution.attribute``: a ``TargetSpan`` or a ``(start, end)`` character range of
                the response; default the task's target or the whole response.
            max_new_tokens: generation budget when the response is generated.

        Returns:
            ``(inp, target_ids)``: pass them as ``llm_attr.attribute(inp, target=target_ids, ...)``.
        """
        from captum.attr import TextTemplateInput

        tok = prepare_task(self.backend, task, max_new_tokens, target)
        assert tok.target_token_range is not None and tok.target_char_range is not None
        assert tok.response is not None
        literals: list[str] = []
        pos = 0
        for a, b in tok.source_prompt_spans:
            literals.append(tok.prompt[pos:a])
            pos = b
        tail = tok.prompt[pos:] + tok.response[: tok.target_char_range[0]]
        literals.append(tail)
        if self.tokenizer.wants_special_tokens(tok.prompt) != (not tok.chat):
            raise InputError(
                f"add_special_tokens: at2_lens tokenized this {'chat' if tok.chat else 'plain'} prompt "
                f"{'without' if tok.chat else 'with'} the tokenizer's special tokens but this adapter's tokenizer "
                f"would not; create it as CaptumLM(model, add_special_tokens={not tok.chat})"
            )
        t0, t1 = tok.target_token_range
        inp = TextTemplateInput(_Template(tuple(literals)), values=list(tok.source_texts))
        return inp, tok.input_ids[t0:t1].clone()


class _Template:
    """``format_fn`` for ``TextTemplateInput``: literal pieces interleaved with the (possibly ablated) sources.

    A callable rather than a ``str.format`` template, so braces in the prompt need no escaping.
    """

    def __init__(self, literals: tuple[str, ...]) -> None:
        self.literals = literals

    def __call__(self, *values: str) -> str:
        if len(values) != len(self.literals) - 1:
            raise InputError(f"values: expected {len(self.literals) - 1} source texts, got {len(values)}")
        out = [self.literals[0]]
        for value, literal in zip(values, self.literals[1:], strict=True):
            out.append(value)
            out.append(literal)
        return "".join(out)
