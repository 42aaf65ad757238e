"""Noise kinds through the engine: multiplicative weights and the matched trace, per layout.

A linear model (Dense(1), squared error) has closed-form per-example gradients
g_i = 2 r_i [x_i, 1]. An inner optimizer that records the all-reduced gradient
of every update and leaves the weights alone keeps them fixed, so each update's
gradient can be checked against the formula the noise kind promises, for every
layout of the global batch: R replicas (two logical CPU devices stand in for
two GPUs, tests/conftest.py) and k accumulation steps.
"""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from noisy_keras.data.epochs import epoch_batches
from noisy_keras.engine import fit as training
from noisy_keras.engine import steps as replica_xla
from noisy_keras.engine.distribute import make_strategy
from noisy_keras.noise.draw import unit_noise
from noisy_keras.noise.matched import MatchedNoiseOptimizer
from noisy_keras.noise.multiplicative import (
    disable_multiplicative_noise,
    enable_multiplicative_noise,
    example_weights,
)

B, SEED, SHAPES, D = 16, 5, [(3, 1), (1,)], 4
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]  # (replicas R, accumulation steps k)


class _Recorder(keras.optimizers.Optimizer):
    """Row t of `gradients` is update t's gradient summed over replicas; weights stay put."""

    def __init__(self, rows):
        super().__init__(learning_rate=0.0, name="recorder")
        self.rows = rows

    def build(self, variables):
        super().build(variables)
        size = sum(int(np.prod(v.shape)) for v in variables)
        self.gradients = self.add_variable(
            (self.rows, size), aggregation="only_first_replica", name="gradients"
        )

    def apply(self, grads, trainable_variables=None):
        if not self.built:
            self.build(trainable_variables)
        flat = tf.concat([tf.reshape(g, [-1]) for g in grads], axis=0)
        context = tf.distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync > 1:
            flat = context.all_reduce(tf.distribute.ReduceOp.SUM, flat)
        row = tf.cast(self.iterations, tf.int32)
        self.gradients.assign(
            tf.tensor_scatter_nd_update(self.gradients, [[row]], flat[tf.newaxis])
        )
        self.iterations.assign_add(1)


def _data(n, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)).astype(np.float32)
    y = (x @ np.array([[1.0], [-2.0], [0.5]]) + 0.5 * rng.normal(size=(n, 1))).astype(np.float32)
    return x, y


def _per_example_gradients(model, x, y):
    kernel, bias = (np.asarray(v, np.float64) for v in model.trainable_variables)
    residual = (x @ kernel + bias - y)[:, 0]
    return 2 * residual[:, None] * np.concatenate([x, np.ones((len(x), 1))], axis=1)


def _linear(strategy, optimizer, **compile_kwargs):
    with strategy.scope():
        keras.utils.set_random_seed(1)
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        model.compile(optimizer=optimizer(), loss="mse", **compile_kwargs)
    return model


