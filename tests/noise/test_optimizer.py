"""NoisyOptimizer: the noise semantics of issue #2, each shown by a test.

The probe used throughout: variables reset to 0, zero gradients and plain SGD
with learning rate 1 make the applied update exactly minus the added noise.
"""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from noisy_keras import NoisyOptimizer, noise_stddev, unit_noise

SHAPES = [(3, 4), (4,), (2, 2, 2)]


def _zeros(shapes=SHAPES):
    return [keras.Variable(np.zeros(s, np.float32), name=f"v{i}") for i, s in enumerate(shapes)]


def _applied_noise(optimizer, variables, steps):
    """Noise added at each of `steps` updates, seen through SGD(lr=1) on zero gradients."""
    seen = []
    for _ in range(steps):
        for v in variables:
            v.assign(tf.zeros_like(v))
        optimizer.apply([tf.zeros_like(v) for v in variables], variables)
        seen.append([-v.numpy() for v in variables])
    return seen


def _expected_noise(seed, step, alpha, gamma, shapes=SHAPES):
    sigma = math.sqrt(alpha / (1 + step) ** gamma)
    return [sigma * z.numpy().astype(np.float64) for z in unit_noise(shapes, seed, step)]


# ---- 1. variance alpha / (1 + t)^gamma, exactly and statistically ---------------------


def test_noise_is_unit_noise_times_sigma_t_step_by_step():
    steps, seed, alpha, gamma = 40, 17, 3e-3, 0.55
    scaled = _applied_noise(
        NoisyOptimizer(keras.optimizers.SGD(1.0), alpha, gamma, seed), _zeros(), steps
    )
    unit = _applied_noise(
        NoisyOptimizer(keras.optimizers.SGD(1.0), 1.0, 0.0, seed), _zeros(), steps
    )
    for t in range(steps):
        factor = math.sqrt(alpha / (1 + t) ** gamma)
        for got, base, want in zip(scaled[t], unit[t], _expected_noise(seed, t, alpha, gamma)):
            np.testing.assert_allclose(got, base * factor, rtol=2e-7, atol=0)
            np.testing.assert_allclose(got, want, rtol=2e-7, atol=0)


def test_noise_sample_variance_is_sigma_t_squared():
    n = 250_000
    alpha, gamma = 1e-5, 0.55
    optimizer = NoisyOptimizer(keras.optimizers.SGD(1.0), alpha, gamma, seed=3)
    variables = _zeros([(n,)])
    for t, (sample,) in enumerate(_applied_noise(optimizer, variables, 3)):
        variance = alpha / (1 + t) ** gamma
        sample = sample.astype(np.float64)
        # Mean ~ N(0, var/n); sample variance has relative sd sqrt(2/(n-1)): five sd each.
        assert abs(sample.mean()) < 5 * math.sqrt(variance / n)
        assert abs(sample.var(ddof=1) / variance - 1) < 5 * math.sqrt(2 / (n - 1))


def test_noise_stddev_property_follows_iterations():
    optimizer = NoisyOptimizer(keras.optimizers.SGD(1.0), alpha=1e-5, gamma=0.55, seed=0)
    variables = _zeros()
    optimizer.build(variables)
    assert float(optimizer.noise_stddev) == pytest.approx(math.sqrt(1e-5), rel=1e-6)
    _applied_noise(optimizer, variables, 4)
    assert int(optimizer.iterations) == 4
    assert float(optimizer.noise_stddev) == pytest.approx(float(noise_stddev(4)), rel=1e-6)


# ---- 2. alpha = 0 is bit-identical to the inner optimizer -------------------------------


def _tiny_regression_data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(64, 5)).astype(np.float32)
    y = (x @ rng.normal(size=(5, 2)) + 0.1 * rng.normal(size=(64, 2))).astype(np.float32)
    return x, y


def _fit_weights(optimizer, epochs=3, seed=0, model_seed=1):
    x, y = _tiny_regression_data(seed)
    keras.utils.set_random_seed(model_seed)
    model = keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(8, "tanh"), keras.layers.Dense(2)]
    )
    model.compile(optimizer=optimizer, loss="mse")
    model.fit(x, y, batch_size=16, epochs=epochs, shuffle=False, verbose=0)
    return model.get_weights()


