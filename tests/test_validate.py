"""The shared argument checks: each accepts what it documents and names the argument when it refuses."""

from __future__ import annotations

import numpy as np
import pytest

from at2_lens._validate import (
    check_choice,
    check_fraction,
    check_int,
    check_optional_int,
    check_positive,
    check_type,
)
from at2_lens.errors import InputError

pytestmark = pytest.mark.line_independent  # no TransformerLens model or backend code runs here


def test_check_int_accepts_numpy_and_bounds() -> None:
    assert check_int("n", np.int64(3)) == 3
    assert check_int("n", 0, minimum=0) == 0
    assert check_int("n", 5, minimum=None, maximum=5) == 5


@pytest.mark.parametrize("bad", [0, -1, True, 1.0, "2", None])
def test_check_int_refuses_and_names(bad: object) -> None:
    with pytest.raises(InputError, match=r"^n_steps: expected an integer >= 1"):
        check_int("n_steps", bad)


def test_check_int_range_message() -> None:
    with pytest.raises(InputError, match=r"k: expected an integer in \[1, 4\], got 9"):
        check_int("k", 9, maximum=4)


def test_check_optional_int() -> None:
    assert check_optional_int("b", None) is None
    assert check_optional_int("b", 2) == 2
    with pytest.raises(InputError, match="b: expected None or an integer >= 1"):
        check_optional_int("b", 0)


@pytest.mark.parametrize("bad", [0, -0.5, float("nan"), float("inf"), True, "1"])
def test_check_positive_refuses(bad: object) -> None:
    with pytest.raises(InputError, match="lr: expected a finite number > 0"):
        check_positive("lr", bad)


def test_check_positive_allow_zero() -> None:
    assert check_positive("alpha", 0, allow_zero=True) == 0.0


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.1, float("nan")])
def test_check_fraction_open(bad: float) -> None:
    with pytest.raises(InputError, match=r"keep_prob: expected a number in \(0, 1\)"):
        check_fraction("keep_prob", bad)


def test_check_fraction_closed() -> None:
    assert check_fraction("p", 1, closed=True) == 1.0
    assert check_fraction("p", 0.0, closed=True) == 0.0


def test_check_choice_and_type() -> None:
    assert check_choice("mode", "mask", ("mask", "remove")) == "mask"
    with pytest.raises(InputError, match=r"mode: expected one of \['mask', 'remove'\], got 'drop'"):
        check_choice("mode", "drop", ("mask", "remove"))
    with pytest.raises(InputError, match="task: expected ContextTask, got int"):
        check_type("task", 3, dict, what="ContextTask")
