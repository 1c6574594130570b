"""``AT2Attribution``: AT2 as a Captum attribution class.

Cohen-Wang, Chuang, Madry (2025), "Learning to Attribute with Attention". A linear estimator over per-head
attention features predicts how much ablating each source would change the target; once trained, attributing
costs one forward pass over prompt + response (the one that reads the features), and attributing another span of
the same response costs none (the pass is cached).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from captum.attr import Attribution

from at2_lens.at2.estimator import LinearEstimator, load_estimator_file, model_fingerprint
from at2_lens.at2.features import FeaturePass, extract_features
from at2_lens.backends import Backend, get_backend
from at2_lens.errors import InputError, NumericalError
from at2_lens.results import SourceAttribution
from at2_lens.tasks import ContextTask, TargetSpan, TokenizedTask

_CACHE_SIZE = 8


def prepare_task(
    backend: Backend,
    task: ContextTask | TokenizedTask,
    max_new_tokens: int = 64,
    target: TargetSpan | Sequence[int] | None = None,
) -> TokenizedTask:
    """Tokenize a task for ``backend``'s model, generating the response greedily when the task has none.

    ``target`` (a ``TargetSpan``, or a ``(start, end)`` character range of the response) overrides the task's own.
    Everything that can be checked without the model (the target's form, the generation budget, the prompt's
    length and token ids) is checked before any generation or forward pass.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
    span = _target_span(target)
    if span is not None and span.unit == "token" and _needs_generation(task) and span.end > max_new_tokens:
        raise InputError(
            f"target: token span ({span.start}, {span.end}) cannot lie inside a response of at most "
            f"max_new_tokens={max_new_tokens} tokens"
        )
    tokenized = _tokenized(backend, task, max_new_tokens)
    if span is None:
        return tokenized
    if span.unit == "char":
        return tokenized.with_target(char_range=(span.start, span.end))
    return tokenized.with_target(token_range=(span.start, span.end))


def _target_span(target: TargetSpan | Sequence[int] | None) -> TargetSpan | None:
    """Validate a target override (a TargetSpan or a ``(start, end)`` character range) without the response."""
    if target is None or isinstance(target, TargetSpan):
        return target
    if isinstance(target, str | bytes) or not isinstance(target, Sequence) or len(target) != 2:
        raise InputError(f"target: expected None, a TargetSpan or a (start, end) character range, got {target!r}")
    return TargetSpan(target[0], target[1], "char")  # type: ignore[arg-type]


def _needs_generation(task: object) -> bool:
    return isinstance(task, ContextTask) and task.response is None


def check_tasks(backend: Backend, tasks: Sequence[object], name: str = "tasks") -> None:
    """Validate every task against ``backend``'s model before any model work: each is a ``ContextTask`` whose
    prompt (and response, when given) tokenizes within the context window, or a ``TokenizedTask`` with a response
    and valid token ids. Tokenizing costs far less than one forward pass; errors name the task's index."""
    if isinstance(tasks, str | bytes | ContextTask | TokenizedTask) or not isinstance(tasks, Sequence):
        raise InputError(f"{name}: expected a sequence of ContextTask or TokenizedTask, got {type(tasks).__name__}")
    if not tasks:
        raise InputError(f"{name}: expected at least one task")
    for i, task in enumerate(tasks):
        try:
            if isinstance(task, TokenizedTask):
                if task.response is None:
                    raise InputError("the TokenizedTask has no response; attach one with with_response()")
                backend.check_tokens(task.input_ids, name="input_ids")
            elif isinstance(task, ContextTask):
                task.tokenize(backend.tokenizer, max_length=backend.n_ctx)
            else:
                raise InputError(f"expected a ContextTask or TokenizedTask, got {type(task).__name__}")
        except InputError as exc:
            raise InputError(f"{name}[{i}]: {exc}") from None