@pytest.mark.parametrize(
    "make_inner",
    [
        lambda: keras.optimizers.SGD(0.05, momentum=0.9),
        lambda: keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True),
        lambda: keras.optimizers.Adam(1e-2),
        lambda: keras.optimizers.AdamW(1e-2, weight_decay=0.01),
        # Clipping, which the wrapper takes over: on one device, Keras' own rule, bit for bit.
        lambda: keras.optimizers.SGD(0.05, momentum=0.9, clipnorm=0.1),
        lambda: keras.optimizers.Adam(1e-2, global_clipnorm=0.1),
        lambda: keras.optimizers.SGD(0.05, clipvalue=0.01),
    ],
    ids=["sgd_momentum", "nesterov", "adam", "adamw", "clipnorm", "global_clipnorm", "clipvalue"],
)
def test_alpha_zero_is_bit_identical_to_inner(make_inner):
    bare = _fit_weights(make_inner())
    wrapped = _fit_weights(NoisyOptimizer(make_inner(), alpha=0.0, seed=1))
    for a, b in zip(bare, wrapped):
        np.testing.assert_array_equal(a, b)


def test_clipping_is_active_in_the_bit_identity_cases():
    """Else the clipping cases above would not show the wrapper clips as Keras does."""
    unclipped = _fit_weights(keras.optimizers.SGD(0.05, momentum=0.9))
    clipped = _fit_weights(NoisyOptimizer(keras.optimizers.SGD(0.05, momentum=0.9, clipnorm=0.1)))
    assert not np.allclose(unclipped[0], clipped[0], atol=1e-3)


@pytest.mark.parametrize(
    "make_inner",
    [lambda: keras.optimizers.RMSprop(1e-2), lambda: keras.optimizers.Lion(2e-2)],
    ids=["rmsprop", "lion"],
)
def test_other_inner_optimizers_train_with_noise(make_inner):
    x, y = _tiny_regression_data()
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(2)])
    model.compile(optimizer=NoisyOptimizer(make_inner(), alpha=1e-5, seed=2), loss="mse")
    first = model.evaluate(x, y, verbose=0)
    model.fit(x, y, batch_size=16, epochs=20, shuffle=False, verbose=0)
    assert model.evaluate(x, y, verbose=0) < 0.5 * first


# ---- 3. reproducible; the seed is stored ------------------------------------------------


def test_same_seed_same_trajectory_other_seed_other_noise():
    def run(seed):
        return _fit_weights(NoisyOptimizer(keras.optimizers.SGD(0.05), alpha=1e-2, seed=seed))

    a, b, c = run(5), run(5), run(6)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])


def test_seed_none_is_drawn_once_and_stored_in_config():
    first = NoisyOptimizer(keras.optimizers.SGD(0.05), alpha=1e-2)
    second = NoisyOptimizer(keras.optimizers.SGD(0.05), alpha=1e-2)
    assert isinstance(first.seed, int) and 0 <= first.seed < 2**31
    assert first.get_config()["seed"] == first.seed
    assert first.seed != second.seed  # equal with probability 2**-31
    replay = NoisyOptimizer.from_config(first.get_config())
    for x, y in zip(_fit_weights(first), _fit_weights(replay)):
        np.testing.assert_array_equal(x, y)


# ---- 4. tf.function and XLA without retracing -------------------------------------------


@pytest.mark.parametrize("jit_compile", [False, True])
def test_compiled_step_matches_eager_and_traces_once(jit_compile):
    seed, alpha, gamma, steps = 9, 1e-3, 0.55, 6
    eager = _applied_noise(
        NoisyOptimizer(keras.optimizers.SGD(1.0), alpha, gamma, seed), _zeros(), steps
    )

    optimizer = NoisyOptimizer(keras.optimizers.SGD(1.0), alpha, gamma, seed)
    variables = _zeros()
    optimizer.build(variables)
    traces = []

    @tf.function(jit_compile=jit_compile)
    def step():
        traces.append(1)
        for v in variables:
            v.assign(tf.zeros_like(v))
        optimizer.apply([tf.zeros_like(v) for v in variables], variables)

    for t in range(steps):
        step()
        for got, want in zip(variables, eager[t]):
            np.testing.assert_allclose(-got.numpy(), want, rtol=1e-6, atol=0)
    assert len(traces) == 1
    assert step.experimental_get_tracing_count() == 1


