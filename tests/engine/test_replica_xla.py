"""The engine against independent references: plain Keras `fit`, NumPy, and one device.

Two logical CPU devices (tests/conftest.py) stand in for two GPUs. Each test
compares the per-replica steps of `enable_replica_xla` with something computed
another way: Keras' own `fit` on the same model, data and optimizer; moving
statistics and clipped gradients in NumPy; one device against two replicas.
"""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from noisy_keras.engine import fit as training
from noisy_keras.engine import steps as replica_xla
from noisy_keras.engine.distribute import make_strategy
from noisy_keras.noise.optimizer import NoisyOptimizer

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _copies(variable):
    """Every replica's copy of a variable (one for a variable that is not mirrored)."""
    value = variable.value
    if hasattr(value, "values"):
        return [np.asarray(c) for c in value.values]
    return [np.asarray(value)]


def _assert_replicas_identical(model, skip=()):
    for variable in model.variables + model.optimizer.variables:
        if any(variable is v for v in skip):
            continue
        copies = _copies(variable)
        for copy in copies[1:]:
            np.testing.assert_array_equal(copy, copies[0], err_msg=variable.path)


def _classification_data(n=48, features=6, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype("float32")
    y = (x[:, 0] + x[:, 1] > 0).astype("int64") + (x[:, 2] > 1).astype("int64")
    return x, y


# ---- Engine step = Keras fit step (dropout and BatchNormalization in the model) ----------


def _dropout_bn_model(alpha, jit_compile):
    keras.utils.set_random_seed(3)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(12, activation="tanh"),
            keras.layers.BatchNormalization(momentum=0.8),
            keras.layers.Dropout(0.3, seed=1),
            keras.layers.Dense(3),
        ]
    )
    optimizer = NoisyOptimizer(keras.optimizers.SGD(0.1, momentum=0.9), alpha=alpha, seed=4)
    model.compile(optimizer=optimizer, loss=LOSS, jit_compile=jit_compile)
    return model


@pytest.mark.parametrize("alpha", [0.0, 1e-2])
@pytest.mark.parametrize("xla", [False, True])
def test_engine_steps_equal_keras_fit_with_dropout_and_batch_norm(alpha, xla):
    """One step, then three more: weights, BN statistics, RNG state and losses as Keras' fit.

    Without XLA both run the same TensorFlow kernels: bit-identical. With XLA
    the engine compiles forward and backward, Keras the whole step: rtol 1e-5.
    A train step run in inference mode (dropout off, BN statistics frozen)
    differs by far more than that.
    """
    x, y = _classification_data()
    keras_model = _dropout_bn_model(alpha, jit_compile=xla)
    engine_model = _dropout_bn_model(alpha, jit_compile=False)
    replica_xla.enable_replica_xla(engine_model, jit_compile=xla)
    for model in (keras_model, engine_model):
        np.testing.assert_array_equal(model.get_weights()[0], keras_model.get_weights()[0])

    def compare(histories):
        for a, b in zip(engine_model.variables, keras_model.variables, strict=True):
            if xla:
                np.testing.assert_allclose(
                    np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6, err_msg=a.path
                )
            else:
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=a.path)
        np.testing.assert_allclose(histories[0], histories[1], rtol=1e-5)

    histories = [
        m.fit(x[:16], y[:16], batch_size=16, shuffle=False, verbose=0).history["loss"]
        for m in (engine_model, keras_model)
    ]
    compare(histories)
    histories = [
        m.fit(x, y, batch_size=16, shuffle=False, verbose=0).history["loss"]
        for m in (engine_model, keras_model)
    ]
    compare(histories)
    assert int(np.asarray(engine_model.optimizer.iterations)) == 4
    # Every variable moved: weights, BN moving statistics, the dropout seed state.
    fresh = _dropout_bn_model(alpha, jit_compile=False)
    for moved, start in zip(engine_model.variables, fresh.variables, strict=True):
        assert not np.array_equal(np.asarray(moved), np.asarray(start)), moved.path


