"""``ContextTask``: a context, a query and a response to attribute; ``TokenizedTask``: the same, as exact
token ranges.

The prompt is rendered once as text (the tokenizer's chat template when it has one, else a plain
``Context: …\\n\\nQuery: …\\n\\nAnswer:`` layout) with the context's character position tracked exactly,
tokenized once with offsets, and the response is tokenized on its own and appended, so that the response
tokens are exactly those a model generating after the prompt would produce. Sources and the target are then
mapped to token ranges with the rules of :mod:`at2_lens.tasks.spans`.

All validation happens here, before any model work, and raises :class:`at2_lens.errors.InputError` naming the
argument at fault.
"""

from __future__ import annotations

import dataclasses
import operator
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Int
from torch import Tensor

from at2_lens._validate import check_optional_int
from at2_lens.errors import InputError
from at2_lens.tasks.sources import (
    DEFAULT_SEPARATOR,
    Span,
    _is_int,
    _preview,
    join_documents,
    partition,
    validate_spans,
)
from at2_lens.tasks.spans import (
    assign_tokens,
    char_range_to_tokens,
    encode_with_offsets,
    offsets_from_ids,
    ranges_from_assignment,
    require_mapped,
)

PromptFormat = Literal["auto", "chat", "plain"]
UnmappedPolicy = Literal["raise", "drop"]

PLAIN_TEMPLATE = "Context: {context}\n\nQuery: {query}\n\nAnswer:"
"""The prompt layout used when the tokenizer has no chat template (or ``prompt_format="plain"``)."""


@dataclass(frozen=True)
class TargetSpan:
    """A part of the response to attribute: ``[start, end)`` in response characters or in response tokens.

    Token positions count from the first response token (0), not from the start of the prompt.
    """

    start: int
    end: int
    unit: Literal["char", "token"] = "char"

    def __post_init__(self) -> None:
        if self.unit not in ("char", "token"):
            raise InputError(f"target.unit: expected 'char' or 'token', got {self.unit!r}")
        if not _is_int(self.start) or not _is_int(self.end):
            raise InputError(f"target: start and end must be ints, got ({self.start!r}, {self.end!r})")
        object.__setattr__(self, "start", operator.index(self.start))
        object.__setattr__(self, "end", operator.index(self.end))
        if self.end < self.start:
            raise InputError(f"target: span ({self.start}, {self.end}) is reversed (end < start)")
        if self.end == self.start:
            raise InputError(f"target: span ({self.start}, {self.end}) is empty")
        if self.start < 0:
            raise InputError(f"target: span ({self.start}, {self.end}) starts before 0")


def as_target_span(
    target: TargetSpan | Sequence[int] | None, unit: Literal["char", "token"] = "char"
) -> TargetSpan | None:
    """The one coercion of a target: None stays None, a ``TargetSpan`` is kept, a ``(start, end)`` pair becomes a
    ``TargetSpan`` in ``unit`` (response characters by default)."""
    if target is None or isinstance(target, TargetSpan):
        return target
    if isinstance(target, str | bytes) or not isinstance(target, Sequence) or len(target) != 2:
        raise InputError(f"target: expected None, a TargetSpan or a (start, end) pair, got {target!r}")
    return TargetSpan(target[0], target[1], unit)  # type: ignore[arg-type]


@dataclass(frozen=True)
class PromptLayout:
    """A rendered prompt and where the context sits in it (character offsets into ``prompt``)."""

    prompt: str
    context_start: int
    context_end: int
    chat: bool


