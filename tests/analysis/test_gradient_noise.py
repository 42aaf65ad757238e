"""Tests for noisy_keras.analysis.gradient_noise: closed-form gradients, exact expectations."""

import itertools

import keras
import numpy as np
import pytest

from noisy_keras.analysis import (
    covariance_trace,
    exact_simple_noise_scale,
    minibatch_gradient_variance,
    per_example_gradients,
    simple_noise_scale,
    simple_noise_scale_from_norms,
    variance_factor,
)

RNG = np.random.default_rng(0)
X = RNG.normal(size=(256, 3))
Y = X @ np.array([[1.0], [-2.0], [0.5]]) + 0.3 + RNG.normal(size=(256, 1))


def regression_model():
    keras.config.set_dtype_policy("float64")
    model = keras.Sequential([keras.Input((3,), dtype="float64"), keras.layers.Dense(1)])
    model.set_weights([np.array([[0.2], [0.1], [-0.3]]), np.array([0.0])])
    return model


def closed_form_gradients(model, x, y):
    """Squared error (w.x + b - y)^2: grad_w = 2 r x, grad_b = 2 r."""
    kernel, bias = model.get_weights()
    residual = x @ kernel + bias - y  # (N, 1)
    return np.concatenate([2 * residual * x, 2 * residual], axis=1)


def test_per_example_gradients_match_closed_form():
    model = regression_model()
    expected = closed_form_gradients(model, X[:20], Y[:20])
    got = per_example_gradients(
        model, X[:20], Y[:20], loss=keras.losses.MeanSquaredError(), batch_size=7
    )
    assert got.shape == (20, 4)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_covariance_trace_normalizations_and_known_covariance():
    gradients = RNG.normal(size=(7, 4))
    population = np.trace(np.cov(gradients.T, bias=True))
    assert covariance_trace(gradients) == pytest.approx(population, rel=1e-12)
    assert covariance_trace(gradients, unbiased=True) == pytest.approx(
        population * 7 / 6, rel=1e-12
    )
    # Draws from N(mu, Sigma): the unbiased trace has standard deviation sqrt(2 tr(Sigma^2)/(N-1)).
    sigma = np.diag([4.0, 1.0, 0.25, 2.0]) + 0.3
    n = 4000
    draws = np.random.default_rng(1).multivariate_normal([1.0, -1.0, 0.0, 2.0], sigma, size=n)
    tolerance = 4 * np.sqrt(2 * np.trace(sigma @ sigma) / (n - 1))
    assert abs(covariance_trace(draws, unbiased=True) - np.trace(sigma)) < tolerance


def exact_minibatch_moments(gradients, batch_size, replace):
    """E|g_B - g|^2 and E|g_B|^2 by enumerating every batch (equally likely)."""
    n = gradients.shape[0]
    if replace:
        batches = itertools.product(range(n), repeat=batch_size)
    else:
        batches = itertools.combinations(range(n), batch_size)
    means = np.array([gradients[list(b)].mean(axis=0) for b in batches])
    deviations = means - gradients.mean(axis=0)
    return np.mean(np.sum(deviations**2, axis=1)), np.mean(np.sum(means**2, axis=1))


@pytest.mark.parametrize("replace", [False, True])
def test_variance_law_is_exact_by_enumeration(replace):
    gradients = np.random.default_rng(2).normal(size=(6, 3)) + 0.5
    trace = covariance_trace(gradients)
    population = None if replace else 6
    for batch_size in (1, 2, 3):
        variance, _ = exact_minibatch_moments(gradients, batch_size, replace)
        assert variance == pytest.approx(variance_factor(batch_size, population) * trace, rel=1e-12)
    assert variance_factor(6, 6) == 0.0 and variance_factor(4) == 0.25


