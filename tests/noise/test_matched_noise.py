"""Covariance-matched white noise: the trace estimator, the size rule, the optimizer.

The probe (as in test_optimizer.py): variables reset to 0, zero gradients and
plain SGD with learning rate 1 make the applied update exactly minus the noise.
"""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from noisy_keras import find_noisy_optimizer, unit_noise
from noisy_keras.analysis import covariance_trace
from noisy_keras.noise.covariance import (
    covariance_trace_estimate,
    streaming_spread_update,
    two_group_trace_estimate,
)
from noisy_keras.noise.matched import MatchedNoiseOptimizer, matched_noise_variance
from noisy_keras.noise.optimizer import GradientNoiseWrapper, NoisyOptimizer

SHAPES = [(3, 4), (4,), (2, 2, 2)]
D = 12 + 4 + 8


def _zeros(shapes=SHAPES):
    return [keras.Variable(np.zeros(s, np.float32), name=f"v{i}") for i, s in enumerate(shapes)]


def _optimizer(batch_size=64, small_batch_size=8, seed=3, **kwargs):
    return MatchedNoiseOptimizer(
        keras.optimizers.SGD(1.0),
        batch_size=batch_size,
        small_batch_size=small_batch_size,
        seed=seed,
        **kwargs,
    )


def _step(optimizer, variables, estimate):
    """One update: observe the estimate, apply zero gradients; returns the noise added."""
    for v in variables:
        v.assign(tf.zeros_like(v))
    optimizer.observe_covariance_trace(estimate)
    optimizer.apply([tf.zeros_like(v) for v in variables], variables)
    return [-v.numpy() for v in variables]


class _Ema:
    """The moving average in float32, operation by operation, as the optimizer defines it."""

    def __init__(self, decay):
        self.decay, self.one_minus = np.float32(decay), np.float32(1.0 - decay)
        self.ema, self.power = np.float32(0), np.float32(1)

    def observe(self, x):
        x = np.float32(x)
        if np.isfinite(x) and x >= 0:
            self.ema = self.decay * self.ema + self.one_minus * x
            self.power = self.power * self.decay

    def trace(self):
        denominator = np.float32(1) - self.power
        return np.float32(0) if denominator == 0 else self.ema / denominator


# ---- The estimator ----------------------------------------------------------------------


def test_estimator_known_values_and_structures():
    # Two groups of n = 4: g_bar = (2, 0); squares (1 + 1) = 2; 4 / 1 * 2 = 8.
    assert float(covariance_trace_estimate([[1.0, 0.0], [3.0, 0.0]], group_size=4)) == 8.0
    # A list of tensors per group (one per variable), None for a variable without gradient.
    groups = [
        [tf.constant([[1.0, 2.0]]), None, tf.constant(0.0)],
        [tf.constant([[3.0, 2.0]]), None, tf.constant(3.0)],
        [tf.constant([[2.0, 5.0]]), None, tf.constant(3.0)],
    ]
    # Means (2, 3) and 2; squares 1+0+1 + 1+1+4 + 4+1+1 = 14; n = 5, G - 1 = 2: 35.
    assert float(covariance_trace_estimate(groups, group_size=5)) == 35.0
    # n = 1: groups are single examples, and the estimate is the 1/(N-1) sample trace.
    rng = np.random.default_rng(0)
    per_example = rng.normal(size=(9, 6))
    np.testing.assert_allclose(
        float(covariance_trace_estimate(list(per_example), group_size=1)),
        covariance_trace(per_example, unbiased=True),
        rtol=1e-12,
    )


