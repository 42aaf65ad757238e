"""Produced vs target noise temperature of each noise kind, on gradients with a known answer.

Synthetic per-example gradients fix tr(Sigma) and |g|^2; with batches drawn with
replacement the expectations are closed forms (noisy_keras.analysis.noise_temperature).
Each check allows five standard errors of the measured mean, from the draws.
"""

import keras
import numpy as np
import pytest

from noisy_keras.analysis import (
    measure_noise_temperatures,
    noise_temperatures,
    per_example_gradients,
)

B, SMALL, LR = 32, 4, 0.1


@pytest.fixture(scope="module")
def gradients():
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(200, 6)) * np.array([2.0, 1.0, 1.0, 0.5, 0.5, 0.2])
    return rows + np.array([1.5, -1.0, 0.5, 0.0, 1.0, 0.0])  # |g|^2 comparable to tr(Sigma)


def _truth(gradients):
    mean = gradients.mean(axis=0)
    return np.sum((gradients - mean) ** 2) / len(gradients), float(mean @ mean)


def test_each_kind_produces_its_closed_form_and_matched_restores_the_target(gradients):
    trace, norm = _truth(gradients)
    deficit = B / SMALL - 1  # no learning-rate scaling, m = 1
    alpha = 0.05
    results = noise_temperatures(
        gradients, batch_size=B, small_batch_size=SMALL, learning_rate=LR, alpha=alpha,
        num_draws=1500, replace=True, seed=1,
    )  # fmt: skip
    closed = {
        "none": trace / B,
        "white": trace / B + 6 * alpha,
        "matched": trace / B + deficit / B * trace,
        "multiplicative": trace / B + deficit / B * (trace + norm),
    }
    for kind, result in results.items():
        assert result.predicted == pytest.approx(closed[kind], rel=1e-12)
        assert abs(result.trace - closed[kind]) < 5 * result.standard_error, kind
        assert result.temperature == pytest.approx(LR * result.trace, rel=1e-12)
        assert result.ratio == pytest.approx(result.temperature / result.target, rel=1e-12)
    target = results["none"].target
    assert abs(target - LR * trace / SMALL) < 5 * results["none"].target_standard_error
    # Matched gives back the small batch's temperature; none has b/B of it.
    assert abs(results["matched"].ratio - 1) < 5 * results["matched"].ratio_standard_error
    assert abs(results["none"].ratio - SMALL / B) < 5 * results["none"].ratio_standard_error
    # Multiplicative overshoots by (1/b - 1/B)|g|^2 / (tr/b): measurably, here about 0.5.
    overshoot = (1 / SMALL - 1 / B) * norm / (trace / SMALL)
    mult = results["multiplicative"]
    assert abs(mult.ratio - (1 + overshoot)) < 5 * mult.ratio_standard_error
    assert mult.ratio - 1 > 5 * mult.ratio_standard_error


def test_linear_scaling_restores_the_temperature_without_noise(gradients):
    # Eq. 7 counts noise per step at a fixed eta; eta x B/b gives B/b x (Sigma/B) = Sigma/b.
    results = noise_temperatures(
        gradients, batch_size=B, small_batch_size=SMALL, learning_rate=LR,
        lr_multiplier=B / SMALL, kinds=("none", "matched"), num_draws=600, replace=True,
    )  # fmt: skip
    for result in results.values():
        assert abs(result.ratio - 1) < 5 * result.ratio_standard_error
    assert results["matched"].trace == results["none"].trace  # s^2 = 0: nothing added


def test_without_replacement_the_finite_population_factors_enter(gradients):
    trace, _ = _truth(gradients)
    n = len(gradients)
    result = noise_temperatures(
        gradients, batch_size=B, small_batch_size=SMALL, learning_rate=LR,
        kinds=("matched",), num_draws=800, seed=2,
    )["matched"]  # fmt: skip
    expected = trace * (n - B) / (B * (n - 1)) + (B / SMALL - 1) / B * trace * n / (n - 1)
    assert result.predicted == pytest.approx(expected, rel=1e-12)
    assert abs(result.trace - expected) < 5 * result.standard_error


def test_model_entry_point_uses_the_model_per_example_gradients():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(40, 3)).astype("float32"), rng.integers(0, 2, 40)
    kwargs = dict(batch_size=8, small_batch_size=2, learning_rate=0.1, num_draws=20, seed=3)
    got = measure_noise_temperatures(model, x, y, **kwargs)
    want = noise_temperatures(per_example_gradients(model, x, y), **kwargs)
    assert got == want


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"kinds": ("loud",)}, r"kinds must be a non-empty sequence of none, white.*'loud'"),
        ({"batch_size": 500}, r"batch_size must be at most the number of examples \(200\)"),
        ({"batch_size": 1}, r"batch_size must be an integer >= 2"),
        ({"learning_rate": 0.0}, r"learning_rate must be a finite number > 0"),
        ({"lr_multiplier": -1.0}, r"lr_multiplier must be a finite number > 0"),
    ],
)
def test_bad_arguments_are_named(gradients, kwargs, pattern):
    arguments = {"batch_size": B, "small_batch_size": SMALL, "learning_rate": LR, **kwargs}
    with pytest.raises(ValueError, match=pattern):
        noise_temperatures(gradients, **arguments)
