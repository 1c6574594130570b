"""``AT2Attribution``: AT2 as a Captum attribution class.

Cohen-Wang, Chuang, Madry (2025), "Learning to Attribute with Attention". A linear estimator over per-head
attention features predicts how much ablating each source would change the target; once trained, attributing
costs one forward pass over prompt + response (the one that reads the features), and attributing another span of
the same response costs none (the pass is cached; the result then reports 0 forward passes). A response the model
generates costs the generation plus that same single pass: the feature pass also checks the KV-cached greedy
decoding (see ``Backend.generate_greedy``), which would otherwise take a pass of its own. The cache is keyed on the
tokens, the sources and the model's state (``Backend.state_token``), so casting, moving or editing the model in
place makes the next call run a fresh pass.
"""

from __future__ import annotations

import hashlib
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from captum.attr import Attribution

from at2_lens.ablation import FeaturePass, extract_features
from at2_lens.ablation.user_cache import check_cache_inputs
from at2_lens.at2.estimator import (
    LinearEstimator,
    load_estimator_file,
    model_fingerprint,
    prompt_format_mismatch,
    prompt_format_record,
)
from at2_lens.at2.pretrained import default_estimator_for
from at2_lens.backends import get_backend
from at2_lens.errors import InputError, NumericalError
from at2_lens.results import SentenceAttribution, SentenceAttributions, SourceAttribution
from at2_lens.tasks import (
    DEFAULT_MAX_NEW_TOKENS,
    ContextTask,
    TargetSpan,
    TokenizedTask,
    prepare_task,
    prepare_task_unchecked,
)
from at2_lens.tasks.sources import split_sentences

_CACHE_SIZE = 8