def test_estimator_is_unbiased_for_a_known_covariance():
    # Per-example gradients ~ N(mu, Sigma); G groups of n; estimate ~ sum_k lambda_k chi2_{G-1}
    # / (G - 1), so its sd is sqrt(2 tr(Sigma^2) / (G - 1)), and the mean of R repeats has
    # sd sqrt(2 tr(Sigma^2) / ((G - 1) R)). The R repeats go in as one (R, dim) tensor per
    # group: the estimate sums over all coordinates, so it returns the sum of the R estimates.
    rng = np.random.default_rng(1)
    dim, groups, n, repeats = 6, 4, 8, 4000
    factor = rng.normal(size=(dim, dim))
    sigma = factor @ factor.T / dim
    mu = rng.normal(size=dim)
    examples = rng.multivariate_normal(mu, sigma, size=(groups, repeats, n))
    mean = float(covariance_trace_estimate(list(examples.mean(axis=2)), group_size=n)) / repeats
    sd = math.sqrt(2 * np.trace(sigma @ sigma) / ((groups - 1) * repeats))
    assert abs(mean - np.trace(sigma)) < 5 * sd
    # A test that can fail: dividing by G instead of G - 1 is 25% low here, 20 sd away.
    assert abs(mean * (groups - 1) / groups - np.trace(sigma)) > 5 * sd


def test_estimator_without_replacement_gives_the_n_minus_1_trace():
    # G groups partitioning N examples at random: mean tr(Sigma_N) N / (N - 1).
    rng = np.random.default_rng(2)
    population = rng.normal(size=(12, 5)) * np.array([1.0, 2.0, 0.5, 1.0, 3.0])
    groups, n, repeats = 3, 4, 4000
    orders = np.stack([rng.permutation(12).reshape(groups, n) for _ in range(repeats)])
    group_means = population[orders].mean(axis=2)  # (R, G, dim)
    mean = (
        float(covariance_trace_estimate(list(group_means.transpose(1, 0, 2)), group_size=n))
        / repeats
    )
    # The standard error of the mean, from the repeats' own estimates (NumPy).
    deviations = group_means - group_means.mean(axis=1, keepdims=True)
    each = n / (groups - 1) * np.sum(deviations**2, axis=(1, 2))
    assert mean == pytest.approx(each.mean(), rel=1e-12)
    standard_error = each.std(ddof=1) / math.sqrt(repeats)
    assert abs(mean - covariance_trace(population, unbiased=True)) < 5 * standard_error
    # Not the 1/N trace (12/11 times smaller), which is far off.
    assert abs(mean - covariance_trace(population)) > 5 * standard_error


def test_two_group_estimate_is_the_g_2_estimate_and_handles_unequal_groups():
    rng = np.random.default_rng(4)
    first, second = (
        [rng.normal(size=(3, 2)), rng.normal(size=4)],
        [
            rng.normal(size=(3, 2)),
            rng.normal(size=4),
        ],
    )
    equal = float(two_group_trace_estimate(first, second, 6, 6))
    assert equal == pytest.approx(float(covariance_trace_estimate([first, second], 6)), rel=1e-12)
    squares = sum(np.sum((a - b) ** 2) for a, b in zip(first, second))
    # Unequal groups: Var(g_1 - g_2) = Sigma (1/n_1 + 1/n_2).
    assert float(two_group_trace_estimate(first, second, 3, 5)) == pytest.approx(
        squares / (1 / 3 + 1 / 5), rel=1e-12
    )


def test_streaming_spread_folds_groups_to_the_two_pass_sum_of_squares():
    # Groups with a large common mean: Welford's update keeps the spread that the one-pass
    # sum |g_j|^2 - G |g_bar|^2 loses in float32.
    rng = np.random.default_rng(5)
    groups = [(1e3 + rng.normal(size=(4, 3))).astype(np.float32) for _ in range(5)]
    spread, running = tf.zeros([]), None
    for m, g in enumerate(groups):
        spread = streaming_spread_update(spread, None if m == 0 else [running], [g], m)
        running = g if running is None else running + g
    exact = np.sum((np.stack(groups, dtype=np.float64) - np.mean(groups, axis=0)) ** 2)
    assert float(spread) == pytest.approx(exact, rel=1e-4)
    flat = np.stack(groups).reshape(5, -1).astype(np.float32)
    one_pass = np.sum(flat**2) - 5 * np.sum(flat.mean(axis=0) ** 2)
    assert abs(one_pass - exact) > 1e-2 * exact  # the naive formula is far off here
    assert float(covariance_trace_estimate(groups, 7)) == pytest.approx(7 / 4 * exact, rel=1e-4)
    assert float(streaming_spread_update(3.0, None, [groups[0]], 0)) == 0.0  # S_0 = 0


