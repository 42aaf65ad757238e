"""Tests for noisy_keras.analysis.hessian: known spectra and an explicit Hessian."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from noisy_keras.analysis import (
    HessianOperator,
    hessian_eigenvalues,
    hessian_trace,
    hessian_vector_product,
    hutchinson_trace,
    lanczos,
    power_iteration,
    top_eigenvalue_power,
)


def symmetric_with_spectrum(eigenvalues, seed=0):
    n = len(eigenvalues)
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))
    return q @ np.diag(eigenvalues) @ q.T


# The most negative eigenvalue has the largest magnitude.
SPECTRUM = [5.0, 3.0, 1.0, 0.5, -2.0, -8.0]


def test_power_iteration_finds_largest_magnitude_and_the_shift_fixes_the_sign():
    a = symmetric_with_spectrum(SPECTRUM)
    plain = power_iteration(lambda v: a @ v, 6, tolerance=1e-10, max_iterations=2000)
    assert plain.converged and plain.eigenvalue == pytest.approx(-8.0, rel=1e-9)
    top = top_eigenvalue_power(lambda v: a @ v, 6, tolerance=1e-10, max_iterations=2000)
    assert top.converged and top.eigenvalue == pytest.approx(5.0, rel=1e-9)
    assert top.iterations > plain.iterations  # both passes are counted
    np.testing.assert_allclose(
        np.abs(a @ top.eigenvectors[0]), np.abs(5 * top.eigenvectors[0]), atol=1e-8
    )
    positive = symmetric_with_spectrum([4.0, 1.0, -1.0])
    only = top_eigenvalue_power(lambda v: positive @ v, 3, tolerance=1e-10, max_iterations=2000)
    assert only.eigenvalue == pytest.approx(4.0, rel=1e-9) and only.method == "power"


def test_caps_are_reported_as_not_converged():
    a = symmetric_with_spectrum([1.0, 0.999, 0.1])
    capped = power_iteration(lambda v: a @ v, 3, tolerance=1e-12, max_iterations=3)
    assert not capped.converged and capped.iterations == 3
    capped = lanczos(lambda v: a @ v, 3, 1, tolerance=1e-12, max_iterations=1)
    assert not capped.converged and capped.iterations == 1


def test_lanczos_top_k_including_repeated_eigenvalues():
    a = symmetric_with_spectrum(SPECTRUM, seed=1)
    result = lanczos(lambda v: a @ v, 6, 3, tolerance=1e-10, max_iterations=50)
    assert result.converged and result.method == "lanczos"
    np.testing.assert_allclose(result.eigenvalues, [5.0, 3.0, 1.0], rtol=1e-9)
    np.testing.assert_allclose(result.eigenvectors @ result.eigenvectors.T, np.eye(3), atol=1e-9)
    # 2 I has one distinct eigenvalue: the Krylov space is invariant after one step.
    twice = lanczos(lambda v: 2.0 * v, 5, 2, tolerance=1e-10)
    np.testing.assert_allclose(twice.eigenvalues, [2.0, 2.0], rtol=1e-12)
    assert twice.converged


def test_hutchinson_is_exact_for_diagonal_and_within_its_error_otherwise():
    diagonal = np.arange(1.0, 11.0)
    exact = hutchinson_trace(lambda v: diagonal * v, 10, num_samples=3)
    assert exact.trace == pytest.approx(55.0, rel=1e-14) and exact.standard_error == 0.0
    a = symmetric_with_spectrum([3.0, 2.0, 1.0, -1.0, 0.5, 4.0], seed=2)
    samples = 400
    estimate = hutchinson_trace(lambda v: a @ v, 6, num_samples=samples, seed=3)
    # Var(z^T A z) = 2 * sum_{i != j} A_ij^2 for Rademacher z.
    exact_se = np.sqrt(2 * (np.sum(a**2) - np.sum(np.diag(a) ** 2)) / samples)
    assert abs(estimate.trace - np.trace(a)) < 4 * exact_se
    assert 0.7 < estimate.standard_error / exact_se < 1.3


def tiny_model():
    """21 parameters, float64, tanh so that the Hessian is not positive semi-definite."""
    keras.config.set_dtype_policy("float64")
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((2,), dtype="float64"),
            keras.layers.Dense(3, activation="tanh"),
            keras.layers.Dense(3),
        ]
    )


RNG = np.random.default_rng(0)
X = RNG.normal(size=(20, 2))
Y = RNG.integers(0, 3, size=20)


def explicit_hessian(model):
    variables = model.trainable_variables
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            logits = model(X, training=False)
            losses = keras.losses.sparse_categorical_crossentropy(Y, logits, from_logits=True)
            value = tf.reduce_mean(losses)
        flat = tf.concat([tf.reshape(g, [-1]) for g in inner.gradient(value, variables)], 0)
    blocks = outer.jacobian(flat, variables)
    return tf.concat([tf.reshape(b, [flat.shape[0], -1]) for b in blocks], axis=1).numpy()


def test_tiny_model_against_explicit_hessian():
    model = tiny_model()
    hessian = explicit_hessian(model)
    assert hessian.shape == (21, 21)
    eigenvalues = np.linalg.eigvalsh(hessian)[::-1]
    vector = np.random.default_rng(1).normal(size=21)
    # Uneven batches (7, 7, 6) are weighted by their size: the full-data Hessian.
    operator = HessianOperator(model, (X, Y), batch_size=7)
    np.testing.assert_allclose(operator(vector), hessian @ vector, rtol=1e-10, atol=1e-12)
    dataset = tf.data.Dataset.from_tensor_slices((X, Y)).batch(6)
    np.testing.assert_allclose(
        hessian_vector_product(model, dataset, vector), hessian @ vector, rtol=1e-10, atol=1e-12
    )
    top = hessian_eigenvalues(model, (X, Y), k=3, tolerance=1e-8)
    assert top.converged
    np.testing.assert_allclose(top.eigenvalues, eigenvalues[:3], rtol=1e-7)
    power = hessian_eigenvalues(model, (X, Y), method="power", tolerance=1e-7, max_iterations=3000)
    assert power.converged
    assert power.eigenvalue == pytest.approx(eigenvalues[0], rel=1e-6)
    samples = 200
    trace = hessian_trace(model, (X, Y), num_samples=samples, seed=4)
    exact_se = np.sqrt(2 * (np.sum(hessian**2) - np.sum(np.diag(hessian) ** 2)) / samples)
    assert abs(trace.trace - np.trace(hessian)) < 4 * exact_se
    assert trace.num_samples == samples


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="k must be at most dim=3"):
        lanczos(lambda v: v, 3, 4)
    with pytest.raises(ValueError, match="tolerance must be a finite number > 0"):
        power_iteration(lambda v: v, 3, tolerance=0.0)
    with pytest.raises(ValueError, match="num_samples must be an integer >= 2"):
        hutchinson_trace(lambda v: v, 3, num_samples=1)
    model = tiny_model()
    with pytest.raises(ValueError, match='method="power" finds one eigenvalue'):
        hessian_eigenvalues(model, (X, Y), k=2, method="power")
    with pytest.raises(ValueError, match="method must be one of"):
        hessian_eigenvalues(model, (X, Y), method="arnoldi")
    with pytest.raises(ValueError, match=r"vector must have shape \(21,\)"):
        hessian_vector_product(model, (X, Y), np.zeros(5))
    with pytest.raises(ValueError, match="Sample weights are not supported"):
        weighted = tf.data.Dataset.from_tensor_slices((X, Y, np.ones(20))).batch(5)
        hessian_vector_product(model, weighted, np.zeros(21))
