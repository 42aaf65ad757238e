"""Argument checks shared by the modules, with messages that name the argument and the value."""

from __future__ import annotations

import numbers


def check_int(name: str, value, minimum: int = 0) -> int:
    """Returns `value` as an int if it is an integer >= `minimum` (bools excluded).

    Raises:
        ValueError: "<name> must be an integer >= <minimum>; received <name>=<value>."
    """
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; received {name}={value!r}.")
    return int(value)
