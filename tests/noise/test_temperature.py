"""The temperature deficit s^2 = max(0, (B/b)/m - 1): known values, the rule it encodes, errors."""

import math

import pytest

from noisy_keras.noise.temperature import lr_multiplier_for_rule, temperature_deficit
from noisy_keras.optim import lr as lr_lib


@pytest.mark.parametrize(
    "batch_size, small_batch_size, rule, expected",
    [
        (512, 32, "none", 15.0),  # B/b - 1: Wu et al.'s choice, Sigma (1/b - 1/B)
        (512, 32, "sqrt", 3.0),  # sqrt(16) - 1
        (512, 32, "linear", 0.0),  # linear scaling already has the small batch's temperature
        (32, 32, "none", 0.0),  # B = b
        (1024, 32, "none", 31.0),
        (128, 32, "sqrt", 1.0),
    ],
)
def test_deficit_per_scaling_rule(batch_size, small_batch_size, rule, expected):
    m = lr_multiplier_for_rule(rule, batch_size, small_batch_size)
    assert temperature_deficit(batch_size, small_batch_size, m) == expected


def test_deficit_restores_the_small_batch_temperature():
    # T = eta (1 + s^2) / B with eta = m eta_b must equal eta_b / b whenever s^2 > 0.
    for batch_size in (64, 96, 512, 1000):
        for small_batch_size in (8, 32):
            for m in (1.0, 1.5, math.sqrt(batch_size / small_batch_size)):
                s2 = temperature_deficit(batch_size, small_batch_size, m)
                assert s2 > 0
                assert m * (1 + s2) / batch_size == pytest.approx(1 / small_batch_size, rel=1e-14)


def test_negative_deficit_is_clamped_to_zero():
    assert temperature_deficit(16, 32) == 0.0  # a smaller batch than the target
    assert temperature_deficit(512, 32, 32.0) == 0.0  # more than linear scaling


def test_rounded_linear_multiplier_gives_exactly_zero():
    # (0.03 * 15) / 0.03 is 14.999999999999998 in floats: (B/b)/m - 1 would be 2.2e-16.
    m = lr_lib.scale_learning_rate(0.03, 480, 32) / 0.03
    assert (480 / 32) / m - 1.0 > 0
    assert temperature_deficit(480, 32, m) == 0.0


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"batch_size": 0}, r"batch_size must be an integer >= 1; received batch_size=0"),
        ({"batch_size": 64.0}, r"batch_size must be an integer >= 1; received batch_size=64.0"),
        ({"small_batch_size": -2}, r"small_batch_size must be an integer >= 1.*=-2"),
        ({"lr_multiplier": 0.0}, r"lr_multiplier must be a finite number > 0.*=0.0"),
        ({"lr_multiplier": float("nan")}, r"lr_multiplier must be a finite number > 0.*=nan"),
        ({"lr_multiplier": True}, r"lr_multiplier must be a finite number > 0.*=True"),
        ({"lr_multiplier": "2"}, r"lr_multiplier must be a finite number > 0.*='2'"),
    ],
)
def test_bad_arguments_are_named(kwargs, pattern):
    arguments = {"batch_size": 64, "small_batch_size": 32, "lr_multiplier": 1.0, **kwargs}
    with pytest.raises(ValueError, match=pattern):
        temperature_deficit(**arguments)


def test_unknown_rule_is_named():
    with pytest.raises(ValueError, match=r"rule must be one of.*received rule='cubic'"):
        lr_multiplier_for_rule("cubic", 64, 32)
