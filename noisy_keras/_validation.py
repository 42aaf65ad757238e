"""Argument checks shared by the modules, with messages that name the argument and the value."""

from __future__ import annotations

import math
import numbers

__all__ = ["check_int", "check_positive_int", "check_positive_number", "is_int", "is_number"]


def is_int(value) -> bool:
    """An integer, bools excluded (True is not a batch size)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A real number, bools excluded."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_int(name: str, value, minimum: int = 0) -> int:
    """Returns `value` as an int if it is an integer >= `minimum` (bools excluded).

    Raises:
        ValueError: "<name> must be an integer >= <minimum>; received <name>=<value>."
    """
    if not is_int(value) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; received {name}={value!r}.")
    return int(value)


def check_positive_int(name: str, value) -> int:
    """`check_int` with minimum 1."""
    return check_int(name, value, 1)


def check_positive_number(name: str, value) -> float:
    """Returns `value` as a float if it is a finite number > 0.

    Raises:
        ValueError: "<name> must be a finite number > 0; received <name>=<value>."
    """
    if not is_number(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0; received {name}={value!r}.")
    return float(value)
