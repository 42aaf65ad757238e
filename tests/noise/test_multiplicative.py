"""Multiplicative (per-example) noise: the weights, the noise they add, and `model.fit`.

Statistical checks use five standard deviations of the statistic, computed
from the sample size (the draws are seeded, so each check is deterministic).
"""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from noisy_keras.noise import draw
from noisy_keras.noise.multiplicative import (
    WEIGHTS_KEY_SALT,
    MultiplicativeNoise,
    disable_multiplicative_noise,
    enable_multiplicative_noise,
    example_weights,
    global_offset,
)

ULP1 = 2.0**-23  # float32 spacing at 1


# ---- The positional draw ------------------------------------------------------------------


@pytest.mark.parametrize("first_block", [0, 5, 2**32 - 3])  # the last crosses into hi(p)
def test_philox_words_from_a_block_offset_agree_in_and_out_of_xla(first_block):
    key, step = 7 + (WEIGHTS_KEY_SALT << 32), tf.constant(11, tf.int64)
    kernel = draw._philox_words(24, key, step, first_block=first_block).numpy()
    loop = draw._philox_words_loop(24, key, step, first_block=first_block).numpy()
    np.testing.assert_array_equal(loop, kernel)
    if first_block < 100:
        from_zero = draw._philox_words(4 * first_block + 24, key, step).numpy()
        np.testing.assert_array_equal(kernel, from_zero[4 * first_block :])


def test_weights_of_pieces_equal_the_block_bit_for_bit():
    step, variance, seed = tf.Variable(3, dtype=tf.int64), 15.0, 4
    block = example_weights(1024, seed=seed, step=step, variance=variance).numpy()
    graph = tf.function(
        lambda n, o: example_weights(n, seed=seed, step=step, offset=o, variance=15.0)
    )
    # Replicas of a batch of 1024, micro-batches of an accumulated update, odd pieces.
    for pieces in (
        [(0, 512), (512, 512)],
        [(256 * r, 256) for r in range(4)],
        [(3, 70), (901, 123)],
    ):
        for offset, num in pieces:
            got = example_weights(num, seed=seed, step=step, offset=offset, variance=variance)
            np.testing.assert_array_equal(got.numpy(), block[offset : offset + num])
            got = graph(tf.constant(num), tf.constant(offset, tf.int64))
            np.testing.assert_array_equal(got.numpy(), block[offset : offset + num])


def test_compiled_weights_equal_eager_within_a_stated_bound():
    step, variance, seed = tf.Variable(9, dtype=tf.int64), 31.0, 12
    s = math.sqrt(variance)

    @tf.function(jit_compile=True)
    def compiled(num, offset):
        return example_weights(num, seed=seed, step=step, offset=offset, variance=variance)

    block = compiled(tf.constant(4096), tf.constant(0, tf.int64)).numpy()
    piece = compiled(tf.constant(1000), tf.constant(1500, tf.int64)).numpy()
    np.testing.assert_array_equal(piece, block[1500:2500])  # pieces = block under XLA too
    eager = example_weights(4096, seed=seed, step=step, variance=variance).numpy()
    z = (eager.astype(np.float64) - 1) / s
    # XLA's log/cos differ from TensorFlow's kernels by < 4 ulp of max(1, |z|) (measured
    # 2.7 ulp over 3e6 draws); w = 1 + s z adds one rounding of max(1, |w|).
    bound = 4 * ULP1 * (s * np.maximum(1, np.abs(z)) + np.maximum(1, np.abs(eager)))
    assert np.all(np.abs(block.astype(np.float64) - eager) <= bound)
    assert np.any(block != eager)  # the bound is needed: not bit-equal on CPU


def test_weights_have_mean_one_and_variance_s_squared():
    variance, n = 15.0, 100_000
    w = np.concatenate(
        [example_weights(n, seed=1, step=t, variance=variance).numpy() for t in range(2)]
    ).astype(np.float64)
    count = w.size
    # Mean ~ N(1, s^2/N); for Gaussian w the sample variance has relative sd sqrt(2/(N-1)).
    assert abs(w.mean() - 1) < 5 * math.sqrt(variance / count)
    assert abs(w.var(ddof=1) / variance - 1) < 5 * math.sqrt(2 / (count - 1))
    # Gaussian: P(w < 1 - s) = Phi(-1) = 0.158655; a binomial proportion's sd.
    p = 0.5 * math.erfc(1 / math.sqrt(2))
    assert abs(np.mean(w < 1 - math.sqrt(variance)) - p) < 5 * math.sqrt(p * (1 - p) / count)
    # Steps and positions are independent: correlation ~ N(0, 1/n).
    a, b = w[:n] - 1, w[n:] - 1
    assert abs(np.mean(a * b) / variance) < 5 / math.sqrt(n)
    assert abs(np.mean(a[:-1] * a[1:]) / variance) < 5 / math.sqrt(n)


