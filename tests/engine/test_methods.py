"""SAM, adaptive SAM and the gradient-norm penalty: one step against NumPy, per layout.

A linear model (Dense(1), squared error) has gradient g = (2/n) X^T (X w - y) and
Hessian H = (2/n) X^T X for a batch X = [x, 1] of n, so every method's update has
a closed form: SAM applies g(w + e), the penalty g + 2 lambda H g (the finite
difference is exact on a quadratic). Each replica perturbs by its own batch
(m-sharpness): with R = 2 the update is the mean of the two halves' methods.
Two logical CPU devices stand in for two GPUs (tests/conftest.py).
"""

import keras
import numpy as np
import pytest

from noisy_keras import NoisyOptimizer, noise_stddev, unit_noise
from noisy_keras.engine import steps as replica_xla
from noisy_keras.engine.distribute import make_strategy
from noisy_keras.engine.methods import (
    disable_gradient_method,
    enable_gradient_method,
    enable_gradient_norm_penalty,
    enable_sam,
)
from noisy_keras.optim.sharpness import SAM, GradientNormPenalty

B, LR = 16, 0.1


def _data(n=B, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)).astype(np.float32)
    y = (x @ np.array([[1.0], [-2.0], [0.5]]) + 0.5 * rng.normal(size=(n, 1))).astype(np.float32)
    return x, y


def _linear(replicas=1, optimizer=None, **compile_kwargs):
    strategy = make_strategy("mirrored", replicas) if replicas > 1 else make_strategy("default")
    with strategy.scope():
        keras.utils.set_random_seed(1)
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        model.compile(optimizer=optimizer or keras.optimizers.SGD(LR), loss="mse", **compile_kwargs)
    return model


def _theta(model):
    kernel, bias = (np.asarray(v, np.float64) for v in model.get_weights())
    return np.concatenate([kernel[:, 0], bias])


def _gradient(theta, x, y, weights=None):
    """Gradient and Hessian of (1/n) sum_i w_i (x_i . theta - y_i)^2 (w = 1 unless given)."""
    design = np.concatenate([x, np.ones((len(x), 1))], axis=1).astype(np.float64)
    w = np.ones(len(x)) if weights is None else weights
    residual = design @ theta - y[:, 0]
    return 2.0 / len(x) * design.T @ (w * residual), 2.0 / len(x) * design.T @ (w[:, None] * design)


def _method_gradient(method, theta, x, y, weights=None):
    g, hessian = _gradient(theta, x, y, weights)
    if isinstance(method, SAM):
        if method.adaptive:
            scale = np.abs(theta) + method.eta
            e = method.rho * scale**2 * g / np.linalg.norm(scale * g)
        else:
            e = method.rho * g / np.linalg.norm(g)
        return _gradient(theta + e, x, y, weights)[0]
    return g + 2.0 * method.strength * hessian @ g


def _expected_step(method, theta, x, y, replicas, weights=None):
    parts = np.split(np.arange(len(x)), replicas)  # tf.distribute's split of a batch
    w = np.ones(len(x)) if weights is None else weights
    mean = np.mean([_method_gradient(method, theta, x[p], y[p], w[p]) for p in parts], axis=0)
    return theta - LR * mean


def _one_step(model, x, y):
    model.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0)
    return _theta(model)


METHODS = [
    SAM(rho=0.05),
    SAM(rho=0.5, adaptive=True),
    GradientNormPenalty(strength=0.05),
    GradientNormPenalty(strength=0.05, gradient="double_backprop"),
]