@pytest.mark.parametrize("replicas", [1, 2])
def test_batch_norm_moving_statistics_equal_numpy(replicas):
    """moving <- m * moving + (1 - m) * batch statistic, per step; 2 replicas average theirs.

    The batch variance is the biased one. Each replica normalizes its own half;
    the engine averages the replicas' new moving statistics, so the moving
    mean follows the global batch mean and the moving variance the mean of the
    two halves' variances.
    """
    strategy = make_strategy("mirrored", 2) if replicas == 2 else make_strategy("default")
    rng = np.random.default_rng(5)
    x = (rng.normal(size=(16, 4)) * [1.0, 2.0, 0.5, 3.0] + [0.0, 1.0, -2.0, 4.0]).astype("float32")
    y = rng.integers(0, 2, size=16)
    momentum, steps = 0.9, 3
    with strategy.scope():
        model = keras.Sequential(
            [
                keras.Input((4,)),
                keras.layers.BatchNormalization(momentum=momentum),
                keras.layers.Dense(2),
            ]
        )
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS)
    replica_xla.enable_replica_xla(model)
    model.fit(x, y, batch_size=16, epochs=steps, shuffle=False, verbose=0)

    halves = np.split(x.astype(np.float64), replicas)
    batch_mean = np.mean([h.mean(axis=0) for h in halves], axis=0)
    batch_variance = np.mean([h.var(axis=0) for h in halves], axis=0)
    mean, variance = np.zeros(4), np.ones(4)
    for _ in range(steps):
        mean = momentum * mean + (1 - momentum) * batch_mean
        variance = momentum * variance + (1 - momentum) * batch_variance
    norm = model.layers[0]
    for copy in _copies(norm.moving_mean):
        np.testing.assert_allclose(copy, mean, rtol=1e-5, atol=1e-6)
    for copy in _copies(norm.moving_variance):
        np.testing.assert_allclose(copy, variance, rtol=1e-5, atol=1e-6)
    _assert_replicas_identical(model)


# ---- Dropout differs across replicas ------------------------------------------------------


class MaskRecorder(keras.layers.Layer):
    """Stores which entries of its input are nonzero (a dropout keep-mask), when training."""

    def __init__(self, rows, **kwargs):
        super().__init__(**kwargs)
        self.rows = rows

    def build(self, input_shape):
        self.mask = self.add_weight(
            shape=(self.rows, input_shape[-1]),
            dtype="int32",
            initializer="zeros",
            trainable=False,
            name="mask",
        )

    def call(self, x, training=False):
        if training:
            self.mask.assign(tf.cast(tf.not_equal(x, 0), "int32"))
        return x


def _dropout_recorder_model(rows, jit_compile=False):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16,))
    h = keras.layers.Dropout(0.5, seed=7)(inputs)
    h = MaskRecorder(rows)(h)
    model = keras.Model(inputs, keras.layers.Dense(1)(h))
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse", jit_compile=jit_compile)
    return model


@pytest.mark.parametrize("xla", [False, True])
def test_dropout_masks_differ_across_replicas_and_weights_stay_identical(xla):
    x, y = np.ones((8, 16), "float32"), np.zeros((8, 1), "float32")
    strategy = make_strategy("mirrored", 2)
    with strategy.scope():
        model = _dropout_recorder_model(rows=4)
    replica_xla.enable_replica_xla(model, jit_compile=xla)
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    masks = _copies(model.layers[2].mask)
    assert len(masks) == 2
    assert not np.array_equal(masks[0], masks[1])
    for mask in masks:  # rate 0.5 on 64 entries: 0 < kept < 64 with probability 1 - 2**-63
        assert 0 < mask.sum() < mask.size
    _assert_replicas_identical(model, skip=[model.layers[2].mask])  # the masks differ by design
    seed_states = _copies(model.layers[1].seed_generator.state)
    np.testing.assert_array_equal(seed_states, [[7, 1], [7, 1]])

    # Replica 0 draws what Keras' own fit draws on one device from the same share.
    single = _dropout_recorder_model(rows=4, jit_compile=xla)
    single.fit(x[:4], y[:4], batch_size=4, epochs=1, shuffle=False, verbose=0)
    np.testing.assert_array_equal(masks[0], np.asarray(single.layers[2].mask))
    np.testing.assert_array_equal(np.asarray(single.layers[1].seed_generator.state), [7, 1])


# ---- Mixed precision: an overflow on one replica is skipped on all ---------------------------