def test_weights_depend_on_seed_step_and_position_only():
    a = example_weights(64, seed=5, step=2, variance=3.0).numpy()
    np.testing.assert_array_equal(a, example_weights(64, seed=5, step=2, variance=3.0).numpy())
    np.testing.assert_array_equal(
        a, example_weights(64, seed=5, step=tf.constant(2, tf.int64), variance=3.0).numpy()
    )
    assert not np.any(a == example_weights(64, seed=6, step=2, variance=3.0).numpy())
    assert not np.any(a == example_weights(64, seed=5, step=3, variance=3.0).numpy())
    # The salted key never reproduces the white noise of the same seed and step.
    white = draw.positional_standard_normal(64, 5, 2).numpy()
    assert not np.any((a - 1) / np.sqrt(3.0) == white)
    np.testing.assert_array_equal(example_weights(7, seed=5, step=2, variance=0.0), np.ones(7))


def test_global_offset_lays_out_micro_batches_then_replicas():
    b = 64  # k = 2 micro-batches of 32, R = 2 replicas of 16 in each
    got = [
        global_offset(batch_size=b, replica_id=r, num_replicas=2, micro_batch=m, micro_batches=2)
        for m in range(2)
        for r in range(2)
    ]
    assert got == [0, 16, 32, 48]
    tensor = global_offset(batch_size=b, replica_id=tf.constant(1), num_replicas=2)
    assert int(tensor) == 32
    with pytest.raises(ValueError, match=r"divisible by micro_batches \* num_replicas = 3 \* 2"):
        global_offset(batch_size=64, num_replicas=2, micro_batches=3)


# ---- Through Keras: the loss, the gradient noise ------------------------------------------


def _linear_model(optimizer, seed=1, **compile_kwargs):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer=optimizer, loss="mse", **compile_kwargs)
    return model


def _data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)).astype(np.float32)
    y = (x @ np.array([[1.0], [-2.0], [0.5]]) + 0.3 * rng.normal(size=(n, 1))).astype(np.float32)
    return x, y


def test_training_loss_is_weighted_and_evaluation_loss_is_plain():
    x, y = _data(16)
    model = _linear_model(keras.optimizers.SGD(0.1))
    model.optimizer.build(model.trainable_variables)
    model.optimizer.iterations.assign(5)
    settings = enable_multiplicative_noise(model, batch_size=16, variance=3.0, seed=8)
    per_example = np.mean((model.predict(x, verbose=0) - y) ** 2, axis=1)
    w = example_weights(16, seed=8, step=5, variance=3.0).numpy()
    sample_weight = np.linspace(0.5, 2.0, 16).astype(np.float32)
    y_pred = model(x)

    def loss(training, sw=None):
        return float(model.compute_loss(x, y, y_pred, sw, training=training))

    # Keras' "sum_over_batch_size" divides by the count, not by the sum of weights.
    assert loss(True) == pytest.approx(np.mean(w * per_example), rel=1e-6)
    assert loss(True, sample_weight) == pytest.approx(
        np.mean(sample_weight * w * per_example), rel=1e-6
    )
    assert loss(False) == pytest.approx(np.mean(per_example), rel=1e-6)
    assert model.evaluate(x, y, verbose=0) == pytest.approx(np.mean(per_example), rel=1e-6)
    assert settings == MultiplicativeNoise(variance=3.0, seed=8, batch_size=16)


class _GradientRecorder(keras.optimizers.Optimizer):
    """Records the flattened gradient of every step in row `iterations`; weights stay put."""

    def __init__(self, rows):
        super().__init__(learning_rate=0.0, name="gradient_recorder")
        self.rows = rows

    def build(self, variables):
        super().build(variables)
        size = sum(int(np.prod(v.shape)) for v in variables)
        self.gradients = self.add_variable((self.rows, size), name="gradients")

    def apply(self, grads, trainable_variables=None):
        if not self.built:
            self.build(trainable_variables)
        flat = tf.concat([tf.reshape(g, [-1]) for g in grads], axis=0)
        row = tf.cast(self.iterations, tf.int32)
        self.gradients.assign(
            tf.tensor_scatter_nd_update(self.gradients, [[row]], flat[tf.newaxis])
        )
        self.iterations.assign_add(1)