@pytest.mark.parametrize("method", METHODS, ids=repr)
@pytest.mark.parametrize("replicas", [1, 2])
def test_one_step_equals_the_closed_form_per_replica(method, replicas):
    x, y = _data()
    model = _linear(replicas)
    replica_xla.enable_replica_xla(model)  # the engine with XLA, as the main job runs it
    enable_gradient_method(model, method)
    theta = _theta(model)
    got = _one_step(model, x, y)
    want = _expected_step(method, theta, x, y, replicas)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
    other = _expected_step(method, theta, x, y, 3 - replicas)  # the other layout's definition
    plain = theta - LR * _gradient(theta, x, y)[0]
    assert np.max(np.abs(want - plain)) > 1e-3  # the method changes the step
    if isinstance(method, SAM):  # the penalty of a linear model: H the same on every half
        assert np.max(np.abs(want - other)) > 1e-4  # m-sharpness: the layout matters


def test_plain_fit_is_patched_and_matches_the_closed_form():
    x, y = _data()
    model = _linear(1, jit_compile=False)
    assert replica_xla.replica_steps(model) is None
    theta = _theta(model)
    enable_sam(model, rho=0.1)
    assert replica_xla.replica_steps(model) is not None
    got = _one_step(model, x, y)
    np.testing.assert_allclose(
        got, _expected_step(SAM(rho=0.1), theta, x, y, 1), rtol=2e-5, atol=2e-6
    )


def test_finite_difference_matches_double_backprop_on_a_nonlinear_model():
    """g + 2 lambda H g by a difference of length epsilon is within O(epsilon) of the exact one."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(32, 4)).astype(np.float32)
    y = np.tanh(x @ rng.normal(size=(4, 1))).astype(np.float32)
    results = {}
    for name, epsilon in (("double_backprop", 0.01), ("finite_difference", 1e-3)):
        keras.utils.set_random_seed(7)
        model = keras.Sequential(
            [keras.Input((4,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(1)]
        )
        model.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
        before = [np.asarray(w, np.float64) for w in model.get_weights()]
        enable_gradient_norm_penalty(model, strength=0.5, gradient=name, epsilon=epsilon)
        model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
        after = [np.asarray(w, np.float64) for w in model.get_weights()]
        results[name] = np.concatenate([(b - a).ravel() for a, b in zip(after, before)])
    exact, difference = results["double_backprop"], results["finite_difference"]
    np.testing.assert_allclose(difference, exact, rtol=0, atol=2e-3 * np.max(np.abs(exact)))


def test_zero_settings_are_bit_identical_to_no_method():
    x, y = _data(4 * B)
    plain = _linear(2)
    replica_xla.enable_replica_xla(plain)
    want = _one_step(plain, x, y)
    for enable in (
        lambda m: enable_sam(m, rho=0.0),
        lambda m: enable_gradient_norm_penalty(m, strength=0.0),
    ):
        model = _linear(2)
        enable(model)
        replica_xla.enable_replica_xla(model)  # the method first, then the engine: either order
        np.testing.assert_array_equal(_one_step(model, x, y), want)


def test_noise_is_added_to_the_sam_gradient():
    x, y = _data()
    seed = 11
    model = _linear(2, optimizer=NoisyOptimizer(keras.optimizers.SGD(LR), seed=seed))
    enable_sam(model, rho=0.05)
    theta = _theta(model)
    got = _one_step(model, x, y)
    sam_step = _expected_step(SAM(rho=0.05), theta, x, y, 2)
    sigma = float(noise_stddev(0))
    noise = np.concatenate([z.numpy().ravel() for z in unit_noise([(3, 1), (1,)], seed, 0)])
    np.testing.assert_allclose(got, sam_step - LR * sigma * noise, rtol=2e-5, atol=2e-6)


def test_disable_returns_to_the_plain_step():
    x, y = _data()
    model = _linear(1)
    enable_sam(model, rho=0.05)
    disable_gradient_method(model)
    theta = _theta(model)
    got = _one_step(model, x, y)
    np.testing.assert_allclose(got, theta - LR * _gradient(theta, x, y)[0], rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: SAM(rho=-0.1), r"rho must be a finite number >= 0; received rho=-0.1"),
        (lambda: SAM(rho=float("nan")), r"received rho=nan"),
        (lambda: SAM(adaptive="yes"), r"adaptive must be True or False; received adaptive='yes'"),
        (lambda: SAM(eta=-1), r"eta must be a finite number >= 0; received eta=-1"),
        (
            lambda: GradientNormPenalty(strength=-1.0),
            r"strength must be a finite number >= 0; received strength=-1.0",
        ),
        (
            lambda: GradientNormPenalty(strength=0.1, gradient="exact"),
            r"gradient must be one of finite_difference, double_backprop; "
            r"received gradient='exact'",
        ),
        (
            lambda: GradientNormPenalty(strength=0.1, epsilon=0),
            r"epsilon must be a finite number > 0; received epsilon=0",
        ),
    ],
)
def test_bad_settings_are_refused_with_their_names(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_bad_models_and_methods_are_refused_before_anything_changes():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    with pytest.raises(ValueError, match="must be compiled"):
        enable_sam(model)
    assert replica_xla.replica_steps(model) is None
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ValueError, match=r"method must be .*SAM.*; received method='sam'"):
        enable_gradient_method(model, "sam")
    with pytest.raises(ValueError, match=r"rho must be .*; received rho=-1"):
        enable_sam(model, rho=-1)
    assert replica_xla.replica_steps(model) is None


@pytest.mark.parametrize("gradient", ["finite_difference", "double_backprop"])
def test_penalty_is_in_loss_units_under_a_loss_scale(gradient):
    """The step's gradients are (loss scale / R) grad L: the penalty must not see the scale."""
    x, y = _data()
    optimizer = keras.optimizers.LossScaleOptimizer(
        keras.optimizers.SGD(LR), initial_scale=2.0**10, dynamic_growth_steps=10**6
    )
    model = _linear(2, optimizer=optimizer)
    method = GradientNormPenalty(strength=0.05, gradient=gradient)
    enable_gradient_method(model, method)
    theta = _theta(model)
    got = _one_step(model, x, y)
    np.testing.assert_allclose(got, _expected_step(method, theta, x, y, 2), rtol=2e-5, atol=2e-6)


