"""The shared argument checks and the one rule of a global batch's layout (no TensorFlow)."""

import math

import pytest

from noisy_keras._validation import check_number, check_positive_number, replica_share


def test_replica_share_is_one_replicas_part_of_one_micro_batch():
    assert replica_share(96, num_replicas=2, micro_batches=3) == 16
    assert replica_share(96) == 96
    assert replica_share(100, num_replicas=2, micro_batches=3) is None  # 100 = 6 x 16 + 4
    assert replica_share(6, num_replicas=3, micro_batches=2) == 1


@pytest.mark.parametrize("value", [True, "2", math.nan, math.inf, None, -1.0, 0])
def test_a_number_outside_its_range_is_named_with_its_value(value):
    with pytest.raises(
        ValueError, match=rf"^rate must be a finite number > 0; received rate={value!r}\.$"
    ):
        check_positive_number("rate", value)


def test_check_number_returns_a_float_and_can_label_the_argument():
    assert check_number("decay", 0, "a number in [0, 1)", lambda v: 0 <= v < 1) == 0.0
    with pytest.raises(
        ValueError, match=r"^`decay` must be a number in \[0, 1\); received decay=1\.$"
    ):
        check_number("decay", 1, "a number in [0, 1)", lambda v: 0 <= v < 1, label="`decay`")