@pytest.mark.parametrize("xla", [False, True])
@pytest.mark.parametrize("overflow_replica", [None, 0, 1])
def test_mixed_float16_overflow_on_one_replica_skips_the_update_everywhere(overflow_replica, xla):
    keras.config.set_dtype_policy("mixed_float16")
    strategy = make_strategy("mirrored", 2)
    with strategy.scope():
        inputs = keras.Input((4,))
        h = keras.layers.Dense(1, use_bias=False, kernel_initializer="ones")(inputs)
        model = keras.Model(inputs, keras.layers.Activation("linear", dtype="float32")(h))
        optimizer = NoisyOptimizer(keras.optimizers.SGD(0.01), alpha=1e-4, seed=0)
        model.compile(optimizer=optimizer, loss="mse")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    replica_xla.enable_replica_xla(model, jit_compile=xla)
    x = np.full((4, 4), 0.01, "float32")
    if overflow_replica is not None:
        # y_pred = 4e4 is finite in float16; its gradient times the loss scale is not.
        x[2 * overflow_replica : 2 * overflow_replica + 2] = 1e4
    model.fit(x, np.zeros((4, 1), "float32"), batch_size=4, epochs=1, shuffle=False, verbose=0)

    kernels = _copies(model.layers[1].kernel)
    scales = _copies(model.optimizer.dynamic_scale)
    initial_scale = model.optimizer.initial_scale
    if overflow_replica is None:
        assert not np.array_equal(kernels[0], np.ones((4, 1)))
        assert int(np.asarray(model.optimizer.iterations)) == 1
        np.testing.assert_array_equal(scales, [initial_scale, initial_scale])
    else:
        for kernel in kernels:
            np.testing.assert_array_equal(kernel, np.ones((4, 1), "float32"))
        assert int(np.asarray(model.optimizer.iterations)) == 0  # the noise step did not advance
        np.testing.assert_array_equal(scales, [initial_scale / 2, initial_scale / 2])
    _assert_replicas_identical(model)


# ---- Clipping bounds the global batch's data gradient; the noise is never clipped ------------


class ZeroGradient(keras.layers.Layer):
    """Passes its input through; its weight enters the output times 0 (gradient exactly 0)."""

    def build(self, input_shape):
        self.unused = self.add_weight(shape=(5,), initializer="zeros", name="unused")

    def call(self, x):
        return x + 0.0 * keras.ops.sum(self.unused)


def _clip_step(strategy, clipping, alpha, mode="engine", scale=10.0):
    """One SGD(lr=1) step on 8 examples from zero weights; returns (kernel, unused) after it."""
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(8, 3)) * scale).astype("float32")
    y = (rng.normal(size=(8, 1)) * scale).astype("float32")
    with strategy.scope():
        inputs = keras.Input((3,))
        h = keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")(inputs)
        model = keras.Model(inputs, ZeroGradient()(h))
        inner = keras.optimizers.SGD(1.0, **clipping)
        model.compile(optimizer=NoisyOptimizer(inner, alpha=alpha, seed=3), loss="mse")
    if mode == "engine":
        replica_xla.enable_replica_xla(model, jit_compile=False)
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    _assert_replicas_identical(model)
    if keras.config.dtype_policy().name == "mixed_float16":
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    kernel, unused = model.layers[1].kernel, model.layers[2].unused
    return _copies(kernel)[0][:, 0], _copies(unused)[0], (x, y)


def _numpy_clip(g, clipping):
    ((name, c),) = clipping.items()
    if name in ("clipnorm", "global_clipnorm"):  # one tensor with a gradient: the same rule
        return g * c / max(np.linalg.norm(g), c)
    return np.clip(g, -c, c)


@pytest.mark.parametrize(
    "clipping", [{"clipnorm": 1.0}, {"global_clipnorm": 1.0}, {"clipvalue": 0.5}]
)
def test_clipping_with_noise_one_device_and_two_replicas_give_the_same_update(clipping):
    """w1 = -(clip(g) + n): g the global batch's gradient (NumPy), n the noise of step 0.

    n is read off the unclipped run, w1' = -(g + n); the variable with a zero data
    gradient moves by exactly -n with or without clipping.
    """
    single, mirrored = make_strategy("default"), make_strategy("mirrored", 2)
    alpha = 1e-2
    unclipped, unused_unclipped, (x, y) = _clip_step(single, {}, alpha)
    one, unused_one, _ = _clip_step(single, clipping, alpha)
    two, unused_two, _ = _clip_step(mirrored, clipping, alpha)

    g = (2.0 / len(x) * x.astype(np.float64).T @ (-y.astype(np.float64)))[:, 0]  # w = 0, MSE
    noise = -unclipped - g
    expected = -(_numpy_clip(g, clipping) + noise)
    assert np.linalg.norm(g) > 5 * list(clipping.values())[0]  # clipping is active
    np.testing.assert_allclose(one, expected, rtol=1e-5)
    np.testing.assert_allclose(two, one, rtol=1e-5)
    np.testing.assert_array_equal(unused_one, unused_unclipped)
    np.testing.assert_array_equal(unused_two, unused_unclipped)
    assert np.all(unused_one != 0)  # the noise is on


