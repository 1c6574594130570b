"""A HotpotQA *format* fixture: hand-written examples in the layout of HotpotQA's published JSON files, not real data.

The text is invented. It exercises what the loader must get right: titled paragraphs whose sentences carry HotpotQA's
leading spaces, a sentence boundary after "U.S." that the library's own sentence splitter would not cut, one sentence
holding "!" followed by a capital that it would cut, a blank sentence, and a supporting fact that names a sentence
index the paragraph does not have (a few real examples do). ``to_hub_layout`` reshapes an example into the rows of
the hub dataset ``hotpotqa/hotpot_qa`` (configuration ``distractor``).
"""

from __future__ import annotations

from typing import Any

EXAMPLES: list[dict[str, Any]] = [
    {
        "_id": "fixture-bridge-1",
        "question": "In which year was the band that recorded Lantern Roads formed?",
        "answer": "1994",
        "type": "bridge",
        "level": "medium",
        "supporting_facts": [["Lantern Roads", 0], ["The Quiet Harbour", 1], ["The Quiet Harbour", 7]],
        "context": [
            ["Lantern Roads", [
                "Lantern Roads is the third studio album by the folk group The Quiet Harbour.",
                " It was recorded over two winters in a converted mill.",
            ]],
            ["The Quiet Harbour", [
                "The Quiet Harbour is a folk band from the U.S.",
                " The group was formed in 1994 by two sisters from Maine.",
                " ",
                " Their motto is \"Onward! Always\" and it is printed on every sleeve.",
            ]],
            ["Copper Valley", [
                "Copper Valley is a mining town in the north of the province.",
                " Its population was 4,210 at the last census.",
            ]],
        ],
    },
    {
        "_id": "fixture-comparison-2",
        "question": "Are Lake Merrow and Lake Tansey both in the same country?",
        "answer": "yes",
        "type": "comparison",
        "level": "hard",
        "supporting_facts": [["Lake Merrow", 0], ["Lake Tansey", 0]],
        "context": [
            ["Lake Tansey", ["Lake Tansey is a glacial lake in Norway.", " It freezes every winter."]],
            ["Lake Merrow", ["Lake Merrow is a reservoir in Norway, built in 1962."]],
        ],
    },
]
"""Two examples in HotpotQA's JSON layout (``_id``; context = ``[[title, [sentence, ...]], ...]``)."""


def to_hub_layout(example: dict[str, Any]) -> dict[str, Any]:
    """The same example as a row of the hub's ``distractor`` configuration (``id``; columnar context and facts)."""
    return {
        "id": example["_id"],
        "question": example["question"],
        "answer": example["answer"],
        "type": example["type"],
        "level": example["level"],
        "supporting_facts": {"title": [t for t, _ in example["supporting_facts"]],
                             "sent_id": [k for _, k in example["supporting_facts"]]},
        "context": {"title": [t for t, _ in example["context"]],
                    "sentences": [s for _, s in example["context"]]},
    }