def test_accumulation_perturbs_each_micro_batch_of_each_replica():
    """k = 2 accumulation steps on R = 2 replicas: m = B / 4, the update is the quarters' mean."""
    x, y = _data()
    model = _linear(2)
    replica_xla.enable_replica_xla(model, accumulation_steps=2)
    enable_sam(model, rho=0.05)
    theta = _theta(model)
    model.fit(x, y, batch_size=B // 2, epochs=1, shuffle=False, verbose=0)
    assert int(np.asarray(model.optimizer.iterations)) == 1
    want = _expected_step(SAM(rho=0.05), theta, x, y, 4)
    np.testing.assert_allclose(_theta(model), want, rtol=2e-5, atol=2e-6)


def test_multiplicative_noise_weights_both_passes_of_each_replica():
    """SAM and the penalty through the noise kinds' cores: w_p weights both passes' examples."""
    from noisy_keras.noise.multiplicative import enable_multiplicative_noise, example_weights

    x, y = _data()
    weights = example_weights(B, seed=5, step=0, variance=1.0).numpy().astype(np.float64)
    for method in (SAM(rho=0.05), GradientNormPenalty(strength=0.05)):
        keras.utils.clear_session()
        model = _linear(2)
        enable_multiplicative_noise(model, batch_size=B, variance=1.0, seed=5)
        enable_gradient_method(model, method)
        theta = _theta(model)
        got = _one_step(model, x, y)
        want = _expected_step(method, theta, x, y, 2, weights)
        # Weights drawn under XLA differ from eager ones by a few float32 ulp.
        np.testing.assert_allclose(got, want, rtol=5e-5, atol=5e-6)
        unweighted = _expected_step(method, theta, x, y, 2)
        assert np.max(np.abs(want - unweighted)) > 1e-3