def _fit(model, x, y, k, epochs=1):
    model.fit(x, y, batch_size=B // k, epochs=epochs, shuffle=False, verbose=0)
    return [np.asarray(w) for w in model.get_weights()]


def _strategy(replicas):
    return make_strategy("mirrored", replicas)


# ---- Multiplicative: the same weights at every position, whatever the layout ----------------


@pytest.mark.parametrize("replicas, k", LAYOUTS)
def test_multiplicative_gradient_is_the_weighted_mean_in_every_layout(replicas, k):
    updates, variance = 4, 3.0
    x, y = _data(updates * B)
    model = _linear(_strategy(replicas), lambda: _Recorder(updates))
    if replicas == 2:  # the engine first, then the noise: either order works
        replica_xla.enable_replica_xla(model, accumulation_steps=k)
        enable_multiplicative_noise(model, batch_size=B, variance=variance, seed=SEED)
    else:
        enable_multiplicative_noise(model, batch_size=B, variance=variance, seed=SEED)
        replica_xla.enable_replica_xla(model, accumulation_steps=k)
    _fit(model, x, y, k)
    assert int(np.asarray(model.optimizer.iterations)) == updates
    recorded = np.asarray(model.optimizer.gradients, np.float64)
    per_example = _per_example_gradients(model, x, y)
    for t in range(updates):
        w = example_weights(B, seed=SEED, step=t, variance=variance).numpy().astype(np.float64)
        want = w @ per_example[t * B : (t + 1) * B] / B
        # Weights drawn under XLA differ from eager ones by a few float32 ulp.
        np.testing.assert_allclose(recorded[t], want, rtol=2e-5, atol=1e-5)
        # Weighted twice (by the engine and by the patched compute_loss) would be w^2.
        twice = (w * w) @ per_example[t * B : (t + 1) * B] / B
        assert np.max(np.abs(recorded[t] - twice)) > 1e-2
    (core,) = noise_hooks_cores(model)
    assert core.experimental_get_tracing_count() == replicas  # once per replica's device
    assert _is_xla(core, model, x[: B // (k * replicas)], y[: B // (k * replicas)])


def noise_hooks_cores(model):
    return replica_xla.replica_steps(model).noise.compiled_cores()


def _is_xla(function, model, x, y):
    """Whether the noisy core, called as the engine calls it, is an XLA computation."""
    arguments = (
        [tf.convert_to_tensor(v.value) for v in model.trainable_variables],
        [tf.convert_to_tensor(v.value) for v in model.non_trainable_variables],
        [tf.convert_to_tensor(v.value) for v in model.metrics_variables],
        tf.constant(1.0),
        tf.constant(x),
        tf.constant(y),
        None,
        tf.constant(0, tf.int64),
        tf.constant(0, tf.int64),
    )
    concrete = function.get_concrete_function(*arguments)
    return bool(concrete.function_def.attr["_XlaMustCompile"].b)


def test_multiplicative_noise_covariance_through_the_engine():
    # Over D draws at fixed weights, the added noise has covariance s^2 / B^2 sum_i g_i g_i^T.
    draws, batch, variance = 3000, 8, 3.0
    x, y = _data(batch, seed=1)
    model = _linear(_strategy(1), lambda: _Recorder(draws), steps_per_execution=500)
    replica_xla.enable_replica_xla(model)
    enable_multiplicative_noise(model, batch_size=batch, variance=variance, seed=2)
    x_all, y_all = np.tile(x, (draws, 1)), np.tile(y, (draws, 1))
    model.fit(x_all, y_all, batch_size=batch, shuffle=False, verbose=0)
    per_example = _per_example_gradients(model, x, y)
    added = np.asarray(model.optimizer.gradients, np.float64) - per_example.mean(axis=0)
    predicted = variance / batch**2 * per_example.T @ per_example
    diagonal = np.diag(predicted)
    assert np.all(np.abs(added.mean(axis=0)) < 5 * np.sqrt(diagonal / draws))
    sample = np.cov(added, rowvar=False)
    # Gaussian noise: Var S_jk = (C_jj C_kk + C_jk^2) / (D - 1).
    entry_sd = np.sqrt((np.outer(diagonal, diagonal) + predicted**2) / (draws - 1))
    assert np.all(np.abs(sample - predicted) < 5 * entry_sd)
    trace_sd = math.sqrt(2 * np.trace(predicted @ predicted) / (draws - 1))
    # Can fail: weights of variance s instead of s^2 give sqrt(3) times less, > 5 sd off.
    assert abs(np.trace(sample) * math.sqrt(variance) - np.trace(predicted)) > 5 * trace_sd


# ---- Matched: the trace from G groups, the noise it sizes -------------------------------------


def _group_estimate(per_example, replicas, k):
    """NumPy: the engine's tr(Sigma) estimate for one update's B examples in order."""
    estimates = []
    share = B // (k * replicas)
    for r in range(replicas):
        if k == 1:
            rows = per_example[r * share : (r + 1) * share]
            half = share // 2
            g_1, g_2 = rows[:half].mean(axis=0), rows[half:].mean(axis=0)
            estimates.append(half * (share - half) / share * np.sum((g_1 - g_2) ** 2))
        else:
            groups = np.stack(
                [
                    per_example[m * B // k + r * share : m * B // k + (r + 1) * share].mean(0)
                    for m in range(k)
                ]
            )
            spread = np.sum((groups - groups.mean(axis=0)) ** 2)
            estimates.append(share / (k - 1) * spread)
    return float(np.mean(estimates))


@pytest.mark.parametrize("replicas, k", LAYOUTS)
def test_matched_noise_follows_the_estimate_of_its_groups_in_every_layout(replicas, k):
    updates, small = 3, 4  # s^2 = B/b - 1 = 3
    x, y = _data(updates * B, seed=2)
    model = _linear(
        _strategy(replicas),
        lambda: MatchedNoiseOptimizer(
            _Recorder(updates), batch_size=B, small_batch_size=small, seed=SEED, ema_decay=0.0
        ),
    )
    replica_xla.enable_replica_xla(model, accumulation_steps=k)
    traces = []

    class Traces(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if (batch + 1) % k == 0:
                traces.append(float(model.optimizer.covariance_trace))

    model.fit(x, y, batch_size=B // k, shuffle=False, verbose=0, callbacks=[Traces()])
    recorded = np.asarray(model.optimizer.inner_optimizer.gradients, np.float64)
    per_example = _per_example_gradients(model, x, y)
    for t in range(updates):
        rows = per_example[t * B : (t + 1) * B]
        estimate = _group_estimate(rows, replicas, k)
        # ema_decay 0: the trace in force at update t is that update's own estimate.
        assert traces[t] == pytest.approx(estimate, rel=1e-4)
        sigma = math.sqrt(estimate * (B / small - 1) / (B * D))
        noise = np.concatenate([n.numpy().ravel() for n in unit_noise(SHAPES, SEED, t)])
        # One draw of the right size in all (each replica adds 1/R of it), as on one device.
        np.testing.assert_allclose(recorded[t], rows.mean(0) + sigma * noise, rtol=1e-4, atol=1e-5)
    if k == 1:  # the two halves are computed inside one XLA core
        (core,) = noise_hooks_cores(model)
        assert _is_xla(core, model, x[: B // replicas], y[: B // replicas])


def test_matched_sigma_follows_the_known_trace_over_many_updates():
    # Batches drawn with replacement from N examples, R = 2 replicas, k = 1: each replica's two
    # halves are means of n i.i.d. examples, so the estimate's mean is tr(Sigma) of the N
    # examples (1/N). sigma_t is read off each recorded update: g_B + sigma_t z_t, z_t known.
    population, updates, small = 24, 400, 4
    rng = np.random.default_rng(3)
    x_all, y_all = _data(population, seed=3)
    order = rng.integers(0, population, size=updates * B)
    model = _linear(
        _strategy(2),
        lambda: MatchedNoiseOptimizer(
            _Recorder(updates), batch_size=B, small_batch_size=small, seed=1, ema_decay=0.0
        ),
        steps_per_execution=100,
    )
    replica_xla.enable_replica_xla(model)
    model.fit(x_all[order], y_all[order], batch_size=B, shuffle=False, verbose=0)
    per_example = _per_example_gradients(model, x_all, y_all)
    batch_means = per_example[order].reshape(updates, B, D).mean(axis=1)
    added = np.asarray(model.optimizer.inner_optimizer.gradients, np.float64) - batch_means
    draws = np.stack(
        [
            np.concatenate([n.numpy().ravel() for n in unit_noise(SHAPES, 1, t)])
            for t in range(updates)
        ]
    )
    sigmas = np.sum(added * draws, axis=1) / np.sum(draws * draws, axis=1)
    np.testing.assert_allclose(added, sigmas[:, None] * draws, rtol=1e-3, atol=1e-5)
    estimates = sigmas**2 * B * D / (B / small - 1)  # sigma^2 = tr_hat s^2 / (B d)
    trace = np.sum((per_example - per_example.mean(axis=0)) ** 2) / population
    standard_error = estimates.std(ddof=1) / math.sqrt(updates)
    assert abs(estimates.mean() - trace) < 5 * standard_error
    # Can fail: dividing by G instead of G - 1 halves the estimate, far outside 5 standard errors.
    assert abs(estimates.mean() / 2 - trace) > 5 * standard_error


# ---- Zero settings, refusals, resume ------------------------------------------------------------


def test_zero_settings_are_bit_identical_to_no_noise_through_the_engine():
    x, y = _data(64)

    def run(optimizer, multiplicative_small=None):
        model = _linear(_strategy(2), optimizer)
        if multiplicative_small is not None:  # B/b = 1: s^2 = 0, the model is not touched
            enable_multiplicative_noise(
                model, batch_size=B, small_batch_size=multiplicative_small, seed=SEED
            )
        replica_xla.enable_replica_xla(model, accumulation_steps=2)
        return _fit(model, x, y, k=2)

    def sgd():
        return keras.optimizers.SGD(0.05, momentum=0.9)

    plain = run(sgd)
    for weights in (
        run(sgd, multiplicative_small=B),
        run(lambda: MatchedNoiseOptimizer(sgd(), batch_size=B, small_batch_size=B, seed=SEED)),
    ):
        for a, b in zip(plain, weights, strict=True):
            np.testing.assert_array_equal(a, b)


def _bn_model(optimizer):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4), keras.layers.BatchNormalization(),
         keras.layers.Dense(1)]
    )  # fmt: skip
    model.compile(optimizer=optimizer, loss="mse")
    return model


def test_what_the_engine_cannot_honour_is_refused_naming_it():
    matched = MatchedNoiseOptimizer(keras.optimizers.SGD(0.1), batch_size=B, small_batch_size=4)
    model = _bn_model(matched)
    with pytest.raises(ValueError, match=r"BatchNormalization \(batch_normalization.*"
                       r"accumulation_steps >= 2"):  # fmt: skip
        replica_xla.enable_replica_xla(model)
    replica_xla.enable_replica_xla(model, accumulation_steps=2)  # micro-batches are the groups

    model = _linear(_strategy(2), lambda: keras.optimizers.SGD(0.1))
    enable_multiplicative_noise(model, batch_size=18, variance=1.0, seed=1)
    with pytest.raises(ValueError, match=r"batch_size=18, which is not divisible by "
                       r"accumulation_steps x replicas = 2 x 2"):  # fmt: skip
        replica_xla.enable_replica_xla(model, accumulation_steps=2)
    disable_multiplicative_noise(model)
    replica_xla.enable_replica_xla(model, accumulation_steps=2)
    with pytest.raises(ValueError, match=r"batch_size=18, which is not divisible"):
        enable_multiplicative_noise(model, batch_size=18, variance=1.0, seed=1)
    x, y = _data(32)
    enable_multiplicative_noise(model, batch_size=8, variance=1.0, seed=1)
    with pytest.raises(ValueError, match=r"8 x 2 \(accumulation steps\) x 2 \(replicas\) = 32, "
                       r"more than the batch_size=8"):  # fmt: skip
        model.fit(x, y, batch_size=16, verbose=0)


def test_resume_continues_both_kinds_exactly(tmp_path):
    # Multiplicative weights (step t, micro-batch m) and the matched trace's moving average,
    # at once, with accumulation: a run resumed from its epoch-1 checkpoint in a new model
    # ends with the weights of the uninterrupted run.
    x, y = _data(64, seed=4)

    def build():
        keras.utils.set_random_seed(1)
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        inner = keras.optimizers.SGD(0.05, momentum=0.9)
        model.compile(
            optimizer=MatchedNoiseOptimizer(inner, batch_size=B, small_batch_size=2, seed=SEED),
            loss="mse",
        )
        enable_multiplicative_noise(model, batch_size=B, small_batch_size=2, seed=SEED)
        return model

    def run(epochs, workdir):
        result = training.fit(
            build,
            epoch_batches((x, y), batch_size=B // 2, seed=0),
            epochs=epochs,
            steps_per_epoch=4,
            workdir=str(workdir),
            xla=False,
            accumulation_steps=2,
            verbose=0,
        )
        assert result.status == "done"
        return [np.asarray(w) for w in result.model.get_weights()]

    whole = run(2, tmp_path / "whole")
    run(1, tmp_path / "resumed")
    keras.utils.clear_session()
    resumed = run(2, tmp_path / "resumed")  # a new model, restored at epoch 1
    for a, b in zip(whole, resumed, strict=True):
        np.testing.assert_array_equal(a, b)
