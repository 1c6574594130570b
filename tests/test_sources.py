"""Sources: partitioners, span validation, the sentence splitter and the token-assignment rule (no tokenizer)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from at2_lens.errors import InputError
from at2_lens.tasks import (
    PARTITIONERS,
    PartitionInput,
    Span,
    assign_tokens,
    char_range_to_tokens,
    join_documents,
    partition,
    register_partitioner,
    source_token_ranges,
    split_sentences,
    validate_spans,
)

pytestmark = pytest.mark.line_independent  # no TransformerLens model or backend code runs here


def texts(text: str, spans: list[Span]) -> list[str]:
    return [text[a:b] for a, b in spans]


# ---------------------------------------------------------------------------------------------------------------
# join_documents / validate_spans


def test_join_documents_spans_and_separator() -> None:
    text, docs = join_documents(["Alpha.", "Beta gamma.", "Delta"], separator=" || ")
    assert text == "Alpha. || Beta gamma. || Delta"
    assert texts(text, list(docs)) == ["Alpha.", "Beta gamma.", "Delta"]
    text, docs = join_documents("just a string")
    assert docs == ((0, len(text)),)


@pytest.mark.parametrize(
    ("context", "match"),
    [
        ("", r"^context: "),
        ("  \n\t ", r"^context: "),
        ([], r"^context: .*empty"),
        (["a", "  "], r"^context\[1\]: .*whitespace"),
        (["same", "other", "same"], r"^context\[2\]: duplicate of document 0"),
        ([1, 2], r"^context: expected"),
    ],
)
def test_join_documents_errors(context: object, match: str) -> None:
    with pytest.raises(InputError, match=match):
        join_documents(context)  # type: ignore[arg-type]


def test_join_documents_empty_separator() -> None:
    with pytest.raises(InputError, match=r"^separator"):
        join_documents(["a", "b"], separator="")


def test_validate_spans_accepts_arrays_and_numpy_ints() -> None:
    spans = validate_spans([(np.int64(0), np.int32(3)), [5, 7]], 10)
    assert spans == [(0, 3), (5, 7)]
    assert all(type(x) is int for sp in spans for x in sp)
    assert validate_spans(np.array([[0, 3], [5, 7]]), 10) == [(0, 3), (5, 7)]
    assert validate_spans(torch.tensor([[0, 3], [5, 7]]), 10) == [(0, 3), (5, 7)]


def test_validate_spans_requires_text_order() -> None:
    with pytest.raises(InputError, match=r"^sources\[1\]: span \(0, 3\) comes before sources\[0\] = \(5, 7\)"):
        validate_spans([(5, 7), (0, 3)], 10)


@pytest.mark.parametrize(
    ("spans", "match"),
    [
        ([(0, 3), (4, 2)], r"^sources\[1\]: .*reversed"),
        ([(0, 3), (3, 3)], r"^sources\[1\]: .*empty"),
        ([(0, 3), (8, 11)], r"^sources\[1\]: .*outside"),
        ([(-1, 2)], r"^sources\[0\]: .*outside"),
        ([(0, 5), (6, 8), (4, 6)], r"^sources\[2\]: .*overlaps"),
        ([(0, 2.0)], r"^sources\[0\]: expected"),
        ([(0, 1.5)], r"^sources\[0\]: expected"),
        ([(0, 1, 2)], r"^sources\[0\]: expected"),
        (["ab"], r"^sources\[0\]: expected"),
        ([], r"^sources: no spans"),
    ],
)
def test_validate_spans_errors_name_the_index(spans: list, match: str) -> None:
    with pytest.raises(InputError, match=match):
        validate_spans(spans, 10)


def test_validate_spans_overlap_names_both() -> None:
    with pytest.raises(InputError, match=r"sources\[2\]: span \(4, 6\) overlaps sources\[0\] = \(0, 5\)"):
        validate_spans([(0, 5), (6, 8), (4, 6)], 10)


# ---------------------------------------------------------------------------------------------------------------
# partitioners


def test_word_sources() -> None:
    text = "  Hello,  world!\n\tfoo-bar 😀 世界  "
    assert texts(text, partition(text, "word")) == ["Hello,", "world!", "foo-bar", "😀", "世界"]


def test_document_sources() -> None:
    docs = ["First doc. Two sentences.", "Second doc."]
    text, _ = join_documents(docs)
    assert texts(text, partition(docs, "document")) == docs
    assert texts("one string", partition("one string", "document")) == ["one string"]


def test_sentences_never_cross_documents() -> None:
    docs = ["no final stop", "and this continues"]
    text, _ = join_documents(docs, separator=" ")
    assert texts(text, partition(docs, "sentence", separator=" ")) == docs
    assert texts(text, partition(docs, "word", separator=" ")) == text.split()


def test_custom_sources_validated_against_joined_context() -> None:
    docs = ["abc", "def"]
    assert partition(docs, [(0, 3), (5, 8)]) == [(0, 3), (5, 8)]
    with pytest.raises(InputError, match=r"^sources\[0\]: .*outside"):
        partition(docs, [(5, 9)])


def test_unknown_granularity_lists_registered() -> None:
    with pytest.raises(InputError, match=r"unknown granularity 'paragraph'.*'sentence'"):
        partition("text", "paragraph")


def test_token_granularity_needs_token_spans() -> None:
    with pytest.raises(InputError, match=r"needs a tokenizer"):
        partition("some text", "token")
    # with token spans: clipped to documents, shared characters merged, order kept
    docs = ["ab cd", "ef"]
    text, _ = join_documents(docs)  # "ab cd\n\nef"
    spans = partition(docs, "token", token_spans=[(0, 2), (2, 5), (3, 5), (5, 8), (8, 9)])
    assert spans == [(0, 2), (2, 5), (7, 8), (8, 9)]
    assert texts(text, spans) == ["ab", " cd", "e", "f"]


def test_register_new_partitioner() -> None:
    """A new source type is one function in the registry."""

    @register_partitioner("line")
    def line_sources(ctx: PartitionInput) -> list[Span]:
        out: list[Span] = []
        pos = 0
        for line in ctx.text.split("\n"):
            out.append((pos, pos + len(line)))
            pos += len(line) + 1
        return out

    try:
        text = "one\n\n  \ntwo three\nfour"
        # empty and whitespace-only lines are dropped by partition()
        assert texts(text, partition(text, "line")) == ["one", "two three", "four"]
    finally:
        del PARTITIONERS["line"]


def test_whitespace_only_context_never_partitions() -> None:
    with pytest.raises(InputError, match=r"^context"):
        partition("   ", "word")


# ---------------------------------------------------------------------------------------------------------------
# sentence splitter

SENTENCE_CASES = [
    (
        "Dr. Smith went to Washington. He arrived late! Did he? Yes.",
        ["Dr. Smith went to Washington.", "He arrived late!", "Did he?", "Yes."],
    ),
    (
        "We use e.g. apples, i.e. fruit. The U.S. Army is big. J. R. R. Tolkien wrote. Pi is 3.14. Next.",
        ["We use e.g. apples, i.e. fruit.", "The U.S. Army is big.", "J. R. R. Tolkien wrote.", "Pi is 3.14.", "Next."],
    ),
    (
        "Title\nThis line is\nwrapped here. New one.\n\nPara two.\n- item one\n- item two",
        ["Title", "This line is\nwrapped here.", "New one.", "Para two.", "- item one", "- item two"],
    ),
    ("这是第一句。这是第二句！第三句？", ["这是第一句。", "这是第二句！", "第三句？"]),
    ('He said "Stop." Then he left.', ['He said "Stop."', "Then he left."]),
    ("Wait... What happened? (Nobody knows.) OK", ["Wait...", "What happened?", "(Nobody knows.)", "OK"]),
    ("Steps:\n1. Mix it.\n2. Bake it.", ["Steps:", "1. Mix it.", "2. Bake it."]),
    ("lower case start. still same? no, it goes on.", ["lower case start. still same? no, it goes on."]),
    ("It costs approx. 5 dollars vs. 6 euros etc. Fine.", ["It costs approx. 5 dollars vs. 6 euros etc.", "Fine."]),
    ("  \n  Leading and trailing space.  \n ", ["Leading and trailing space."]),
    ("Windows\r\nline endings.\r\n\r\nNext para.", ["Windows\r\nline endings.", "Next para."]),
    ("A title\r\nBody text.", ["A title", "Body text."]),
]


@pytest.mark.parametrize(("text", "expected"), SENTENCE_CASES)
def test_split_sentences(text: str, expected: list[str]) -> None:
    assert texts(text, split_sentences(text)) == expected


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab A.!?\n 。e.g\"')")) | st.characters(), max_size=80))
def test_split_sentences_properties(text: str) -> None:
    spans = split_sentences(text)
    for (_, b), (c, _) in itertools.pairwise(spans):
        assert b <= c
    for a, b in spans:
        piece = text[a:b]
        assert piece and piece == piece.strip()
    covered = {i for a, b in spans for i in range(a, b)}
    assert all(text[i].isspace() for i in range(len(text)) if i not in covered)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=20).filter(str.strip), min_size=1, max_size=5, unique=True))
def test_partitions_cover_documents(docs: list[str]) -> None:
    text, doc_spans = join_documents(docs)
    for gran in ("word", "sentence", "document"):
        spans = partition(docs, gran)
        # every source lies within one document, sources in order and disjoint
        for a, b in spans:
            assert any(da <= a and b <= db for da, db in doc_spans)
            assert text[a:b].strip()
        for (_, b), (c, _) in itertools.pairwise(spans):
            assert b <= c
        # non-whitespace characters of every document are all covered
        covered = {i for a, b in spans for i in range(a, b)}
        for da, db in doc_spans:
            assert all(text[i].isspace() or i in covered for i in range(da, db))


# ---------------------------------------------------------------------------------------------------------------
# the token-assignment rule, on synthetic offsets


def test_assign_tokens_rule() -> None:
    spans = [(0, 5), (5, 10), (12, 14)]
    offsets = [
        (0, 0),  # special token: no source
        (0, 3),  # inside source 0
        (3, 7),  # straddles 0|1 with 2 chars each: tie -> earlier source (0)
        (7, 10),  # source 1
        (9, 13),  # 1 char of source 1, 1 of source 2: tie -> 1
        (13, 16),  # 1 char of source 2, rest outside -> 2
        (16, 18),  # outside every source
    ]
    assert assign_tokens(offsets, spans) == [-1, 0, 0, 1, 1, 2, -1]
    assert source_token_ranges(offsets, spans) == [(1, 3), (3, 5), (5, 6)]


def test_assign_tokens_majority_wins_and_unmapped_source() -> None:
    # "hello" is one token; custom spans "he" | "llo": the token goes to "llo", "he" gets no token
    assert assign_tokens([(0, 5)], [(0, 2), (2, 5)]) == [1]
    assert source_token_ranges([(0, 5)], [(0, 2), (2, 5)]) == [None, (0, 1)]


def test_byte_fragments_share_a_source() -> None:
    # three byte tokens of one character (offsets (4, 5) each) go together
    offsets = [(0, 4), (4, 5), (4, 5), (4, 5), (5, 6)]
    assert assign_tokens(offsets, [(0, 4), (4, 5), (5, 6)]) == [0, 1, 1, 1, 2]


def test_char_range_to_tokens() -> None:
    offsets = [(0, 3), (3, 3), (3, 6), (6, 9)]
    assert char_range_to_tokens(offsets, (4, 5)) == (2, 3)
    assert char_range_to_tokens(offsets, (2, 7)) == (0, 4)
    assert char_range_to_tokens(offsets, (9, 10)) is None


def _brute_force(offsets: list[Span], spans: list[Span]) -> list[int]:
    out = []
    for s, e in offsets:
        overlaps = [max(0, min(e, b) - max(s, a)) for a, b in spans]
        best = max(overlaps, default=0)
        out.append(overlaps.index(best) if best > 0 else -1)
    return out


@st.composite
def offsets_and_spans(draw: st.DrawFn) -> tuple[list[Span], list[Span]]:
    """Monotone token offsets (possibly sharing characters, possibly empty) and disjoint sorted spans."""
    n = draw(st.integers(1, 60))
    cuts = sorted(draw(st.lists(st.integers(0, n), min_size=2, max_size=30)))
    offsets: list[Span] = []
    for a, b in itertools.pairwise(cuts):
        reps = draw(st.integers(1, 3)) if b - a == 1 else 1  # byte fragments of one character
        offsets.extend([(a, b)] * reps)
    points = sorted(set(draw(st.lists(st.integers(0, n), min_size=2, max_size=20))))
    spans = [(a, b) for i, (a, b) in enumerate(itertools.pairwise(points)) if i % 2 == 0 or draw(st.booleans())]
    spans = [sp for sp in spans if sp[1] > sp[0]]
    return offsets, spans


@settings(max_examples=500, deadline=None)
@given(offsets_and_spans())
def test_assign_tokens_matches_brute_force(data: tuple[list[Span], list[Span]]) -> None:
    offsets, spans = data
    assignment = assign_tokens(offsets, spans)
    assert assignment == _brute_force(offsets, spans)
    ranges = source_token_ranges(offsets, spans)
    # ranges disjoint and in source order; each holds exactly its tokens (plus none of another source)
    present = [r for r in ranges if r is not None]
    for (_, b), (c, _) in itertools.pairwise(present):
        assert b <= c
    for i, r in enumerate(ranges):
        mine = [t for t, s in enumerate(assignment) if s == i]
        if r is None:
            assert not mine
            continue
        assert mine[0] == r[0] and mine[-1] == r[1] - 1
        assert all(assignment[t] in (i, -1) for t in range(*r))
    # exactly the tokens that intersect some source are assigned
    intersects = [any(min(e, b) > max(s, a) for a, b in spans) for s, e in offsets]
    assert [a >= 0 for a in assignment] == intersects


def test_ordinary_words_that_look_like_abbreviations_end_sentences() -> None:
    from at2_lens.tasks import split_sentences

    text = "The cat sat. The dog ran. He said no. It was on Sat. Jan. 5 at noon."
    got = [text[a:b] for a, b in split_sentences(text)]
    assert got == ["The cat sat.", "The dog ran.", "He said no.", "It was on Sat. Jan. 5 at noon."]


def test_source_holding_finds_the_span_of_the_first_answer_that_occurs() -> None:
    from at2_lens.tasks.spans import source_holding

    context = "Paris is in France. Rome is in Italy. Rome again."
    spans = [(0, 19), (20, 37), (38, 49)]
    assert source_holding(context, spans, ["Italy"]) == 1
    assert source_holding(context, spans, ["Spain", "Rome"]) == 1  # first occurrence of the first answer found
    assert source_holding(context, spans, ["Spain"]) is None
    assert source_holding(context, [(0, 19), (25, 37)], ["Rome"]) is None  # its start lies between spans