def test_clipping_under_keras_own_mirrored_fit_is_global_too():
    """The rule lives in NoisyOptimizer, so Keras' own fit under MirroredStrategy obeys it."""
    clipping = {"global_clipnorm": 1.0}
    one, _, _ = _clip_step(make_strategy("default"), clipping, 0.0, mode="keras")
    two, _, _ = _clip_step(make_strategy("mirrored", 2), clipping, 0.0, mode="keras")
    np.testing.assert_allclose(np.linalg.norm(one), 1.0, rtol=1e-6)
    np.testing.assert_allclose(two, one, rtol=1e-6)


def test_clipping_with_mixed_float16_on_two_replicas_bounds_the_global_gradient():
    """The LossScaleOptimizer unscales, then NoisyOptimizer clips: |update| = lr * clipnorm.

    Small data (|g| ~ 0.02), so that the scaled float16 gradients do not overflow.
    """
    clipping = {"clipnorm": 1e-3}
    keras.config.set_dtype_policy("mixed_float16")
    one, _, _ = _clip_step(make_strategy("default"), clipping, 0.0, scale=0.1)
    two, _, _ = _clip_step(make_strategy("mirrored", 2), clipping, 0.0, scale=0.1)
    # The clipped norm is exact (float32); Keras' own per-replica clipping gave 2e-3 here.
    np.testing.assert_allclose(np.linalg.norm(one), 1e-3, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(two), 1e-3, rtol=1e-5)
    # Directions: float16 gradients round at 2**-11 relative, differently per batch split.
    np.testing.assert_allclose(two, one, rtol=5e-3)


# ---- What plain Keras fit/evaluate/predict do, the engine does -----------------------------


def _multi_output_model(jit_compile):
    keras.utils.set_random_seed(2)
    inputs = keras.Input((3,))
    outputs = {name: keras.layers.Dense(2, name=name)(inputs) for name in "abc"}
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss={"a": "mse", "b": "mse"},
        jit_compile=jit_compile,
    )
    return model


@pytest.mark.parametrize("xla", [False, True])
def test_multi_output_model_with_losses_on_some_outputs_trains_as_keras(xla):
    """Built outside any strategy scope, two of three outputs with a loss (used to fail)."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 3)).astype("float32")
    targets = {"a": rng.normal(size=(8, 2)).astype("float32"), "b": np.zeros((8, 2), "float32")}
    keras_model = _multi_output_model(jit_compile=xla)
    engine_model = _multi_output_model(jit_compile=False)
    replica_xla.enable_replica_xla(engine_model, jit_compile=xla)
    results = []
    for model in (keras_model, engine_model):
        history = model.fit(x, targets, batch_size=4, epochs=2, shuffle=False, verbose=0).history
        results.append((history, model.evaluate(x, targets, verbose=0, return_dict=True)))
    (keras_history, keras_eval), (engine_history, engine_eval) = results
    assert set(engine_history) == set(keras_history)
    assert set(engine_eval) == set(keras_eval)
    for key in keras_history:
        np.testing.assert_allclose(engine_history[key], keras_history[key], rtol=1e-5)
    for key in keras_eval:
        np.testing.assert_allclose(engine_eval[key], keras_eval[key], rtol=1e-5)
    for a, b in zip(engine_model.get_weights(), keras_model.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def _frozen_model(jit_compile):
    keras.utils.set_random_seed(4)
    inputs = keras.Input((3,))
    h = keras.layers.Dropout(0.5, seed=1)(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2, trainable=False)(h))
    model.compile(
        optimizer=NoisyOptimizer(keras.optimizers.SGD(0.1), seed=0),
        loss="mse",
        jit_compile=jit_compile,
    )
    return model


@pytest.mark.parametrize("xla", [False, True])
def test_model_without_trainable_variables_warns_and_trains_nothing_as_keras(xla):
    x = np.arange(12, dtype="float32").reshape(4, 3)
    y = np.zeros((4, 2), "float32")
    outcomes = []
    for engine in (False, True):
        model = _frozen_model(jit_compile=xla and not engine)
        if engine:
            replica_xla.enable_replica_xla(model, jit_compile=xla)
        weights = model.get_weights()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            history = model.fit(x, y, batch_size=2, epochs=2, shuffle=False, verbose=0).history
        messages = {str(w.message) for w in caught}
        assert "The model does not have any trainable weights." in messages
        for a, b in zip(model.get_weights(), weights, strict=True):
            np.testing.assert_array_equal(a, b)
        assert int(np.asarray(model.optimizer.iterations)) == 0
        seed_state = np.asarray(model.layers[1].seed_generator.state)
        outcomes.append((history["loss"], seed_state))
    (keras_loss, keras_seed), (engine_loss, engine_seed) = outcomes
    np.testing.assert_array_equal(engine_seed, keras_seed)
    np.testing.assert_array_equal(keras_seed, [1, 4])  # one draw per step, 4 steps
    np.testing.assert_allclose(engine_loss, keras_loss, rtol=1e-6)


class AlwaysNoisy(keras.layers.Layer):
    """Adds seeded normal noise to its input, in training and in inference alike."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seed_generator = keras.random.SeedGenerator(5)

    def call(self, x, training=None):
        return x + keras.random.normal(keras.ops.shape(x), seed=self.seed_generator)