@pytest.mark.parametrize("replace", [False, True])
def test_two_batch_estimator_is_unbiased_by_enumeration(replace):
    gradients = np.random.default_rng(3).normal(size=(6, 3)) + 0.5
    _, small = exact_minibatch_moments(gradients, 2, replace)
    _, big = exact_minibatch_moments(gradients, 3, replace)
    estimate = simple_noise_scale_from_norms(
        [small], [big], 2, 3, population_size=None if replace else 6
    )
    mean = gradients.mean(axis=0)
    assert estimate.gradient_sq_norm == pytest.approx(mean @ mean, rel=1e-12)
    assert estimate.covariance_trace == pytest.approx(covariance_trace(gradients), rel=1e-12)
    assert estimate.noise_scale == pytest.approx(exact_simple_noise_scale(gradients), rel=1e-12)


def test_sampled_minibatch_variance_follows_one_over_b():
    gradients = np.random.default_rng(4).normal(size=(200, 5)) * [1.0, 2.0, 0.5, 1.0, 3.0]
    sizes = [1, 4, 16, 64, 200]
    result = minibatch_gradient_variance(gradients, sizes, num_batches=400, seed=5)
    trace = covariance_trace(gradients)
    np.testing.assert_allclose(result.predicted, [variance_factor(b, 200) * trace for b in sizes])
    assert result.variance[-1] == pytest.approx(0.0, abs=1e-24)  # the whole set: no noise
    assert np.all(
        np.abs(result.variance[:-1] - result.predicted[:-1]) < 4 * result.standard_error[:-1]
    )
    with_replacement = minibatch_gradient_variance(
        gradients, sizes, num_batches=400, replace=True, seed=6
    )
    np.testing.assert_allclose(with_replacement.predicted * np.array(sizes), trace, rtol=1e-12)
    deviation = np.abs(with_replacement.variance - with_replacement.predicted)
    assert np.all(deviation < 4 * with_replacement.standard_error)


def test_model_noise_scale_within_its_sampling_error():
    model = regression_model()
    exact = closed_form_gradients(model, X, Y)
    true_mean = exact.mean(axis=0)
    estimate = simple_noise_scale(
        model,
        X,
        Y,
        small_batch_size=4,
        big_batch_size=32,
        num_repeats=300,
        seed=7,
        loss=keras.losses.MeanSquaredError(),
    )
    assert estimate.population_size == 256 and estimate.small_sq_norms.shape == (300,)
    c_small, c_big = variance_factor(4, 256), variance_factor(32, 256)
    per_repeat_trace = (estimate.small_sq_norms - estimate.big_sq_norms) / (c_small - c_big)
    per_repeat_norm = (c_small * estimate.big_sq_norms - c_big * estimate.small_sq_norms) / (
        c_small - c_big
    )
    assert estimate.covariance_trace == pytest.approx(per_repeat_trace.mean(), rel=1e-12)
    se_trace = per_repeat_trace.std(ddof=1) / np.sqrt(300)
    se_norm = per_repeat_norm.std(ddof=1) / np.sqrt(300)
    assert abs(estimate.covariance_trace - covariance_trace(exact)) < 4 * se_trace
    assert abs(estimate.gradient_sq_norm - true_mean @ true_mean) < 4 * se_norm
    assert estimate.noise_scale == pytest.approx(
        estimate.covariance_trace / estimate.gradient_sq_norm, rel=1e-12
    )


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="small_batch_size must be smaller than big_batch_size"):
        simple_noise_scale_from_norms([1.0], [0.5], 8, 8)
    with pytest.raises(ValueError, match="same length"):
        simple_noise_scale_from_norms([1.0, 2.0], [0.5], 2, 8)
    with pytest.raises(ValueError, match="batch_size must be at most population_size=4"):
        variance_factor(5, 4)
    with pytest.raises(ValueError, match="2-D array"):
        covariance_trace(np.ones(3))
    with pytest.raises(ValueError, match="unbiased=True needs at least 2 examples"):
        covariance_trace(np.ones((1, 3)), unbiased=True)
    with pytest.raises(ValueError, match="batch_sizes must be a 1-D sequence of integers"):
        minibatch_gradient_variance(np.ones((4, 2)), [1.5])
    with pytest.raises(
        ValueError, match=r"big_batch_size must be at most the number of examples \(256\)"
    ):
        simple_noise_scale(regression_model(), X, Y, small_batch_size=4, big_batch_size=512)