class AT2Attribution(Attribution):
    r"""AT2: attribute a model's response to context sources with learned per-head attention weights.

    Cohen-Wang, Chuang, Madry (2025), "Learning to Attribute with Attention". For each source ``s`` and head
    ``(l, h)`` the feature ``φ[s, l, h]`` is the attention from the rows producing the target to ``s``'s tokens
    (mean over rows, sum over tokens); the score is ``w · φ[s]`` with ``w`` learned so that scores predict the
    effect of ablating sources. With ``estimator=None`` the weights are uniform, ``w = 1/(L·H)``: plain average
    attention, the method's starting point and baseline.

    Args:
        forward_func: a TransformerLens ``HookedTransformer`` (TL 3.9) or ``TransformerBridge`` decoder.
        estimator: a ``LinearEstimator``, a path to an estimator file, or None for average attention. Its
            model fingerprint must match the model. Attributing a prompt rendered unlike the estimator's training
            prompts (chat template vs plain, or another chat template) warns once per format, naming both.
    """

    def __init__(self, forward_func: Any, estimator: LinearEstimator | str | Path | None = None) -> None:
        backend = get_backend(forward_func)
        super().__init__(forward_func)
        self.backend = backend
        # The estimator is checked first: it needs no forward pass (the probe behind is_causal runs one).
        fingerprint = model_fingerprint(backend)
        self.uses_uniform_weights = estimator is None  # plain average attention, AT2's starting point
        if estimator is None:
            estimator = LinearEstimator.uniform(backend.n_layers, backend.n_heads, model_fingerprint=fingerprint)
        elif isinstance(estimator, str | Path):
            estimator = load_estimator_file(estimator, expected_fingerprint=fingerprint)
        elif isinstance(estimator, LinearEstimator):
            estimator.check_fingerprint(fingerprint)
        else:
            raise InputError(f"estimator: expected a LinearEstimator, a path or None, got {type(estimator).__name__}")
        if (estimator.n_layers, estimator.n_heads) != (backend.n_layers, backend.n_heads):
            # checked now, not after attribute's forward pass (an estimator with an empty fingerprint gets here)
            raise InputError(
                f"estimator: its weights are {estimator.n_layers} layers x {estimator.n_heads} heads, but the model "
                f"has {backend.n_layers} layers x {backend.n_heads} heads"
            )
        if not backend.is_causal:
            raise InputError("forward_func: AT2 attributes generated responses and needs a causal (decoder) model")
        _ = backend.attention_access  # fails now, with the reason, if attention cannot be read or intervened on
        self.estimator: LinearEstimator = estimator
        self._passes: OrderedDict[str, FeaturePass] = OrderedDict()
        self._warned_formats: set[str] = set()
        self.forward_passes = 0  # all passes this instance ran (each result reports its own call's)

    @classmethod
    def for_model(cls, forward_func: Any, estimator: LinearEstimator | str | Path | None = None) -> AT2Attribution:
        """AT2 with ``estimator`` when given, else with the estimator shipped for this model (matched by its
        fingerprint), else with uniform weights (plain average attention: ``uses_uniform_weights`` is then True)."""
        if estimator is None:
            estimator = default_estimator_for(forward_func)
        return cls(forward_func, estimator)

    def has_convergence_delta(self) -> bool:
        return False

    def attribute(  # type: ignore[override]
        self,
        inputs: ContextTask | TokenizedTask,
        target: TargetSpan | Sequence[int] | None = None,
        *,
        per_token: bool = False,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        cache: Any = None,
    ) -> SourceAttribution:
        """Score every source of ``inputs`` for the target span.

        Args:
            inputs: a ``ContextTask`` (its response is generated greedily when it has none) or a
                ``TokenizedTask`` with a response.
            target: the part of the response to attribute: a ``TargetSpan`` (characters or tokens of the
                response) or a ``(start, end)`` character range; default the task's target or the whole response.
            per_token: also score every target token separately (``result.token_scores``).
            max_new_tokens: generation budget when the response is generated.
            cache: read the attention from this TransformerLens ``ActivationCache`` of a pass over exactly the
                task's tokens (``run_with_cache(..., names_filter=at2_lens.cache_filter(model))``), or from a
                ``CachedPatterns`` around one; no forward pass runs and the scores equal a fresh run's. The task
                must have a response; see :func:`~at2_lens.ablation.user_cache.cache_filter`.
        """
        before = self.forward_passes
        task, fpass = self._task_and_pass(inputs, target, max_new_tokens, cache)
        t_range = task.target_token_range
        assert t_range is not None and task.response is not None and task.target_text is not None
        scores = self._scores(fpass, t_range)
        token_scores = target_tokens = None
        if per_token:
            t0, t1 = t_range
            r0 = t0 - fpass.target_range[0]
            token_scores = self.estimator.calibrated(self.estimator.score(fpass.row_features[r0 : r0 + (t1 - t0)]))
            target_tokens = task.target_tokens(self.backend.tokenizer)
        return SourceAttribution.from_task(
            task, scores, method=self._method, units=self.estimator.units, forward_passes=self.forward_passes - before,
            token_scores=token_scores, target_tokens=target_tokens,
        )

    def attribute_sentences(
        self, inputs: ContextTask | TokenizedTask, *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, cache: Any = None,
    ) -> SentenceAttributions:
        """Attribute every sentence of the response on its own, from one feature pass in all.

        The response (generated greedily when ``inputs`` has none) is cut with
        :func:`~at2_lens.tasks.sources.split_sentences`; each sentence's scores equal
        ``attribute(inputs, target=sentence_span)``. The cost is that of one ``attribute`` call (none when the
        response's pass is already cached): ``result.extra["forward_passes"]``, and the sentences' own counts sum to
        it (the first sentence carries it). Any target set on ``inputs`` is ignored: every sentence is a target.
        ``cache`` reads the attention from your ``ActivationCache`` of a pass over the task's tokens, as in
        :meth:`attribute` (no forward pass; the task must have a response).

        Returns:
            a :class:`~at2_lens.results.SentenceAttributions`: ``(text, span, attribution)`` per sentence, with
            ``top(k)``/``citations(k)`` and a citation view (HTML and terminal).
        """
        before = self.forward_passes
        task, fpass = self._task_and_pass(inputs, None, max_new_tokens, cache, whole_response=True)
        assert task.response is not None
        spans = split_sentences(task.response)
        if not spans:
            raise InputError("response: has no sentence to attribute (it is empty or only whitespace)")
        passes = self.forward_passes - before
        out = []
        for n, span in enumerate(spans):
            sub = task.with_target(char_range=span)
            assert sub.target_token_range is not None
            result = SourceAttribution.from_task(
                sub, self._scores(fpass, sub.target_token_range), method=self._method, units=self.estimator.units,
                forward_passes=passes if n == 0 else 0,
            )
            out.append(SentenceAttribution(task.response[span[0] : span[1]], span, result))
        return SentenceAttributions(tuple(out), task.response,
                                    extra={"forward_passes": passes, "backward_passes": 0})

    @property
    def _method(self) -> str:
        return "AT2" if self.estimator.training else "average attention (uniform AT2 weights)"

    def _scores(self, fpass: FeaturePass, t_range: tuple[int, int]) -> torch.Tensor:
        """The calibrated scores of the target rows ``t_range`` (absolute token positions) of a feature pass."""
        scores = self.estimator.calibrated(self.estimator.score(fpass.features(t_range)))
        if not torch.isfinite(scores).all():
            raise NumericalError("scores: the estimator produced NaN or inf scores from finite features")
        return scores

    def _task_and_pass(
        self, inputs: ContextTask | TokenizedTask, target: TargetSpan | Sequence[int] | None, max_new_tokens: int,
        cache: Any, *, whole_response: bool = False,
    ) -> tuple[TokenizedTask, FeaturePass]:
        """The prepared task and its feature pass: AT2's own (cached) pass, or the rows read from the user's
        ``cache`` (checked first). ``whole_response``: a cache is read for every response row, not only a target a
        ``TokenizedTask`` brought. Warns when the prompt format differs from the estimator's."""
        if cache is None:
            task, fpass = self._prepared_pass(inputs, target, max_new_tokens)
        else:
            check_cache_inputs(inputs, cache)
            task = prepare_task(self.backend, inputs, max_new_tokens, target)
            if whole_response and task.target_token_range != task.response_token_range:
                task = task.with_target()  # a TokenizedTask keeps its own target
            fpass = self._cached_feature_pass(task, cache)
        self._check_prompt_format(task)
        return task, fpass

    def _prepared_pass(
        self, inputs: ContextTask | TokenizedTask, target: TargetSpan | Sequence[int] | None, max_new_tokens: int
    ) -> tuple[TokenizedTask, FeaturePass]:
        """The prepared task and its feature pass. A response generated here with the KV cache is checked against
        the feature pass's own logits (one pass for both); if cached decoding proves wrong, the response is generated
        again without the cache (``Backend.generate_greedy``'s fallback) and read in a new pass."""
        task, unchecked = prepare_task_unchecked(self.backend, inputs, max_new_tokens, target)
        fpass = self._feature_pass(task)
        if not unchecked:
            return task, fpass
        r0, r1 = task.response_token_range or (0, 0)
        assert fpass.greedy_tokens is not None and fpass.target_range == (r0, r1)
        if self.backend.confirm_greedy(task.input_ids[r0:r1], fpass.greedy_tokens, stacklevel=4):
            return task, fpass
        task = prepare_task(self.backend, inputs, max_new_tokens, target)  # the cache is now known broken
        return task, self._feature_pass(task)

    def _check_prompt_format(self, task: TokenizedTask) -> None:
        """Warn (once per format) when the task's prompt is rendered unlike the estimator's training prompts."""
        used = prompt_format_record(task.chat, self.backend.tokenizer)
        why = prompt_format_mismatch(self.estimator.prompt_format, used)
        if why is not None and used["name"] not in self._warned_formats:
            self._warned_formats.add(used["name"])
            warnings.warn(f"AT2: {why}", UserWarning, stacklevel=4)

    def _feature_pass(self, task: TokenizedTask) -> FeaturePass:
        """The cached per-row features of the whole response, computing them on first use."""
        resp = task.response_token_range
        assert resp is not None
        # keyed also on the model's state: a cast, move or in-place edit of the weights must not reuse old features
        state = self.backend.state_token()
        key = hashlib.sha256(
            task.input_ids.detach().cpu().numpy().tobytes() + repr((task.source_token_ranges, resp, state)).encode()
        ).hexdigest()
        if key in self._passes:
            self._passes.move_to_end(key)
            return self._passes[key]
        fpass = extract_features(
            self.backend.model, task.input_ids, list(task.source_token_ranges), resp,
            options=self.estimator.feature_options,
        )
        self.forward_passes += 1
        self._passes[key] = fpass
        while len(self._passes) > _CACHE_SIZE:
            self._passes.popitem(last=False)
        return fpass

    def _cached_feature_pass(self, task: TokenizedTask, cache: Any) -> FeaturePass:
        """The target's per-row features read from the user's cache: no forward pass, and not kept (the user owns
        the cache)."""
        assert task.target_token_range is not None
        return extract_features(
            self.backend.model, task.input_ids, list(task.source_token_ranges), task.target_token_range,
            with_logprobs=False, options=self.estimator.feature_options, cache=cache,
        )

    def clear_cache(self) -> None:
        """Forget the cached feature passes (needed only after editing weights through ``p.data``, which the
        model-state key cannot see; casts, moves and ordinary in-place edits are noticed)."""
        self._passes.clear()

    @property
    def head_weights(self) -> torch.Tensor:
        """The estimator's ``[layer, head]`` weights, ready for head-ablation experiments."""
        return self.estimator.weights.clone()