def test_matched_noise_variance_formula():
    assert matched_noise_variance(2.0, num_parameters=16, batch_size=64, deficit=7.0) == (
        2.0 / 16 * 7.0 / 64
    )
    # At no scaling: tr/d * (1/b - 1/B).
    got = matched_noise_variance(3.0, num_parameters=10, batch_size=512, deficit=512 / 32 - 1)
    assert got == pytest.approx(3.0 / 10 * (1 / 32 - 1 / 512), rel=1e-15)


# ---- The optimizer: size, draw, state ---------------------------------------------------


def test_sigma_follows_the_bias_corrected_moving_average_exactly():
    decay, batch, small = 0.9, 64, 8
    optimizer = _optimizer(batch, small, ema_decay=decay)
    variables = _zeros()
    optimizer.build(variables)
    assert optimizer.num_parameters == D
    assert float(optimizer.noise_stddev) == 0.0  # no estimate yet: no noise
    reference = _Ema(decay)
    factor = np.float32((batch / small - 1) / (batch * D))
    for estimate in (2.0, 3.5, float("nan"), 0.25, float("inf"), 1e3, -1.0, 7.0):
        optimizer.observe_covariance_trace(tf.constant(estimate))
        reference.observe(estimate)
        assert float(optimizer.covariance_trace) == reference.trace()  # bit for bit
        sigma = np.sqrt(reference.trace() * factor)
        assert float(optimizer.noise_stddev) == sigma
        assert sigma == pytest.approx(math.sqrt(reference.trace() / D * 7 / 64), rel=1e-6)
    # One observation with decay 0 is the estimate itself.
    single = _optimizer(ema_decay=0.0)
    single.build(_zeros())
    single.observe_covariance_trace(2.0)
    assert float(single.covariance_trace) == 2.0


def test_noise_is_unit_noise_times_sigma_t_step_by_step():
    seed, steps = 17, 6
    optimizer = _optimizer(seed=seed, ema_decay=0.5)
    variables = _zeros()
    optimizer.build(variables)
    reference = _Ema(0.5)
    factor = np.float32(7 / (64 * D))
    for t in range(steps):
        estimate = 1.0 + t
        added = _step(optimizer, variables, estimate)
        reference.observe(estimate)
        sigma = np.sqrt(reference.trace() * factor)
        want = unit_noise(SHAPES, seed, t, scale=tf.constant(sigma))
        for got, w in zip(added, want):
            np.testing.assert_array_equal(got, w.numpy())
    assert int(optimizer.iterations) == steps


@pytest.mark.parametrize("jit_compile", [False, True])
def test_compiled_step_matches_eager_and_traces_once(jit_compile):
    estimates = [2.0, 0.5, 4.0, 1.0]
    eager_optimizer, eager_variables = _optimizer(seed=9), _zeros()
    eager_optimizer.build(eager_variables)
    eager = [_step(eager_optimizer, eager_variables, e) for e in estimates]

    optimizer, variables = _optimizer(seed=9), _zeros()
    optimizer.build(variables)
    traces = []

    @tf.function(jit_compile=jit_compile)
    def step(estimate):
        traces.append(1)
        for v in variables:
            v.assign(tf.zeros_like(v))
        optimizer.observe_covariance_trace(estimate)
        optimizer.apply([tf.zeros_like(v) for v in variables], variables)

    for t, estimate in enumerate(estimates):
        step(tf.constant(estimate))
        for got, want in zip(variables, eager[t]):
            # XLA may fuse the moving average's multiply-adds: a few float32 ulp.
            np.testing.assert_allclose(-got.numpy(), want, rtol=1e-6, atol=0)
    assert len(traces) == 1