def _noisy_predictor(jit_compile):
    model = keras.Sequential([keras.Input((2,)), AlwaysNoisy()])
    model.compile(loss="mse", optimizer="sgd", jit_compile=jit_compile)
    return model


@pytest.mark.parametrize("xla", [False, True])
def test_predict_advances_seeded_randomness_as_keras(xla):
    x = np.zeros((4, 2), "float32")
    keras_model = _noisy_predictor(jit_compile=xla)
    engine_model = _noisy_predictor(jit_compile=False)
    replica_xla.enable_replica_xla(engine_model, jit_compile=xla)
    predictions = {}
    for name, model in (("keras", keras_model), ("engine", engine_model)):
        first = model.predict(x, batch_size=4, verbose=0)
        second = model.predict(x, batch_size=4, verbose=0)
        assert not np.array_equal(first, second), name
        predictions[name] = (first, second)
        np.testing.assert_array_equal(np.asarray(model.layers[0].seed_generator.state), [5, 2])
    for engine, keras_prediction in zip(predictions["engine"], predictions["keras"], strict=True):
        np.testing.assert_allclose(engine, keras_prediction, rtol=1e-6)


def test_predict_draws_differ_across_replicas_and_state_stays_identical():
    strategy = make_strategy("mirrored", 2)
    with strategy.scope():
        model = _noisy_predictor(jit_compile=False)
    replica_xla.enable_replica_xla(model)
    prediction = model.predict(np.zeros((4, 2), "float32"), batch_size=4, verbose=0)
    assert not np.array_equal(prediction[:2], prediction[2:])
    np.testing.assert_array_equal(_copies(model.layers[0].seed_generator.state), [[5, 1], [5, 1]])


# ---- What the engine refuses, it says what to do instead -------------------------------------


def test_a_custom_train_step_is_refused_with_what_to_do_instead():
    class CustomStep(keras.Sequential):
        def train_step(self, data):
            return super().train_step(data)

    model = CustomStep([keras.Input((6,)), keras.layers.Dense(3)])
    model.compile(optimizer="sgd", loss=LOSS)
    with pytest.raises(ValueError, match=r"overrides `train_step`.*move what it does into `call`"):
        replica_xla.enable_replica_xla(model)


def test_xla_with_op_determinism_and_max_pooling_is_refused_before_training():
    tf.config.experimental.enable_op_determinism()
    model = keras.Sequential(
        [
            keras.Input((4, 4, 1)),
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(2),
        ]
    )
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS)
    x, y = np.zeros((8, 4, 4, 1), "float32"), np.zeros(8, "int64")
    with pytest.raises(ValueError, match=r"xla=True with TensorFlow's op determinism.*max pool"):
        training.fit(
            model,
            tf.data.Dataset.from_tensor_slices((x, y)).batch(4),
            epochs=1,
            steps_per_epoch=2,
            xla=True,
            verbose=0,
        )
    assert int(np.asarray(model.optimizer.iterations)) == 0