def test_fit_with_jit_compile_traces_train_function_once():
    x, y = _tiny_regression_data()
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(2)])
    optimizer = NoisyOptimizer(keras.optimizers.SGD(0.05), alpha=1e-3, seed=1)
    traced = []
    plain_apply = optimizer.apply

    def counting_apply(grads, trainable_variables=None):
        traced.append(1)  # Python runs only while tracing the compiled step
        return plain_apply(grads, trainable_variables)

    optimizer.apply = counting_apply
    model.compile(optimizer=optimizer, loss="mse", jit_compile=True)
    assert model.jit_compile is True  # Keras turns XLA off silently in some states
    model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
    assert int(optimizer.iterations) == 12
    assert len(traced) == 1


# ---- 5. MirroredStrategy: identical replicas, variance independent of R -----------------


def _cpu_mirrored(num_replicas):
    # Collective all-reduce keys collide between strategies made in one process over
    # the same logical CPUs; reduction to one device has no such keys.
    return tf.distribute.MirroredStrategy(
        [f"/cpu:{i}" for i in range(num_replicas)],
        cross_device_ops=tf.distribute.ReductionToOneDevice(),
    )


def _replica_copies(variable):
    """The per-replica tf.Variables behind a Keras variable created in a strategy scope."""
    return list(variable.value.values)


def _mirrored_noise(num_replicas, seed, alpha, gamma, steps):
    strategy = _cpu_mirrored(num_replicas)
    with strategy.scope():
        variables = _zeros()
        optimizer = NoisyOptimizer(keras.optimizers.SGD(1.0), alpha, gamma, seed)
        optimizer.build(variables)

    @tf.function
    def step():
        def replica_fn():
            optimizer.apply([tf.zeros_like(v) for v in variables], variables)

        strategy.run(replica_fn)

    seen = []
    for _ in range(steps):
        for v in variables:
            v.assign(tf.zeros_like(v))
        step()
        for v in variables:  # every replica's copy is bit-identical
            copies = [c.numpy() for c in _replica_copies(v)]
            assert len(copies) == num_replicas
            for c in copies[1:]:
                np.testing.assert_array_equal(copies[0], c)
        seen.append([-_replica_copies(v)[-1].numpy() for v in variables])
    return seen, optimizer


def test_mirrored_noise_is_identical_on_replicas_and_does_not_scale_with_replicas():
    seed, alpha, gamma, steps = 4, 1e-2, 0.55, 5
    one, _ = _mirrored_noise(1, seed, alpha, gamma, steps)
    two, optimizer = _mirrored_noise(2, seed, alpha, gamma, steps)
    assert int(optimizer.iterations.numpy()) == steps
    for t in range(steps):
        for a, b, want in zip(one[t], two[t], _expected_noise(seed, t, alpha, gamma)):
            # noise/2 on each of 2 replicas sums exactly to the 1-replica noise.
            np.testing.assert_array_equal(a, b)
            np.testing.assert_allclose(b, want, rtol=2e-7, atol=0)


