"""Tests for noisy_keras.analysis.sharpness: maxima over the box known in closed form."""

import keras
import numpy as np
import pytest

from noisy_keras.analysis import epsilon_sharpness, random_subspace, sharpness_of_function


def diagonal_quadratic(d, c):
    """f(theta) = 0.5 sum_i d_i (theta_i - c_i)^2, convex: its box maximum is a vertex."""
    return lambda theta: (0.5 * np.sum(d * (theta - c) ** 2), d * (theta - c))


def metric(max_value, value):
    return 100.0 * (max_value - value) / (1.0 + value)


def test_full_space_convex_quadratic_reaches_the_far_vertex():
    d = np.array([1.0, 2.0, 0.5, 3.0, 1.5])
    c = np.array([0.3, -0.2, 0.1, 0.0, 1.0])
    x = np.array([0.5, -1.0, 2.0, 0.4, 0.8])
    f = diagonal_quadratic(d, c)
    epsilon = 0.1
    half = epsilon * (np.abs(x) + 1.0)
    expected_max = 0.5 * np.sum(d * (np.abs(x - c) + half) ** 2)
    result = sharpness_of_function(f, x, epsilon=epsilon, start="zero")
    assert result.max_loss == pytest.approx(expected_max, rel=1e-10)
    assert result.loss == pytest.approx(f(x)[0], rel=1e-15)
    assert result.sharpness == pytest.approx(metric(expected_max, f(x)[0]), rel=1e-10)
    assert result.subspace_dim is None and result.iterations <= 10
    # From a random start L-BFGS-B finds the same vertex here.
    random_start = sharpness_of_function(f, x, epsilon=epsilon, seed=3)
    assert random_start.max_loss == pytest.approx(expected_max, rel=1e-10)


def test_coordinate_subspace_uses_pseudo_inverse_bounds():
    # A = first two columns of I: A^+ x = x[:2], only those coordinates move.
    d = np.array([1.0, 2.0, 0.5, 3.0])
    c = np.zeros(4)
    x = np.array([0.5, -1.0, 2.0, 0.4])
    f = diagonal_quadratic(d, c)
    epsilon = 0.2
    half = epsilon * (np.abs(x[:2]) + 1.0)
    expected_max = 0.5 * np.sum(d[:2] * (np.abs(x[:2]) + half) ** 2) + 0.5 * np.sum(
        d[2:] * x[2:] ** 2
    )
    result = sharpness_of_function(f, x, epsilon=epsilon, projection=np.eye(4)[:, :2])
    assert result.subspace_dim == 2
    assert result.max_loss == pytest.approx(expected_max, rel=1e-10)


def test_random_subspace_concave_quadratic_reaches_the_interior_maximum():
    # f = 3 - 0.5 |theta - c|^2; on x + A y its maximum is at y* = A^+ (c - x), value
    # 3 - 0.5 |(I - A A^+)(x - c)|^2, inside the box by construction.
    rng = np.random.default_rng(0)
    a = random_subspace(8, 3, seed=1)
    x = rng.normal(size=8)
    c = x + a @ np.array([0.05, -0.1, 0.08]) + 0.3 * rng.normal(size=8)
    f = lambda theta: (3.0 - 0.5 * np.sum((theta - c) ** 2), -(theta - c))
    residual = (x - c) - a @ np.linalg.lstsq(a, x - c, rcond=None)[0]
    expected_max = 3.0 - 0.5 * residual @ residual
    result = sharpness_of_function(f, x, epsilon=1.0, projection=a, max_iterations=50)
    assert result.max_loss == pytest.approx(expected_max, rel=1e-8)
    assert result.sharpness == pytest.approx(metric(expected_max, f(x)[0]), rel=1e-6)


def one_weight_model():
    keras.config.set_dtype_policy("float64")
    model = keras.Sequential(
        [keras.Input((1,), dtype="float64"), keras.layers.Dense(1, use_bias=False)]
    )
    model.set_weights([np.array([[0.7]])])
    return model


X = np.array([[1.0], [2.0], [-1.0], [0.5]])
Y = np.array([[1.0], [1.0], [-0.5], [0.2]])


def mse(w):
    return float(np.mean((X[:, 0] * w - Y[:, 0]) ** 2))


def test_model_full_space_and_one_dimensional_subspace():
    model = one_weight_model()
    loss = keras.losses.MeanSquaredError()
    w, epsilon = 0.7, 0.05
    # Full space: w moves within w +- eps (|w| + 1); f is convex, so an end point wins.
    half = epsilon * (abs(w) + 1.0)
    expected = max(mse(w - half), mse(w + half))
    result = epsilon_sharpness(model, (X, Y), epsilon=epsilon, subspace_dim=None, loss=loss)
    assert result.loss == pytest.approx(mse(w), rel=1e-12)
    assert result.max_loss == pytest.approx(expected, rel=1e-9)
    np.testing.assert_array_equal(model.get_weights()[0], [[0.7]])  # not modified
    # p = 1: A = [[g]], A^+ x = w / g, so w moves within w +- eps (|w| + |g|).
    seed = 5
    g = random_subspace(1, 1, seed=np.random.SeedSequence(seed).spawn(2)[0])[0, 0]
    half = epsilon * (abs(w) + abs(g))
    expected = max(mse(w - half), mse(w + half))
    result = epsilon_sharpness(model, (X, Y), epsilon=epsilon, subspace_dim=1, seed=seed, loss=loss)
    assert result.subspace_dim == 1
    assert result.max_loss == pytest.approx(expected, rel=1e-9)
    assert result.sharpness == pytest.approx(metric(expected, mse(w)), rel=1e-8)


def test_bad_arguments_raise():
    f = diagonal_quadratic(np.ones(3), np.zeros(3))
    with pytest.raises(ValueError, match="epsilon must be a finite number > 0"):
        sharpness_of_function(f, np.ones(3), epsilon=0.0)
    with pytest.raises(ValueError, match=r"projection must have shape \(3, p\)"):
        sharpness_of_function(f, np.ones(3), projection=np.ones((4, 2)))
    with pytest.raises(ValueError, match="start must be one of"):
        sharpness_of_function(f, np.ones(3), start="centre")
    with pytest.raises(ValueError, match="subspace_dim must be at most the number"):
        epsilon_sharpness(one_weight_model(), (X, Y), subspace_dim=100)