def test_gradient_noise_covariance_is_s2_over_b2_sum_gi_gi_t():
    # Least squares, Dense(1): l_i = (w.x_i + c - y_i)^2, g_i = 2 r_i [x_i, 1].
    batch, draws, variance, seed = 8, 4000, 3.0, 2
    x, y = _data(batch, seed=1)
    model = _linear_model(_GradientRecorder(draws), steps_per_execution=500)
    enable_multiplicative_noise(model, batch_size=batch, variance=variance, seed=seed)
    kernel, bias = (v.numpy().astype(np.float64) for v in model.trainable_variables)
    residual = (x @ kernel + bias - y)[:, 0]
    per_example = 2 * residual[:, None] * np.concatenate([x, np.ones((batch, 1))], axis=1)
    x_all, y_all = np.tile(x, (draws, 1)), np.tile(y, (draws, 1))
    model.fit(x_all, y_all, batch_size=batch, shuffle=False, verbose=0)
    gradients = model.optimizer.gradients.numpy().astype(np.float64)
    np.testing.assert_allclose(model.trainable_variables[0].numpy(), kernel)  # weights stay put

    # Each draw, exactly: (1/B) sum_i w_i g_i with the weights of step t.
    for t in (0, 1, draws - 1):
        w = example_weights(batch, seed=seed, step=t, variance=variance).numpy()
        np.testing.assert_allclose(gradients[t], w @ per_example / batch, rtol=2e-5, atol=1e-6)

    # Over the draws: mean g_B, covariance C = s^2 / B^2 sum_i g_i g_i^T.
    added = gradients - per_example.mean(axis=0)
    predicted = variance / batch**2 * per_example.T @ per_example
    diagonal = np.diag(predicted)
    assert np.all(np.abs(added.mean(axis=0)) < 5 * np.sqrt(diagonal / draws))
    sample = np.cov(added, rowvar=False)
    # Gaussian noise: Var tr(S) = 2 tr(C^2) / (D - 1); Var S_jk = (C_jj C_kk + C_jk^2) / (D - 1).
    trace_sd = math.sqrt(2 * np.trace(predicted @ predicted) / (draws - 1))
    assert abs(np.trace(sample) - np.trace(predicted)) < 5 * trace_sd
    entry_sd = np.sqrt((np.outer(diagonal, diagonal) + predicted**2) / (draws - 1))
    assert np.all(np.abs(sample - predicted) < 5 * entry_sd)
    # A test that can fail: had the weights variance s (not s^2), the trace would be off by
    # sqrt(3) times, far outside five standard deviations.
    assert abs(np.trace(sample) / math.sqrt(variance) - np.trace(predicted)) > 5 * trace_sd


def _fit(model, x, y, batch_size=16, epochs=3):
    model.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=False, verbose=0)
    return model.get_weights()


def test_zero_deficit_is_bit_identical_to_no_noise():
    x, y = _data()
    plain = _fit(_linear_model(keras.optimizers.SGD(0.05, momentum=0.9)), x, y)
    for kwargs in (
        {"small_batch_size": 16},  # B/b = 1
        {"small_batch_size": 4, "lr_multiplier": 4.0},  # linear scaling
        {"variance": 0.0},
    ):
        model = _linear_model(keras.optimizers.SGD(0.05, momentum=0.9))
        settings = enable_multiplicative_noise(model, batch_size=16, seed=1, **kwargs)
        assert settings.variance == 0.0
        for a, b in zip(plain, _fit(model, x, y)):
            np.testing.assert_array_equal(a, b)
    noisy = _linear_model(keras.optimizers.SGD(0.05, momentum=0.9))
    enable_multiplicative_noise(noisy, batch_size=16, small_batch_size=4, seed=1)
    assert not np.array_equal(plain[0], _fit(noisy, x, y)[0])  # noise does change the run


def test_jit_compiled_fit_matches_uncompiled():
    x, y = _data()
    runs = []
    for jit_compile in (False, True):
        model = _linear_model(keras.optimizers.SGD(0.05), jit_compile=jit_compile)
        enable_multiplicative_noise(model, batch_size=16, small_batch_size=4, seed=3)
        runs.append(_fit(model, x, y))
        assert model.jit_compile is jit_compile
    for a, b in zip(*runs):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_keras_own_accumulation_is_refused_in_favour_of_the_engine():
    model = _linear_model(keras.optimizers.SGD(0.05, gradient_accumulation_steps=2))
    with pytest.raises(ValueError, match=r"gradient_accumulation_steps=2.*accumulation_steps"):
        enable_multiplicative_noise(model, batch_size=16, small_batch_size=4, seed=5)