def _tokenized(backend: Backend, task: ContextTask | TokenizedTask, max_new_tokens: int) -> TokenizedTask:
    if isinstance(task, TokenizedTask):
        if task.response is None:
            raise InputError("inputs: the TokenizedTask has no response; attach one with with_response()")
        backend.check_tokens(task.input_ids, name="inputs.input_ids")
        return task
    if not isinstance(task, ContextTask):
        raise InputError(f"inputs: expected a ContextTask or TokenizedTask, got {type(task).__name__}")
    tok = backend.tokenizer
    if task.response is not None:
        return task.tokenize(tok, max_length=backend.n_ctx)
    prompt = task.tokenize(tok, max_length=backend.n_ctx)
    new_ids = backend.generate_greedy(prompt.input_ids, max_new_tokens=max_new_tokens)
    if len(new_ids) == 0:
        raise InputError("inputs: the model produced an empty response; give a response or another prompt")
    return prompt.with_response(tok, new_ids.tolist(), target=task.target, max_length=backend.n_ctx)


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
            model fingerprint must match the model.
    """

    def __init__(self, forward_func: Any, estimator: LinearEstimator | str | Path | None = None) -> None:
        backend = get_backend(forward_func)
        super().__init__(forward_func)
        self.backend = backend
        # The estimator is checked first: it needs no forward pass (the probe behind is_causal runs one).
        fingerprint = model_fingerprint(backend)
        if estimator is None:
            estimator = LinearEstimator.uniform(backend.n_layers, backend.n_heads, model_fingerprint=fingerprint)
        elif isinstance(estimator, str | Path):
            estimator = load_estimator_file(estimator, expected_fingerprint=fingerprint)
        elif isinstance(estimator, LinearEstimator):
            estimator.check_fingerprint(fingerprint)
        else:
            raise InputError(f"estimator: expected a LinearEstimator, a path or None, got {type(estimator).__name__}")
        if not backend.is_causal:
            raise InputError("forward_func: AT2 attributes generated responses and needs a causal (decoder) model")
        _ = backend.attention_access  # fails now, with the reason, if attention cannot be read or intervened on
        self.estimator: LinearEstimator = estimator
        self._passes: OrderedDict[str, FeaturePass] = OrderedDict()
        self.forward_passes = 0  # counts the passes actually run, so reuse is observable

    def has_convergence_delta(self) -> bool:
        return False

    def attribute(  # type: ignore[override]
        self,
        inputs: ContextTask | TokenizedTask,
        target: TargetSpan | Sequence[int] | None = None,
        *,
        per_token: bool = False,
        max_new_tokens: int = 64,
    ) -> SourceAttribution:
        """Score every source of ``inputs`` for the target span.

        Args:
            inputs: a ``ContextTask`` (its response is generated greedily when it has none) or a
                ``TokenizedTask`` with a response.
            target: the part of the response to attribute: a ``TargetSpan`` (characters or tokens of the
                response) or a ``(start, end)`` character range; default the task's target or the whole response.
            per_token: also score every target token separately (``result.token_scores``).
            max_new_tokens: generation budget when the response is generated.
        """
        task = prepare_task(self.backend, inputs, max_new_tokens, target)
        fpass = self._feature_pass(task)
        t_range = task.target_token_range
        assert t_range is not None and task.response is not None and task.target_text is not None
        feats = fpass.features(t_range)
        scores = self.estimator.score(feats)
        if not torch.isfinite(scores).all():
            raise NumericalError("scores: the estimator produced NaN or inf scores from finite features")
        token_scores = target_tokens = None
        if per_token:
            t0, t1 = t_range
            r0 = t0 - fpass.target_range[0]
            token_scores = self.estimator.score(fpass.row_features[r0 : r0 + (t1 - t0)])
            tok = self.backend.tokenizer
            target_tokens = tuple(tok.decode([int(i)]) for i in task.input_ids[t0:t1])
        return SourceAttribution(
            scores=scores,
            source_texts=task.source_texts,
            source_spans=task.source_spans,
            context=task.context,
            target_text=task.target_text,
            response=task.response,
            method="AT2" if self.estimator.training else "average attention (uniform AT2 weights)",
            units="unitless (L1-normalised head weights x attention)",
            token_scores=token_scores,
            target_tokens=target_tokens,
            extra={"task": task, "forward_passes": self.forward_passes},
        )

    def _feature_pass(self, task: TokenizedTask) -> FeaturePass:
        """The cached per-row features of the whole response, computing them on first use."""
        resp = task.response_token_range
        assert resp is not None
        key = hashlib.sha256(
            task.input_ids.numpy().tobytes() + repr((task.source_token_ranges, resp)).encode()
        ).hexdigest()
        if key in self._passes:
            self._passes.move_to_end(key)
            return self._passes[key]
        fpass = extract_features(self.backend.model, task.input_ids, list(task.source_token_ranges), resp)
        self.forward_passes += 1
        self._passes[key] = fpass
        while len(self._passes) > _CACHE_SIZE:
            self._passes.popitem(last=False)
        return fpass

    @property
    def head_weights(self) -> torch.Tensor:
        """The estimator's ``[layer, head]`` weights, ready for head-ablation experiments."""
        return self.estimator.weights.clone()