def _cpu_mirrored(num_replicas):
    # Reduction to one device: collective keys would collide between strategies in one process.
    return tf.distribute.MirroredStrategy(
        [f"/cpu:{i}" for i in range(num_replicas)],
        cross_device_ops=tf.distribute.ReductionToOneDevice(),
    )


def _mirrored_noise(num_replicas, estimates):
    strategy = _cpu_mirrored(num_replicas)
    with strategy.scope():
        variables = _zeros()
        optimizer = _optimizer(seed=4)
        optimizer.build(variables)

    @tf.function
    def step(estimate):
        def replica_fn():
            optimizer.observe_covariance_trace(estimate)
            optimizer.apply([tf.zeros_like(v) for v in variables], variables)

        strategy.run(replica_fn)

    seen = []
    for estimate in estimates:
        for v in variables:
            v.assign(tf.zeros_like(v))
        step(tf.constant(estimate))
        for v in variables:
            copies = [c.numpy() for c in v.value.values]
            assert len(copies) == num_replicas
            for c in copies[1:]:
                np.testing.assert_array_equal(copies[0], c)  # identical on every replica
        seen.append([-v.value.values[-1].numpy() for v in variables])
    ema = optimizer._trace_ema.value.values
    assert all(float(e) == float(ema[0]) for e in ema)
    return seen


def test_mirrored_noise_is_identical_on_replicas_and_does_not_scale_with_replicas():
    estimates = [2.0, 3.0, 0.5]
    one, two = _mirrored_noise(1, estimates), _mirrored_noise(2, estimates)
    for a_step, b_step in zip(one, two):
        for a, b in zip(a_step, b_step):
            np.testing.assert_array_equal(a, b)  # noise / 2 on each of 2 sums to the noise
            assert np.any(a != 0)


def _tiny_regression_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 5)).astype(np.float32)
    y = (x @ rng.normal(size=(5, 2))).astype(np.float32)
    return x, y


def _compiled_model(optimizer):
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(8, "tanh"), keras.layers.Dense(2)]
    )
    model.compile(optimizer=optimizer, loss="mse")
    return model


def test_zero_deficit_is_bit_identical_to_the_inner_optimizer_through_fit():
    x, y = _tiny_regression_data()

    def fit(optimizer):
        model = _compiled_model(optimizer)
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        return model.get_weights()

    def inner():
        return keras.optimizers.SGD(0.05, momentum=0.9)

    plain = fit(inner())
    for small, multiplier in ((16, 1.0), (4, 4.0)):  # B = b; linear scaling
        wrapped = MatchedNoiseOptimizer(
            inner(), batch_size=16, small_batch_size=small, lr_multiplier=multiplier, seed=1
        )
        assert not wrapped.adds_noise
        for a, b in zip(plain, fit(wrapped)):
            np.testing.assert_array_equal(a, b)
    # With a deficit, Keras' own fit never estimates tr(Sigma): refused, not silently noiseless.
    with pytest.raises(ValueError, match=r"observe_covariance_trace\(estimate\) was never called"):
        fit(MatchedNoiseOptimizer(inner(), batch_size=16, small_batch_size=4, seed=1))


# ---- Serialization ----------------------------------------------------------------------


def test_config_round_trip():
    optimizer = MatchedNoiseOptimizer(
        keras.optimizers.Adam(3e-3),
        batch_size=256,
        small_batch_size=32,
        lr_multiplier=2.0,
        seed=123,
        ema_decay=0.95,
        name="matched",
    )
    clone = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert isinstance(clone, MatchedNoiseOptimizer)
    assert clone.get_config() == optimizer.get_config()
    assert (clone.batch_size, clone.small_batch_size, clone.lr_multiplier) == (256, 32, 2.0)
    assert (clone.seed, clone.ema_decay, clone.deficit, clone.name) == (123, 0.95, 3.0, "matched")


