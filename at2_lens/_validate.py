"""Argument checks shared by every public entry point.

Each check returns the (normalised) value or raises :class:`~at2_lens.errors.InputError` with a message that names
the argument and says what was expected, so that bad input is refused before any model work. Use these instead of
writing the same ``isinstance``/range test again.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any, TypeVar

import numpy as np

from at2_lens.errors import InputError

T = TypeVar("T")


def _is_int(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | np.integer)


def _is_real(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float | np.integer | np.floating)


def check_int(name: str, value: Any, *, minimum: int | None = 1, maximum: int | None = None) -> int:
    """An integer (not a bool) in ``[minimum, maximum]``; either bound may be ``None``."""
    ok = _is_int(value) and (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
    if not ok:
        if minimum is not None and maximum is not None:
            want = f"an integer in [{minimum}, {maximum}]"
        elif minimum is not None:
            want = f"an integer >= {minimum}"
        elif maximum is not None:
            want = f"an integer <= {maximum}"
        else:
            want = "an integer"
        raise InputError(f"{name}: expected {want}, got {value!r}")
    return int(value)


def check_optional_int(name: str, value: Any, *, minimum: int | None = 1, maximum: int | None = None) -> int | None:
    """``None`` or an integer as :func:`check_int` accepts it."""
    if value is None:
        return None
    try:
        return check_int(name, value, minimum=minimum, maximum=maximum)
    except InputError:
        lo = "" if minimum is None else f" >= {minimum}"
        raise InputError(f"{name}: expected None or an integer{lo}, got {value!r}") from None


def check_positive(name: str, value: Any, *, allow_zero: bool = False) -> float:
    """A finite real number > 0 (or >= 0 with ``allow_zero``)."""
    if not _is_real(value) or not math.isfinite(float(value)) or value < 0 or (value == 0 and not allow_zero):
        want = "a finite number >= 0" if allow_zero else "a finite number > 0"
        raise InputError(f"{name}: expected {want}, got {value!r}")
    return float(value)


def check_fraction(name: str, value: Any, *, closed: bool = False) -> float:
    """A probability-like number in the open interval (0, 1), or the closed [0, 1] with ``closed``."""
    inside = _is_real(value) and math.isfinite(float(value))
    inside = inside and ((0.0 <= value <= 1.0) if closed else (0.0 < value < 1.0))
    if not inside:
        raise InputError(f"{name}: expected a number in {'[0, 1]' if closed else '(0, 1)'}, got {value!r}")
    return float(value)


def check_choice(name: str, value: T, choices: Collection[T]) -> T:
    """One of ``choices``."""
    if value not in choices:
        raise InputError(f"{name}: expected one of {sorted(map(str, choices))}, got {value!r}")
    return value


def check_type(name: str, value: Any, expected: type | tuple[type, ...], what: str | None = None) -> Any:
    """An instance of ``expected``; ``what`` overrides the description in the message."""
    if not isinstance(value, expected):
        names = what or (
            expected.__name__ if isinstance(expected, type) else " or ".join(t.__name__ for t in expected)
        )
        raise InputError(f"{name}: expected {names}, got {type(value).__name__}")
    return value


__all__ = ["check_choice", "check_fraction", "check_int", "check_optional_int", "check_positive", "check_type"]
