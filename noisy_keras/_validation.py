"""Argument checks shared by the modules, with messages that name the argument and the value.

Also the one rule of a global batch's layout (`replica_share`). Imports no TensorFlow.
"""

from __future__ import annotations

import math
import numbers

__all__ = [
    "check_int",
    "check_number",
    "check_positive_int",
    "check_positive_number",
    "is_finite_number",
    "is_int",
    "is_number",
    "replica_share",
]


def is_int(value) -> bool:
    """An integer, bools excluded (True is not a batch size)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A real number, bools excluded."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_finite_number(value) -> bool:
    """A real number that is neither infinite nor NaN, bools excluded."""
    return is_number(value) and math.isfinite(value)


def check_number(name: str, value, allowed: str, is_allowed=lambda _: True, *, label=None) -> float:
    """Returns `value` as a float if it is a finite real number (bools excluded) with `is_allowed`.

    Every number check of the package goes through here (or `check_positive_number`).

    Args:
        name: the argument's name, as the caller passed it.
        value: the value received.
        allowed: what is allowed, as the message says it ("a finite number > 0", ...).
        is_allowed: the range, a predicate on the float.
        label: how the message names the argument at its start (default `name`).

    Raises:
        ValueError: "<label> must be <allowed>; received <name>=<value>."
    """
    if not is_finite_number(value) or not is_allowed(float(value)):
        raise ValueError(f"{label or name} must be {allowed}; received {name}={value!r}.")
    return float(value)


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
    return check_number(name, value, "a finite number > 0", lambda v: v > 0)


def replica_share(batch_size: int, num_replicas: int = 1, micro_batches: int = 1) -> int | None:
    """B / (k R): one replica's share of one micro-batch; None when B does not divide so.

    A global batch of B examples per update is laid out as k micro-batches
    (accumulation steps) of R equal replica shares: how `tf.distribute` splits a
    batch and how accumulation consumes the stream. Every check of that layout
    (the engine's batch split, the multiplicative weights' offsets, the input
    shards, the main job's config) asks this.
    """
    unit = num_replicas * micro_batches
    return None if batch_size % unit else batch_size // unit