def test_mirrored_fit_matches_single_device_with_noise():
    def run(num_replicas):
        strategy = _cpu_mirrored(num_replicas)
        x, y = _tiny_regression_data()
        with strategy.scope():
            keras.utils.set_random_seed(1)
            model = keras.Sequential(
                [keras.Input((5,)), keras.layers.Dense(8, "tanh"), keras.layers.Dense(2)]
            )
            optimizer = NoisyOptimizer(keras.optimizers.SGD(0.1, momentum=0.9), 1e-3, 0.55, 3)
            model.compile(optimizer=optimizer, loss="mse")
        model.fit(x, y, batch_size=16, epochs=5, shuffle=False, verbose=0)
        return model.get_weights()

    for a, b in zip(run(1), run(2)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ---- 6. gradient accumulation: noise once per update ------------------------------------


def test_inner_gradient_accumulation_is_refused_and_points_to_the_engine():
    """Noise once per update under accumulation is the engine's job (tests/engine/test_training.py).

    The wrapper would otherwise add noise to every micro-batch, and Keras feeds its
    learning-rate schedule the micro-batch count.
    """
    with pytest.raises(ValueError, match=r"gradient_accumulation_steps=3.*accumulation_steps=3"):
        NoisyOptimizer(keras.optimizers.SGD(1.0, gradient_accumulation_steps=3), 1e-2, 0.55, 1)


# ---- 7. sparse gradients ------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, 1e-3])
def test_embedding_trains_and_noise_reaches_unused_rows(alpha):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 10, size=(64, 3))  # rows 10..19 are never looked up
    y = (x.sum(axis=1) % 2).astype(np.int32)
    keras.utils.set_random_seed(2)
    model = keras.Sequential(
        [
            keras.Input((3,), dtype="int32"),
            keras.layers.Embedding(20, 4),
            keras.layers.Flatten(),
            keras.layers.Dense(2),
        ]
    )
    optimizer = NoisyOptimizer(keras.optimizers.SGD(0.5), alpha=alpha, seed=1)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    table_before = model.layers[0].embeddings.numpy().copy()
    first = model.evaluate(x, y, verbose=0)
    model.fit(x, y, batch_size=16, epochs=30, shuffle=False, verbose=0)
    assert model.evaluate(x, y, verbose=0) < 0.8 * first
    unused_moved = not np.array_equal(model.layers[0].embeddings.numpy()[10:], table_before[10:])
    assert unused_moved == (alpha > 0)


# ---- 8. mixed precision ------------------------------------------------------------------------


def test_mixed_float16_noise_is_added_to_unscaled_float32_gradients():
    seed, alpha, gamma = 8, 1e-2, 0.55
    lso = keras.optimizers.LossScaleOptimizer(
        NoisyOptimizer(keras.optimizers.SGD(1.0), alpha, gamma, seed)
    )
    variables = _zeros()
    for t in range(3):
        for v in variables:
            v.assign(tf.zeros_like(v))
        lso.apply([tf.zeros_like(v) for v in variables], variables)
        for v, want in zip(variables, _expected_noise(seed, t, alpha, gamma)):
            # Had the noise met the scaled gradient it would be 2**15 times smaller.
            np.testing.assert_allclose(-v.numpy(), want, rtol=2e-7, atol=0)


def test_mixed_float16_compile_wraps_and_trains():
    keras.config.set_dtype_policy("mixed_float16")
    x, y = _tiny_regression_data()
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(8, "tanh"), keras.layers.Dense(2)]
    )
    noisy = NoisyOptimizer(keras.optimizers.SGD(0.05), alpha=1e-5, seed=1)
    model.compile(optimizer=noisy, loss="mse")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert model.optimizer.inner_optimizer is noisy
    first = model.evaluate(x, y, verbose=0)
    model.fit(x, y, batch_size=16, epochs=10, shuffle=False, verbose=0)
    assert model.evaluate(x, y, verbose=0) < 0.5 * first
    assert int(noisy.iterations) == 40
    assert all(w.dtype == "float32" for w in model.trainable_weights)


# ---- Keras conventions ---------------------------------------------------------------------


def test_learning_rate_iterations_and_variables_delegate():
    inner = keras.optimizers.SGD(0.1, momentum=0.9)
    optimizer = NoisyOptimizer(inner, seed=0)
    assert float(optimizer.learning_rate) == pytest.approx(0.1)
    optimizer.learning_rate = 0.3
    assert float(inner.learning_rate) == pytest.approx(0.3)
    variables = _zeros()
    optimizer.apply([tf.zeros_like(v) for v in variables], variables)
    assert int(optimizer.iterations) == int(inner.iterations) == 1
    inner_ids = {id(v) for v in inner.variables}
    assert inner_ids <= {id(v) for v in optimizer.variables}
    assert len(inner.variables) == 2 + len(SHAPES)  # iterations, lr, one momentum each