def _cpu_mirrored(num_replicas):
    # Reduction to one device: collective keys would collide between strategies in one process.
    return tf.distribute.MirroredStrategy(
        [f"/cpu:{i}" for i in range(num_replicas)],
        cross_device_ops=tf.distribute.ReductionToOneDevice(),
    )


def test_one_and_two_replicas_add_the_same_noise_through_fit():
    x, y = _data()

    def run(num_replicas):
        with _cpu_mirrored(num_replicas).scope():
            model = _linear_model(keras.optimizers.SGD(0.05, momentum=0.9))
        enable_multiplicative_noise(model, batch_size=16, small_batch_size=2, seed=7)
        return _fit(model, x, y, epochs=2)

    one, two = run(1), run(2)
    for a, b in zip(one, two):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    plain = _fit(_linear_model(keras.optimizers.SGD(0.05, momentum=0.9)), x, y, epochs=2)
    assert np.max(np.abs(plain[0] - two[0])) > 1e-2  # the noise is there, and matters


def test_disable_restores_the_plain_loss():
    x, y = _data(16)
    model = _linear_model(keras.optimizers.SGD(0.1))
    enable_multiplicative_noise(model, batch_size=16, variance=3.0, seed=8)
    disable_multiplicative_noise(model)
    y_pred = model(x)
    plain = np.mean((y_pred.numpy() - y) ** 2)
    assert float(model.compute_loss(x, y, y_pred, training=True)) == pytest.approx(plain, 1e-6)
    enable_multiplicative_noise(model, batch_size=16, variance=3.0, seed=8)  # allowed again
    with pytest.raises(ValueError, match="was not applied"):
        disable_multiplicative_noise(_linear_model("sgd"))


# ---- Bad arguments ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"variance": -1.0}, r"variance must be a finite number >= 0; received variance=-1.0"),
        ({"variance": float("inf")}, r"variance must be a finite number >= 0.*=inf"),
        ({"variance": 1.0, "small_batch_size": 4}, r"either variance or small_batch_size"),
        ({"variance": 1.0, "lr_multiplier": 2.0}, r"either variance or small_batch_size"),
        ({}, r"Give either small_batch_size.*or variance; received neither"),
        ({"batch_size": 0, "variance": 1.0}, r"batch_size must be an integer >= 1.*=0"),
        ({"small_batch_size": 0}, r"small_batch_size must be an integer >= 1.*=0"),
        ({"small_batch_size": 4, "lr_multiplier": -1.0}, r"lr_multiplier must be.*=-1.0"),
        ({"variance": 1.0, "seed": -1}, r"`seed` must be None or an integer in \[0, 2147483647\]"),
    ],
)
def test_bad_arguments_are_named(kwargs, pattern):
    arguments = {"batch_size": 16, **kwargs}
    with pytest.raises(ValueError, match=pattern):
        enable_multiplicative_noise(_linear_model(keras.optimizers.SGD(0.1)), **arguments)


def test_bad_models_and_setups_are_refused():
    uncompiled = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    with pytest.raises(ValueError, match="must be compiled"):
        enable_multiplicative_noise(uncompiled, batch_size=16, variance=1.0)
    with pytest.raises(ValueError, match="keras.Model; received str"):
        enable_multiplicative_noise("model", batch_size=16, variance=1.0)
    model = _linear_model(keras.optimizers.SGD(0.1))
    enable_multiplicative_noise(model, batch_size=16, variance=1.0)
    with pytest.raises(ValueError, match="already applied"):
        enable_multiplicative_noise(model, batch_size=16, variance=1.0)
    ratio = keras.losses.MeanSquaredError(reduction="mean_with_sample_weight")
    with pytest.raises(ValueError, match="reduction='mean_with_sample_weight'.*allowed"):
        enable_multiplicative_noise(_ratio_model(ratio), batch_size=16, variance=1.0)


def _ratio_model(loss):
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss=loss)
    return model


def test_under_the_engine_the_patched_loss_steps_aside():
    # The engine's core weights the examples itself (tests/engine/test_noise_engine.py); the patched
    # compute_loss must then return the plain loss, or the weights would enter twice.
    from noisy_keras.engine.steps import enable_replica_xla

    x, y = _data(16)
    model = _linear_model(keras.optimizers.SGD(0.1))
    model.build((None, 3))
    enable_replica_xla(model, jit_compile=False)
    enable_multiplicative_noise(model, batch_size=16, variance=1.0, seed=8)
    y_pred = model(x)
    plain = np.mean((y_pred.numpy() - y) ** 2)
    assert float(model.compute_loss(x, y, y_pred, training=True)) == pytest.approx(plain, 1e-6)
    assert model.train_function is None  # a function traced before would miss the weights