@dataclass(frozen=True, eq=False)
class TokenizedTask:
    """A task as token ids with exact source and target token ranges (all ranges half-open).

    Character coordinates: ``offsets`` index ``text`` (= ``prompt + response``); ``source_spans`` index
    ``context`` (the joined context, which sits at ``prompt[context_start:context_start + len(context)]``);
    ``target_char_range`` indexes ``response``. Token coordinates (``source_token_ranges``,
    ``target_token_range``) index ``input_ids``.

    Attributes:
        input_ids: prompt tokens followed by response tokens, 1-D int64.
        prompt: the rendered prompt text (chat template or plain layout).
        prompt_len: number of prompt tokens; response tokens start here.
        response: the response text (decoded from the ids when ids were given), or None.
        offsets: ``(start, end)`` characters of ``text`` per token; empty for special tokens added by the
            tokenizer.
        context: the joined context string; context_start: where it starts in ``prompt``.
        granularity: the source granularity name, or ``"custom"``.
        source_spans / source_texts / source_token_ranges: per source, its characters in ``context``, its
            text, and its contiguous token range (disjoint, in order, all within the prompt).
        dropped_sources: spans that mapped to no token (only with ``unmapped_sources="drop"``).
        target_char_range / target_token_range / target_text: the attributed part of the response (None while
            there is no response); the token range holds every token overlapping the character range.
        chat: whether the prompt came from the chat template (then it was tokenized without extra special
            tokens; a plain prompt gets the tokenizer's usual ones, e.g. BOS or [CLS]/[SEP]).
        query: the query text of the ``ContextTask`` this was tokenized from (for reports), or None.
    """

    input_ids: Int[Tensor, " seq"]
    prompt: str
    prompt_len: int
    response: str | None
    offsets: tuple[Span, ...]
    context: str
    context_start: int
    granularity: str
    source_spans: tuple[Span, ...]
    source_texts: tuple[str, ...]
    source_token_ranges: tuple[Span, ...]
    dropped_sources: tuple[Span, ...] = ()
    target_char_range: Span | None = None
    target_token_range: Span | None = None
    target_text: str | None = None
    chat: bool = False
    query: str | None = None

    @property
    def text(self) -> str:
        """The full text the tokens spell: the prompt followed by the response."""
        return self.prompt + (self.response or "")

    @property
    def seq_len(self) -> int:
        """Number of tokens (prompt + response)."""
        return int(self.input_ids.shape[0])

    @property
    def n_sources(self) -> int:
        """Number of sources."""
        return len(self.source_spans)

    @property
    def response_token_range(self) -> Span | None:
        """Token range of the whole response in ``input_ids`` (None before a response is attached)."""
        return None if self.response is None else (self.prompt_len, self.seq_len)

    @property
    def source_prompt_spans(self) -> tuple[Span, ...]:
        """Source character spans in prompt coordinates."""
        return tuple((a + self.context_start, b + self.context_start) for a, b in self.source_spans)

    def token_source_index(self) -> list[int]:
        """For each token, the index of the source whose range holds it, or -1."""
        out = [-1] * self.seq_len
        for i, (a, b) in enumerate(self.source_token_ranges):
            out[a:b] = [i] * (b - a)
        return out

    def target_tokens(self, tokenizer: Any) -> tuple[str, ...]:
        """The target's tokens as strings (each decoded on its own), e.g. to label per-token scores."""
        if self.target_token_range is None:
            raise InputError("task: has no response (no target tokens)")
        t0, t1 = self.target_token_range
        return tuple(tokenizer.decode([int(i)]) for i in self.input_ids[t0:t1])

    @classmethod
    def from_tokens(
        cls,
        tokens: Tensor | Sequence[int],
        sources: Sequence[Sequence[int]],
        target: Sequence[int],
        *,
        tokenizer: Any,
        response_start: int | None = None,
        max_length: int | None = None,
    ) -> TokenizedTask:
        """A task over a token sequence you built yourself (your own prompt format), from token ranges.

        Every method's ``attribute`` takes the result as it takes a tokenized ``ContextTask``; for the same tokens
        and ranges the scores are the same. Ranges are half-open ``(start, end)`` positions in ``tokens``; all are
        checked here, before any model work.

        Args:
            tokens: the whole sequence, prompt then response: 1-D token ids (a ``[1, pos]`` tensor or a list works).
            sources: one token range per source: non-empty, inside the sequence, in order and not overlapping.
            target: the token range to attribute: non-empty, inside the sequence, after every source.
            tokenizer: the model's tokenizer: decodes the texts of the response, the target and each source (its
                tokens' text without surrounding whitespace) for the result.
            response_start: where the response begins (default: the target's start): tokens before it are the
                prompt, tokens from it on the response (``target`` must lie inside the response, every source
                before it).
            max_length: the model's context size; a longer sequence raises InputError.
        """
        ids = _token_list(tokens)
        n = len(ids)
        _check_length(n, 0, max_length)
        vocab = len(tokenizer) if hasattr(tokenizer, "__len__") else None
        if vocab is not None and (min(ids) < 0 or max(ids) >= vocab):
            raise InputError(f"tokens: ids must lie in [0, {vocab}) (the tokenizer's vocabulary), got values in "
                             f"[{min(ids)}, {max(ids)}]")
        if isinstance(sources, str | bytes) or not isinstance(sources, Sequence) or not sources:
            raise InputError(f"sources: expected a non-empty list of (start, end) token ranges, got {sources!r}")
        ranges = [_token_range(s, f"sources[{i}]", n) for i, s in enumerate(sources)]
        for i in range(1, len(ranges)):
            if ranges[i][0] < ranges[i - 1][1]:
                raise InputError(f"sources[{i}]: {ranges[i]} overlaps or precedes sources[{i - 1}] {ranges[i - 1]}; "
                                 "sources must be in order and not overlap")
        t0, t1 = _token_range(target, "target", n)
        last = ranges[-1][1]
        if t0 < last:
            raise InputError(f"target: ({t0}, {t1}) must come after every source (the last ends at {last})")
        if response_start is None:
            response_start = t0
        if not _is_int(response_start) or not last <= operator.index(response_start) <= t0:
            raise InputError(f"response_start: expected an int in [{last}, {t0}] (after the sources, at or before "
                             f"the target), got {response_start!r}")
        p = operator.index(response_start)
        prompt, offsets = offsets_from_ids(tokenizer, ids[:p])
        spans: list[Span] = []
        for i, (a, b) in enumerate(ranges):
            chars = [o for o in offsets[a:b] if o[1] > o[0]]
            # a character split over two sources' tokens (byte-level tokenizers) goes to the earlier source
            start = max(min((c0 for c0, _ in chars), default=0), spans[-1][1] if spans else 0)
            end = max((c1 for _, c1 in chars), default=0)
            if start >= end:
                raise InputError(f"sources[{i}]: tokens ({a}, {b}) decode to no text of their own")
            text = prompt[start:end]
            if text.strip():  # the source's text without the spaces its tokens carry (e.g. a leading "Ġ")
                start, end = start + len(text) - len(text.lstrip()), end - (len(text) - len(text.rstrip()))
            spans.append((start, end))
        cs, ce = spans[0][0], spans[-1][1]
        context = prompt[cs:ce]
        task = cls(
            input_ids=torch.tensor(ids[:p], dtype=torch.long),
            prompt=prompt,
            prompt_len=p,
            response=None,
            offsets=tuple(offsets),
            context=context,
            context_start=cs,
            granularity="custom",
            source_spans=tuple((a - cs, b - cs) for a, b in spans),
            source_texts=tuple(prompt[a:b] for a, b in spans),
            source_token_ranges=tuple(ranges),
        )
        return task.with_response(tokenizer, ids[p:], target=TargetSpan(t0 - p, t1 - p, "token"),
                                  max_length=max_length)

    def with_target(
        self, char_range: Sequence[int] | None = None, token_range: Sequence[int] | None = None
    ) -> TokenizedTask:
        """The same tokens with another target span of the response (no re-tokenization).

        Give ``char_range`` (response characters) or ``token_range`` (response tokens, 0 = first response
        token), or neither for the whole response.
        """
        if char_range is not None and token_range is not None:
            raise InputError("with_target: give char_range or token_range, not both")
        if token_range is not None:
            return self._retarget(as_target_span(token_range, "token"))
        return self._retarget(as_target_span(char_range, "char"))

    def with_response(
        self,
        tokenizer: Any,
        response: str | Sequence[int],
        *,
        target: Sequence[int] | TargetSpan | None = None,
        max_length: int | None = None,
    ) -> TokenizedTask:
        """Attach (or replace) the response, reusing the prompt's tokens.

        ``response`` is text (tokenized on its own, without special tokens) or the exact generated token ids
        (used as they are; pass them without the end-of-sequence token).
        """
        if isinstance(response, str):
            _check_text(response, "response")
            _check_special_tokens(tokenizer, response=response)
            resp_ids, resp_offsets = encode_with_offsets(tokenizer, response, add_special_tokens=False)
            resp_text = response
        else:
            if isinstance(response, Tensor):
                response = response.reshape(-1).tolist()
            ids = list(response)
            if not ids or not all(_is_int(i) for i in ids):
                raise InputError("response: expected a non-empty string or a non-empty sequence of token ids")
            resp_text, resp_offsets = offsets_from_ids(tokenizer, ids)
            resp_ids = [int(i) for i in ids]
            _check_text(resp_text, "response")
        if not resp_ids:
            raise InputError(f"response: {_preview(resp_text)} produced no tokens")
        _check_length(self.prompt_len, len(resp_ids), max_length)
        shift = len(self.prompt)
        prompt_ids = self.input_ids[: self.prompt_len]
        new = dataclasses.replace(
            self,
            input_ids=torch.cat([prompt_ids, torch.tensor(resp_ids, dtype=torch.long)]),
            response=resp_text,
            offsets=self.offsets[: self.prompt_len] + tuple((s + shift, e + shift) for s, e in resp_offsets),
        )
        return new._retarget(as_target_span(target, "char"))

    def _retarget(self, target: TargetSpan | None) -> TokenizedTask:
        """Resolve a target span against the response tokens."""
        if self.response is None:
            if target is not None:
                raise InputError("target: the task has no response yet; attach one with with_response()")
            return dataclasses.replace(self, target_char_range=None, target_token_range=None, target_text=None)
        n_resp = self.seq_len - self.prompt_len
        shift = len(self.prompt)
        resp_offsets = [(s - shift, e - shift) for s, e in self.offsets[self.prompt_len :]]
        if target is None:
            char_range: Span = (0, len(self.response))
            tok_range: Span = (self.prompt_len, self.seq_len)
            text = self.response
        elif target.unit == "char":
            if target.end > len(self.response):
                raise InputError(
                    f"target: char span ({target.start}, {target.end}) lies outside the response "
                    f"(length {len(self.response)})"
                )
            char_range = (target.start, target.end)
            text = self.response[target.start : target.end]
            _check_text(text, "target")
            hit = char_range_to_tokens(resp_offsets, char_range)
            if hit is None:
                raise InputError(f"target: char span {char_range} {_preview(text)} covers no response token")
            tok_range = (hit[0] + self.prompt_len, hit[1] + self.prompt_len)
        else:
            if target.end > n_resp:
                raise InputError(
                    f"target: token span ({target.start}, {target.end}) lies outside the response ({n_resp} tokens)"
                )
            tok_range = (target.start + self.prompt_len, target.end + self.prompt_len)
            spans = [o for o in resp_offsets[target.start : target.end] if o[1] > o[0]]
            char_range = (min(s for s, _ in spans), max(e for _, e in spans)) if spans else (0, 0)
            text = self.response[char_range[0] : char_range[1]]
            _check_text(text, "target")
        return dataclasses.replace(self, target_char_range=char_range, target_token_range=tok_range, target_text=text)


