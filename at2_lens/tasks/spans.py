"""Exact character ↔ token mapping, from a fast tokenizer's offset mapping.

The rule for a token that straddles a source boundary (a custom span that cuts a word, or a byte-level token
``"Ġword"`` whose leading space lies outside every source): **the token goes to the source it shares the most
characters with; on a tie, to the earlier source.** Tokens that share no character with any source (template
text, whitespace between sentences, special tokens with empty offsets) belong to no source. Each source's
tokens are then reported as one contiguous range ``[first, last + 1)``; a token with empty offsets that sits
strictly inside that range (rare) is absorbed into it.

Offsets are in characters of a Python ``str`` (code points), as Hugging Face fast tokenizers report them.
Byte-level tokenizers may emit several tokens for one character (each holding some of its UTF-8 bytes); they
all get that character's offsets, so they all land in the same source.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

from at2_lens.errors import InputError
from at2_lens.tasks.sources import Span, _preview


def cut_spans(text: str, spans: Sequence[Span], keep: Sequence[bool]) -> str:
    """``text`` with the characters of every span whose ``keep`` entry is false cut out (spans disjoint, in order);
    the text between spans stays. What ``remove``-mode ablation and context pruning feed the model."""
    pieces, pos = [], 0
    for kept, (a, b) in zip(keep, spans, strict=True):
        if not kept:
            pieces.append(text[pos:a])
            pos = b
    pieces.append(text[pos:])
    return "".join(pieces)


def source_holding(context: str, spans: Sequence[Span], answers: Sequence[str]) -> int | None:
    """Index of the span holding the first occurrence in ``context`` of the first answer (in order) that occurs at
    all, by its first character; None when no answer occurs or its start lies between spans."""
    for answer in answers:
        at = context.find(answer)
        if at >= 0:
            return next((i for i, (start, end) in enumerate(spans) if start <= at < end), None)
    return None


def encode_with_offsets(tokenizer: Any, text: str, *, add_special_tokens: bool) -> tuple[list[int], list[Span]]:
    """Token ids and character offsets of ``text`` (needs a Hugging Face *fast* tokenizer)."""
    try:
        enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    except NotImplementedError as exc:  # slow (Python) tokenizers cannot report offsets
        raise InputError(
            f"tokenizer: {type(tokenizer).__name__} cannot return offsets; use a fast (tokenizers-backed) tokenizer"
        ) from exc
    ids = [int(i) for i in enc["input_ids"]]
    offsets = [(int(s), int(e)) for s, e in enc["offset_mapping"]]
    if len(ids) != len(offsets):
        raise InputError("tokenizer: returned a different number of ids and offsets")
    return ids, offsets


def offsets_from_ids(tokenizer: Any, ids: Sequence[int]) -> tuple[str, list[Span]]:
    """Decode token ids and recover each token's character offsets in the decoded text.

    If re-encoding the decoded text gives back the same ids, its offsets are used (exact). Otherwise offsets
    come from decoding growing prefixes: token i covers the characters its prefix added; a token that adds no
    whole character (it holds some bytes of the next one) gets that next character.
    """
    ids = [int(i) for i in ids]
    text: str = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    again, offsets = encode_with_offsets(tokenizer, text, add_special_tokens=False)
    if again == ids:
        return text, offsets
    bounds = [0]
    for i in range(1, len(ids) + 1):
        prefix = tokenizer.decode(ids[:i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        n = 0
        for a, b in zip(prefix, text, strict=False):
            if a != b:
                break
            n += 1
        bounds.append(max(n, bounds[-1]))
    bounds[-1] = len(text)
    # a token that adds no whole character holds bytes of the next one: give it that character
    return text, [
        (bounds[i], bounds[i + 1] if bounds[i + 1] > bounds[i] else min(bounds[i] + 1, len(text)))
        for i in range(len(ids))
    ]


def assign_tokens(offsets: Sequence[Span], spans: Sequence[Span]) -> list[int]:
    """For each token, the index of the source it belongs to, or -1 for none.

    ``spans`` must be sorted and disjoint (as :func:`at2_lens.tasks.sources.validate_spans` returns them) and
    in the same coordinates as ``offsets``. Rule: most shared characters wins; ties go to the earlier source.
    """
    ends = [e for _, e in spans]
    out: list[int] = []
    for s, e in offsets:
        best, best_overlap = -1, 0
        if e > s:
            j = bisect.bisect_right(ends, s)  # first span whose end is past the token's start
            while j < len(spans) and spans[j][0] < e:
                overlap = min(e, spans[j][1]) - max(s, spans[j][0])
                if overlap > best_overlap:
                    best, best_overlap = j, overlap
                j += 1
        out.append(best)
    return out


def ranges_from_assignment(assignment: Sequence[int], n_sources: int) -> list[Span | None]:
    """Turn a per-token source assignment into one contiguous token range per source (None where it has none).

    Raises InputError if two sources' tokens interleave (only possible with non-monotone tokenizer offsets).
    """
    first: list[int | None] = [None] * n_sources
    last: list[int] = [0] * n_sources
    for t, s in enumerate(assignment):
        if s < 0:
            continue
        if first[s] is None:
            first[s] = t
        last[s] = t
    ranges: list[Span | None] = [None if f is None else (f, last[i] + 1) for i, f in enumerate(first)]
    prev_i, prev_end = -1, 0
    for i, r in enumerate(ranges):
        if r is None:
            continue
        if r[0] < prev_end:
            raise InputError(
                f"sources: the tokens of source {prev_i} and source {i} interleave (token {r[0]}); "
                "the tokenizer's offsets are not in order"
            )
        prev_i, prev_end = i, r[1]
    return ranges


def source_token_ranges(offsets: Sequence[Span], spans: Sequence[Span]) -> list[Span | None]:
    """Contiguous token range of each source (None for a source no token overlaps); see the module rule."""
    return ranges_from_assignment(assign_tokens(offsets, spans), len(spans))


def char_range_to_tokens(offsets: Sequence[Span], char_range: Span) -> Span | None:
    """The smallest contiguous token range holding every token that overlaps ``char_range`` (None if none
    does)."""
    a, b = char_range
    hit = [t for t, (s, e) in enumerate(offsets) if e > s and min(e, b) > max(s, a)]
    return (hit[0], hit[-1] + 1) if hit else None


def require_mapped(ranges: Sequence[Span | None], texts: Sequence[str], spans: Sequence[Span]) -> list[Span]:
    """Return the ranges, or raise InputError naming the first source that maps to no token."""
    for i, r in enumerate(ranges):
        if r is None:
            raise InputError(
                f"sources[{i}]: source {spans[i]} {_preview(texts[i])} maps to no token (the tokenizer drops "
                "these characters, or a neighbouring source overlaps its only token more); merge it with a "
                "neighbour or pass unmapped_sources='drop'"
            )
    return [r for r in ranges if r is not None]