def test_apply_gradients_and_apply_without_variables():
    optimizer = NoisyOptimizer(keras.optimizers.SGD(1.0), alpha=1e-2, seed=2)
    variables = _zeros()
    result = optimizer.apply_gradients([(tf.zeros_like(v), v) for v in variables])
    assert int(result) == 1
    optimizer.apply([tf.zeros_like(v) for v in variables])
    assert int(optimizer.iterations) == 2
    with pytest.raises(ValueError, match="one to one"):
        optimizer.apply([tf.zeros((3, 4))], variables)


def test_config_round_trip():
    inner = keras.optimizers.AdamW(3e-3, weight_decay=0.02, clipnorm=1.0)
    optimizer = NoisyOptimizer(inner, alpha=2e-5, gamma=0.6, seed=123, name="noisy")
    # The wrapper owns the clipping: it took it over from the inner optimizer.
    assert optimizer.clipping == {"clipnorm": 1.0} and inner.clipnorm is None
    clone = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert isinstance(clone, NoisyOptimizer)
    assert (clone.alpha, clone.gamma, clone.seed, clone.name) == (2e-5, 0.6, 123, "noisy")
    assert clone.clipping == {"clipnorm": 1.0}
    assert isinstance(clone.inner_optimizer, keras.optimizers.AdamW)
    assert clone.inner_optimizer.get_config() == inner.get_config()
    assert clone.get_config() == optimizer.get_config()


def test_clipping_with_a_loss_scale_factor_is_refused():
    inner = keras.optimizers.SGD(0.1, clipnorm=1.0, loss_scale_factor=128.0)
    with pytest.raises(
        ValueError, match=r"has clipnorm=1.0 and loss_scale_factor=128.0; .*would clip scaled"
    ):
        NoisyOptimizer(inner)


# ---- Bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"alpha": -1.0}, r"`alpha` must be a finite float >= 0; received -1.0"),
        ({"alpha": float("nan")}, r"`alpha`.*nan"),
        ({"alpha": float("inf")}, r"`alpha`.*inf"),
        ({"gamma": -0.5}, r"`gamma` must be a finite float >= 0; received -0.5"),
        ({"seed": -3}, r"`seed`.*-3"),
        ({"clipnorm": 1.0}, r"does not take `clipnorm`.*set `clipnorm` on the wrapped"),
        ({"weight_decay": 0.1}, r"`weight_decay`.*wrapped optimizer"),
        ({"gradient_accumulation_steps": 4}, r"`gradient_accumulation_steps`.*wrapped"),
        ({"learning_rate": 0.1}, r"`learning_rate`.*wrapped"),
        ({"momentum": 0.9}, r"unexpected argument\(s\) \['momentum'\]"),
    ],
)
def test_bad_arguments_are_named(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        NoisyOptimizer(keras.optimizers.SGD(0.1), **kwargs)


@pytest.mark.parametrize(
    "inner, pattern",
    [
        ("sgd", r"Keras 3 optimizer instance.*'sgd'.*keras.optimizers.get\('sgd'\)"),
        (None, r"Keras 3 optimizer instance.*None"),
        (tf.compat.v1.train.GradientDescentOptimizer(0.1), r"GradientDescentOptimizer"),
        (NoisyOptimizer(keras.optimizers.SGD(0.1), seed=0), r"already a NoisyOptimizer"),
        (
            keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1)),
            r"LossScaleOptimizer\(NoisyOptimizer",
        ),
    ],
    ids=["string", "none", "tf_compat_v1", "noisy", "loss_scale"],
)
def test_bad_inner_optimizer_is_named(inner, pattern):
    with pytest.raises(ValueError, match=pattern):
        NoisyOptimizer(inner)


def test_noise_kinds_keep_the_clipping_through_their_config():
    from noisy_keras.noise.matched import MatchedNoiseOptimizer

    optimizer = MatchedNoiseOptimizer(
        keras.optimizers.SGD(0.01, clipvalue=0.5), batch_size=512, small_batch_size=32, seed=1
    )
    clone = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert isinstance(clone, MatchedNoiseOptimizer)
    assert clone.clipping == optimizer.clipping == {"clipvalue": 0.5}