def test_keras_file_round_trip_restores_the_moving_average(tmp_path):
    x, y = _tiny_regression_data()
    model = _compiled_model(
        MatchedNoiseOptimizer(
            keras.optimizers.SGD(0.05), batch_size=16, small_batch_size=4, seed=5, ema_decay=0.8
        )
    )
    optimizer = model.optimizer
    optimizer.build(model.trainable_variables)
    for estimate in (3.0, 1.0, 2.0):
        optimizer.observe_covariance_trace(estimate)
    path = tmp_path / "m.keras"
    model.save(path)
    restored = keras.models.load_model(path).optimizer
    assert isinstance(restored, MatchedNoiseOptimizer)
    assert float(restored.covariance_trace) == float(optimizer.covariance_trace) > 0
    assert float(restored.noise_stddev) == float(optimizer.noise_stddev)
    names = [v.name for v in restored.variables[:4]]
    assert names[2:] == ["covariance_trace_ema", "ema_decay_power"]
    for a, b in zip(restored.variables, optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---- Bad arguments ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"batch_size": 0}, r"batch_size must be an integer >= 1; received batch_size=0"),
        ({"small_batch_size": "8"}, r"small_batch_size must be an integer >= 1.*='8'"),
        ({"lr_multiplier": -1.0}, r"lr_multiplier must be a finite number > 0.*=-1.0"),
        ({"ema_decay": 1.0}, r"ema_decay must be a number in \[0, 1\).*ema_decay=1.0"),
        ({"ema_decay": -0.1}, r"ema_decay must be a number in \[0, 1\).*=-0.1"),
        ({"seed": 2**31}, r"`seed` must be None or an integer"),
        ({"alpha": 1e-5}, r"unexpected argument\(s\) \['alpha'\].*Allowed: optimizer, batch"),
        ({"momentum": 0.9}, r"MatchedNoiseOptimizer got unexpected argument\(s\) \['momentum'\]"),
        ({"clipnorm": 1.0}, r"MatchedNoiseOptimizer does not take `clipnorm`.*wrapped optimizer"),
    ],
)
def test_bad_arguments_are_named(kwargs, pattern):
    arguments = {"batch_size": 64, "small_batch_size": 8, **kwargs}
    with pytest.raises(ValueError, match=pattern):
        MatchedNoiseOptimizer(keras.optimizers.SGD(0.1), **arguments)


def test_bad_observations_are_named():
    optimizer = _optimizer()
    with pytest.raises(ValueError, match=r"observe_covariance_trace needs the optimizer built"):
        optimizer.observe_covariance_trace(1.0)
    optimizer.build(_zeros())
    with pytest.raises(ValueError, match=r"estimate must be a finite number >= 0.*=-2.0"):
        optimizer.observe_covariance_trace(-2.0)
    with pytest.raises(ValueError, match=r"estimate must be a finite number >= 0.*=nan"):
        optimizer.observe_covariance_trace(float("nan"))
    with pytest.raises(ValueError, match=r"estimate must be a scalar; received shape \(2,\)"):
        optimizer.observe_covariance_trace(tf.constant([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"group_gradients must be a sequence of G >= 2"):
        covariance_trace_estimate([np.ones(3)], group_size=4)
    with pytest.raises(ValueError, match=r"group_size must be an integer >= 1.*=0"):
        covariance_trace_estimate([np.ones(3), np.zeros(3)], group_size=0)


def test_matched_is_a_noise_wrapper_beside_noisy_optimizer_not_a_zeroed_one():
    optimizer = MatchedNoiseOptimizer(
        keras.optimizers.SGD(0.1, clipnorm=1.0), batch_size=512, small_batch_size=32, seed=1
    )
    assert isinstance(optimizer, GradientNoiseWrapper)
    assert not isinstance(optimizer, NoisyOptimizer)
    assert not hasattr(optimizer, "alpha") and not hasattr(optimizer, "gamma")
    assert optimizer.clipping == {"clipnorm": 1.0}  # taken over as by NoisyOptimizer
    assert optimizer.inner_optimizer.clipnorm is None
    scaled = keras.optimizers.LossScaleOptimizer(optimizer)
    assert find_noisy_optimizer(scaled) is optimizer
    with pytest.raises(ValueError, match=r"already a MatchedNoiseOptimizer; wrapping it again"):
        NoisyOptimizer(optimizer)