@dataclass(frozen=True)
class ContextTask:
    """What to attribute: a response (generated, or to be generated) to a query about a context.

    Args:
        context: the context text, or a list of documents (joined with ``separator``).
        query: the question or instruction that follows the context.
        response: the response to attribute; None if the model will generate it (attach it with
            ``tokenize(tokenizer, response=...)``).
        sources: a granularity registered in :data:`at2_lens.tasks.sources.PARTITIONERS` (``"token"``,
            ``"word"``, ``"sentence"``, ``"document"``) or a list of ``(start, end)`` character spans of the
            (joined) context.
        target: the part of the response to attribute: a ``(start, end)`` character range of the response, or
            a :class:`TargetSpan` (characters or response tokens); None for the whole response.
        system_prompt: optional system message (chat) or first paragraph (plain format).
        prompt_format: ``"auto"`` (chat template when the tokenizer has one), ``"chat"`` or ``"plain"``.
        separator: what joins a list of documents.
        unmapped_sources: what to do with a source that no token maps to: ``"raise"`` an InputError, or
            ``"drop"`` it (listed in ``TokenizedTask.dropped_sources``).
    """

    context: str | Sequence[str]
    query: str
    response: str | None = None
    sources: str | Sequence[Sequence[int]] = "sentence"
    target: Sequence[int] | TargetSpan | None = None
    system_prompt: str | None = None
    prompt_format: PromptFormat = "auto"
    separator: str = DEFAULT_SEPARATOR
    unmapped_sources: UnmappedPolicy = "raise"

    def __post_init__(self) -> None:
        if isinstance(self.context, Iterable) and not isinstance(self.context, str | bytes):
            object.__setattr__(self, "context", tuple(self.context))
        text, _ = join_documents(self.context, self.separator)
        _check_text(self.query, "query")
        if self.response is not None:
            _check_text(self.response, "response")
        if self.system_prompt is not None and not isinstance(self.system_prompt, str):
            raise InputError(f"system_prompt: expected a str or None, got {type(self.system_prompt).__name__}")
        if self.prompt_format not in ("auto", "chat", "plain"):
            raise InputError(f"prompt_format: expected 'auto', 'chat' or 'plain', got {self.prompt_format!r}")
        if self.unmapped_sources not in ("raise", "drop"):
            raise InputError(f"unmapped_sources: expected 'raise' or 'drop', got {self.unmapped_sources!r}")
        if isinstance(self.sources, str):
            if self.sources != "token":
                partition(self.context, self.sources, separator=self.separator)
        else:
            try:
                raw = list(self.sources)
            except TypeError:
                raise InputError(
                    f"sources: expected a granularity name or a list of (start, end) spans, got {self.sources!r}"
                ) from None
            object.__setattr__(self, "sources", tuple(validate_spans(raw, len(text))))
        target = as_target_span(self.target, "char")
        object.__setattr__(self, "target", target)
        if target is not None and self.response is not None and target.unit == "char":
            if target.end > len(self.response):
                raise InputError(
                    f"target: char span ({target.start}, {target.end}) lies outside the response "
                    f"(length {len(self.response)})"
                )
            _check_text(self.response[target.start : target.end], "target")

    @property
    def context_text(self) -> str:
        """The context as one string (documents joined with ``separator``)."""
        return join_documents(self.context, self.separator)[0]

    @property
    def granularity(self) -> str:
        """The source granularity name, or ``"custom"`` for explicit spans."""
        return self.sources if isinstance(self.sources, str) else "custom"

    def with_response(self, response: str) -> ContextTask:
        """A copy of this task with ``response`` set (for example after generation)."""
        return dataclasses.replace(self, response=response)

    def layout(self, tokenizer: Any) -> PromptLayout:
        """Render the prompt and locate the context in it exactly."""
        use_chat = self.prompt_format == "chat" or (
            self.prompt_format == "auto" and bool(getattr(tokenizer, "chat_template", None))
        )
        if use_chat:
            if not getattr(tokenizer, "chat_template", None):
                raise InputError("prompt_format: 'chat' was asked for but the tokenizer has no chat_template")
            return self._chat_layout(tokenizer)
        return self._plain_layout()

    def build_prompt(self, tokenizer: Any) -> str:
        """The prompt text the model sees before the response."""
        return self.layout(tokenizer).prompt

    def tokenize(
        self,
        tokenizer: Any,
        response: str | Sequence[int] | None = None,
        *,
        max_length: int | None = None,
    ) -> TokenizedTask:
        """Tokenize prompt and response and map sources and target to token ranges.

        Args:
            tokenizer: a Hugging Face fast tokenizer (offsets are needed).
            response: overrides ``self.response``: text, or the exact generated token ids.
            max_length: the model's context size (``n_ctx``); longer inputs raise InputError.
        """
        check_optional_int("max_length", max_length)
        resp = response if response is not None else self.response
        _check_special_tokens(
            tokenizer, context=self.context_text, query=self.query, system_prompt=self.system_prompt or ""
        )
        lay = self.layout(tokenizer)
        ids, offsets = encode_with_offsets(tokenizer, lay.prompt, add_special_tokens=not lay.chat)
        _check_length(len(ids), 0, max_length)
        context = self.context_text
        cs, ce = lay.context_start, lay.context_end
        token_spans = [(max(s, cs) - cs, min(e, ce) - cs) for s, e in offsets if e > s and min(e, ce) > max(s, cs)]
        spans = partition(self.context, self.sources, separator=self.separator, token_spans=token_spans)
        texts = [context[a:b] for a, b in spans]
        assignment = assign_tokens(offsets, [(a + cs, b + cs) for a, b in spans])
        ranges = ranges_from_assignment(assignment, len(spans))
        dropped: list[Span] = []
        if self.unmapped_sources == "drop":
            dropped = [sp for sp, r in zip(spans, ranges, strict=True) if r is None]
            keep = [i for i, r in enumerate(ranges) if r is not None]
            if not keep:
                raise InputError("sources: no source maps to any token")
            spans, texts, ranges = (
                [spans[i] for i in keep],
                [texts[i] for i in keep],
                [ranges[i] for i in keep],
            )
        token_ranges = require_mapped(ranges, texts, spans)
        task = TokenizedTask(
            input_ids=torch.tensor(ids, dtype=torch.long),
            prompt=lay.prompt,
            prompt_len=len(ids),
            response=None,
            offsets=tuple(offsets),
            context=context,
            context_start=cs,
            granularity=self.granularity,
            source_spans=tuple(spans),
            source_texts=tuple(texts),
            source_token_ranges=tuple(token_ranges),
            dropped_sources=tuple(dropped),
            chat=lay.chat,
            query=self.query,
        )
        if resp is None:
            return task
        return task.with_response(tokenizer, resp, target=self.target, max_length=max_length)

    # --------------------------------------------------------------------------------------------------------

    def _plain_layout(self) -> PromptLayout:
        """``[system\\n\\n]Context: …\\n\\nQuery: …\\n\\nAnswer:`` with the context position computed
        directly."""
        context = self.context_text
        head = f"{self.system_prompt}\n\n" if self.system_prompt else ""
        before, after = PLAIN_TEMPLATE.split("{context}")
        prefix = head + before
        prompt = prefix + context + after.format(query=self.query)
        return PromptLayout(prompt, len(prefix), len(prefix) + len(context), chat=False)

    def _chat_layout(self, tokenizer: Any) -> PromptLayout:
        """Render the chat template around a unique placeholder, then put the context in its place.

        The result is checked against a render with the real context; if the template rewrites message content
        (e.g. trims it) the real render is used and the context located in it, and an InputError is raised if
        it cannot be found exactly once.
        """
        context = self.context_text
        placeholder = f"\x00at2ctx{secrets.token_hex(8)}\x00"
        templated = self._render_chat(tokenizer, placeholder)
        if templated.count(placeholder) != 1:
            raise InputError(
                "prompt_format: the chat template rewrites the user message, so the context cannot be "
                "located; use prompt_format='plain'"
            )
        start = templated.index(placeholder)
        prompt = templated.replace(placeholder, context)
        real = self._render_chat(tokenizer, context)
        if real != prompt:
            if real.count(context) != 1:
                raise InputError(
                    "prompt_format: the chat template rewrites the context text, so it cannot be located; "
                    "use prompt_format='plain'"
                )
            prompt, start = real, real.index(context)
        return PromptLayout(prompt, start, start + len(context), chat=True)

    def _render_chat(self, tokenizer: Any, context: str) -> str:
        """Apply the chat template (user message = context + blank line + query; generation prompt added)."""
        user = f"{context}\n\n{self.query}"
        messages = [{"role": "user", "content": user}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        try:
            out = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception:  # some templates reject a system role: fold it into the user turn
            if not self.system_prompt:
                raise
            messages = [{"role": "user", "content": f"{self.system_prompt}\n\n{user}"}]
            out = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if not isinstance(out, str):
            raise InputError(f"tokenizer: apply_chat_template returned {type(out).__name__}, expected str")
        return out


# ------------------------------------------------------------------------------------------------------------


def _token_list(tokens: object) -> list[int]:
    """Token ids as a list of ints: a 1-D (or ``[1, pos]``) integer tensor or a sequence of ints, not empty."""
    if isinstance(tokens, Tensor):
        if tokens.dim() == 2 and tokens.shape[0] == 1:
            tokens = tokens[0]
        if tokens.dim() != 1 or tokens.dtype not in (torch.int64, torch.int32):
            raise InputError(f"tokens: expected 1-D integer token ids (or [1, pos]), got {tokens.dtype} "
                             f"{tuple(tokens.shape)}")
        tokens = tokens.tolist()
    if isinstance(tokens, str | bytes) or not isinstance(tokens, Sequence) or not all(_is_int(t) for t in tokens):
        raise InputError(f"tokens: expected a sequence of token ids, got {type(tokens).__name__}")
    if not tokens:
        raise InputError("tokens: expected at least one token")
    return [operator.index(t) for t in tokens]


def _token_range(value: object, name: str, n: int) -> Span:
    """A non-empty half-open ``(start, end)`` token range inside ``n`` tokens; errors name ``name``."""
    if isinstance(value, str | bytes) or not isinstance(value, Sequence) or len(value) != 2 \
            or not all(_is_int(x) for x in value):
        raise InputError(f"{name}: expected a (start, end) pair of token positions, got {value!r}")
    a, b = (operator.index(x) for x in value)
    if not 0 <= a < b <= n:
        raise InputError(f"{name}: expected 0 <= start < end <= {n} (a non-empty range inside the {n} tokens), "
                         f"got ({a}, {b})")
    return a, b


def _check_text(value: object, name: str) -> None:
    """Raise InputError unless ``value`` is a string with some non-whitespace character."""
    if not isinstance(value, str):
        raise InputError(f"{name}: expected a str, got {type(value).__name__}")
    if not value.strip():
        raise InputError(f"{name}: must not be empty or only whitespace (got {_preview(value)})")


def _check_length(n_prompt: int, n_response: int, max_length: int | None) -> None:
    """Raise InputError if prompt + response tokens exceed ``max_length``."""
    if max_length is None:
        return
    total = n_prompt + n_response
    if total > max_length:
        what = f"prompt ({n_prompt} tokens)" + (
            f" + response ({n_response} tokens) = {total} tokens" if n_response else ""
        )
        raise InputError(f"max_length: {what} exceeds max_length={max_length} (the model's context size)")


def _check_special_tokens(tokenizer: Any, **texts: str) -> None:
    """Raise InputError if a text holds a special token's string (e.g. ``<|im_end|>``): the tokenizer would read
    it as a control token, not as text, silently changing the prompt's structure."""
    specials = [t for t in getattr(tokenizer, "all_special_tokens", []) if isinstance(t, str) and t]
    for name, text in texts.items():
        for tok in specials:
            if tok in text:
                raise InputError(
                    f"{name}: contains the special token {tok!r}, which the tokenizer would read as a control "
                    "token; remove it (for a generated response, strip the end-of-sequence token)"
                )
