"""SQuAD answer scores: normalisation, exact match, token F1, containment (checked on hand-worked cases)."""

from __future__ import annotations

import pytest

from at2_lens.errors import InputError
from at2_lens.evaluation.answers import answer_scores, contains_answer, exact_match, normalize_answer, token_f1

pytestmark = pytest.mark.line_independent


def test_normalisation_follows_squad() -> None:
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert normalize_answer("an Apple, a pear") == "apple pear"
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words


def test_exact_match_takes_the_best_gold() -> None:
    assert exact_match("the 10th century.", ["10th century", "the first half of the 10th century"]) == 1.0
    assert exact_match("10th", ["10th century"]) == 0.0
    assert exact_match("", []) == 1.0 and exact_match("France", []) == 0.0  # unanswerable


def test_token_f1_by_hand() -> None:
    # prediction "normans were in france" vs gold "france": 1 common token, P = 1/4, R = 1 -> F1 = 0.4
    assert token_f1("The Normans were in France.", ["France"]) == pytest.approx(0.4)
    assert token_f1("10th century", ["in the 10th and 11th centuries", "10th century"]) == pytest.approx(1.0)
    # repeated tokens count by multiplicity: "a b b" vs "b b c" -> common 2, P = R = 2/3
    assert token_f1("x y y", ["y y z"]) == pytest.approx(2 / 3)
    assert token_f1("Paris", ["Rome"]) == 0.0


def test_contains_and_bundle() -> None:
    assert contains_answer("It is located in France.", ["France", "Normandy"])
    assert not contains_answer("It is in Spain.", ["France"])
    assert answer_scores("France", ["France"]) == {"exact_match": 1.0, "f1": 1.0, "contains": 1.0}


@pytest.mark.parametrize(("prediction", "golds", "name"), [(3, ["a"], "prediction"), ("a", "a", "golds"),
                                                           ("a", ["a", 1], "golds")])
def test_bad_input_names_the_argument(prediction: object, golds: object, name: str) -> None:
    with pytest.raises(InputError, match=f"^{name}:"):
        token_f1(prediction, golds)  # type: ignore[arg-type]
