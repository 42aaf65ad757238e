"""GhostBatchNormalization against BatchNormalization and NumPy."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from noisy_keras.models.layers import GhostBatchNormalization

MOMENTUM = 0.9
EPSILON = 1e-3


def _inputs(shape, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=shape) * 3.0 + 1.5).astype("float32")


def _set_affine(layer, channels, seed=1):
    rng = np.random.default_rng(seed)
    gamma = rng.uniform(0.5, 2.0, size=channels).astype("float32")
    beta = rng.normal(size=channels).astype("float32")
    layer.gamma.assign(gamma)
    layer.beta.assign(beta)
    return gamma, beta


def _numpy_ghost_norm(x, ghost, gamma, beta, axis=-1, epsilon=EPSILON):
    """Normalizes each ghost batch of `ghost` consecutive examples on its own."""
    axis = axis % x.ndim
    ghosts = x.astype("float64").reshape((x.shape[0] // ghost, ghost) + x.shape[1:])
    axes = tuple(a for a in range(1, ghosts.ndim) if a != axis + 1)
    mean = ghosts.mean(axis=axes, keepdims=True)
    variance = ghosts.var(axis=axes, keepdims=True)
    shape = [1] * ghosts.ndim
    shape[axis + 1] = -1
    out = (ghosts - mean) / np.sqrt(variance + epsilon) * gamma.reshape(shape) + beta.reshape(shape)
    return out.reshape(x.shape), mean.squeeze(), variance.squeeze()


@pytest.mark.parametrize(("shape", "axis"), [((8, 4, 4, 3), -1), ((6, 3, 5), 1)])
def test_ghost_size_equal_to_batch_matches_batch_normalization(shape, axis):
    x = _inputs(shape)
    ghost = GhostBatchNormalization(shape[0], axis=axis, momentum=MOMENTUM, epsilon=EPSILON)
    batch_norm = keras.layers.BatchNormalization(axis=axis, momentum=MOMENTUM, epsilon=EPSILON)
    ghost.build(shape)
    batch_norm.build(shape)
    channels = shape[axis]
    gamma, beta = _set_affine(ghost, channels)
    batch_norm.gamma.assign(gamma)
    batch_norm.beta.assign(beta)
    for step in range(3):
        x_step = x + step
        np.testing.assert_allclose(
            ghost(x_step, training=True), batch_norm(x_step, training=True), rtol=1e-5, atol=1e-5
        )
    np.testing.assert_allclose(ghost.moving_mean, batch_norm.moving_mean, rtol=1e-6)
    np.testing.assert_allclose(ghost.moving_variance, batch_norm.moving_variance, rtol=1e-6)
    np.testing.assert_allclose(ghost(x, training=False), batch_norm(x, training=False), rtol=1e-5)
    assert [w.name for w in ghost.weights] == [w.name for w in batch_norm.weights]


def test_smaller_ghost_batches_are_normalized_separately():
    x = _inputs((8, 5, 3))
    layer = GhostBatchNormalization(2, momentum=MOMENTUM, epsilon=EPSILON)
    layer.build(x.shape)
    gamma, beta = _set_affine(layer, 3)
    outputs = layer(x, training=True)
    expected, ghost_means, ghost_variances = _numpy_ghost_norm(x, 2, gamma, beta)
    np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-5)
    # Each ghost batch of the output has mean beta and variance ~gamma^2 on its own.
    per_ghost = np.asarray(outputs).reshape(4, 2, 5, 3)
    np.testing.assert_allclose(per_ghost.mean(axis=(1, 2)), np.tile(beta, (4, 1)), atol=1e-5)
    # Moving statistics: once per call, from the mean over ghosts of their means/variances.
    np.testing.assert_allclose(
        layer.moving_mean, (1 - MOMENTUM) * ghost_means.mean(axis=0), rtol=1e-5, atol=1e-7
    )
    np.testing.assert_allclose(
        layer.moving_variance,
        MOMENTUM * 1.0 + (1 - MOMENTUM) * ghost_variances.mean(axis=0),
        rtol=1e-5,
    )
    # ... which differs from full-batch BatchNormalization (ghosts have different means).
    full, _, _ = _numpy_ghost_norm(x, 8, gamma, beta)
    assert np.abs(np.asarray(outputs) - full).max() > 0.1


def test_ghost_batches_channels_first():
    x = _inputs((6, 3, 4, 4))
    layer = GhostBatchNormalization(3, axis=1, epsilon=EPSILON)
    layer.build(x.shape)
    gamma, beta = _set_affine(layer, 3)
    expected, _, _ = _numpy_ghost_norm(x, 3, gamma, beta, axis=1)
    np.testing.assert_allclose(layer(x, training=True), expected, rtol=1e-5, atol=1e-5)


def test_inference_uses_moving_statistics_and_leaves_them_alone():
    x = _inputs((4, 3))
    layer = GhostBatchNormalization(2, epsilon=EPSILON)
    layer.build(x.shape)
    gamma, beta = _set_affine(layer, 3)
    moving_mean = np.array([0.5, -1.0, 2.0], "float32")
    moving_variance = np.array([4.0, 0.25, 1.0], "float32")
    layer.moving_mean.assign(moving_mean)
    layer.moving_variance.assign(moving_variance)
    expected = (x - moving_mean) / np.sqrt(moving_variance + EPSILON) * gamma + beta
    np.testing.assert_allclose(layer(x, training=False), expected, rtol=1e-5)
    np.testing.assert_allclose(layer(x), expected, rtol=1e-5)
    layer.trainable = False  # a frozen layer normalizes with moving statistics, as BN does
    np.testing.assert_allclose(layer(x, training=True), expected, rtol=1e-5)
    np.testing.assert_array_equal(layer.moving_mean, moving_mean)
    np.testing.assert_array_equal(layer.moving_variance, moving_variance)


def test_stateless_call_under_xla_matches_numpy():
    x = _inputs((6, 4, 2))
    model = keras.Sequential(
        [keras.Input((4, 2)), GhostBatchNormalization(3, momentum=MOMENTUM, epsilon=EPSILON)]
    )
    layer = model.layers[0]
    gamma, beta = _set_affine(layer, 2)

    @tf.function(jit_compile=True)
    def forward(trainable, non_trainable, inputs):
        return model.stateless_call(trainable, non_trainable, inputs, training=True)

    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    outputs, new_non_trainable = forward(trainable, non_trainable, tf.constant(x))
    expected, means, variances = _numpy_ghost_norm(x, 3, gamma, beta)
    np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-5)
    new_mean, new_variance = (np.asarray(v) for v in new_non_trainable)
    np.testing.assert_allclose(new_mean, (1 - MOMENTUM) * means.mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(
        new_variance, MOMENTUM + (1 - MOMENTUM) * variances.mean(0), rtol=1e-5
    )
    # stateless: the layer's own variables are untouched.
    np.testing.assert_array_equal(layer.moving_mean, np.zeros(2))


def test_trains_in_a_compiled_model_under_xla():
    x = _inputs((8, 4))
    y = np.arange(8) % 2
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(6),
            GhostBatchNormalization(4),
            keras.layers.Dense(2),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=True,
    )
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert np.abs(np.asarray(model.layers[1].moving_mean)).max() > 0


def test_config_round_trip_and_saved_model(tmp_path):
    layer = GhostBatchNormalization(
        4, axis=1, momentum=0.8, epsilon=1e-5, center=False, gamma_initializer="he_normal"
    )
    restored = keras.layers.deserialize(keras.layers.serialize(layer))
    assert isinstance(restored, GhostBatchNormalization)
    assert restored.get_config() == layer.get_config()
    assert restored.get_config()["virtual_batch_size"] == 4

    model = keras.Sequential([keras.Input((3, 2)), GhostBatchNormalization(2, axis=1)])
    model.layers[0].moving_mean.assign([1.0, 2.0, 3.0])
    path = tmp_path / "ghost.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    x = _inputs((4, 3, 2))
    np.testing.assert_array_equal(loaded(x, training=False), model(x, training=False))


def test_from_batch_normalization_copies_the_configuration():
    batch_norm = keras.layers.BatchNormalization(
        axis=1, momentum=0.7, epsilon=2e-5, scale=False, name="bn_conv1"
    )
    ghost = GhostBatchNormalization.from_batch_normalization(batch_norm, 16)
    config = ghost.get_config()
    assert (config["name"], config["axis"], config["momentum"], config["epsilon"]) == (
        "bn_conv1",
        1,
        0.7,
        2e-5,
    )
    assert (config["scale"], config["center"], config["virtual_batch_size"]) == (False, True, 16)
    if "renorm" in keras.layers.BatchNormalization().get_config():  # in Keras 3.15, not 3.13
        with pytest.raises(ValueError, match=r"renorm=True is not supported"):
            GhostBatchNormalization.from_batch_normalization(
                keras.layers.BatchNormalization(renorm=True), 16
            )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"virtual_batch_size": 0}, r"virtual_batch_size must be an integer >= 1; received "),
        ({"virtual_batch_size": 2.0}, r"virtual_batch_size=2.0"),
        ({"virtual_batch_size": 2, "axis": 0}, r"not the batch axis 0; received axis=0"),
        ({"virtual_batch_size": 2, "momentum": 1.5}, r"momentum=1.5"),
        ({"virtual_batch_size": 2, "epsilon": 0}, r"epsilon must be a number > 0"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GhostBatchNormalization(**kwargs)


def test_batch_not_divisible_by_ghost_size_raises():
    layer = GhostBatchNormalization(4)
    with pytest.raises(ValueError, match=r"batch size 6 .* not a multiple of virtual_batch_size=4"):
        layer(_inputs((6, 3)), training=True)
    # A traced, unknown batch size works when the batch is a multiple of the ghost size.
    dynamic = tf.function(
        lambda x: layer(x, training=True), input_signature=[tf.TensorSpec((None, 3))]
    )
    x = _inputs((8, 3))
    expected, _, _ = _numpy_ghost_norm(x, 4, np.ones(3), np.zeros(3))
    np.testing.assert_allclose(dynamic(x), expected, rtol=1e-5, atol=1e-5)
    # Inference has no ghost batches: any batch size works.
    assert layer(_inputs((6, 3)), training=False).shape == (6, 3)


def _replica_outputs(strategy, model, x):
    @tf.function(jit_compile=True)
    def compiled_forward(trainable, non_trainable, inputs):
        outputs, _ = model.stateless_call(trainable, non_trainable, inputs, training=True)
        return outputs

    def forward(inputs):
        # Each replica reads its own copy of the variables and passes values to XLA.
        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]
        return compiled_forward(trainable, non_trainable, inputs)

    dataset = tf.data.Dataset.from_tensor_slices(x).batch(len(x))
    batch = next(iter(strategy.experimental_distribute_dataset(dataset)))
    return strategy.experimental_local_results(strategy.run(forward, args=(batch,)))


def test_ghost_batches_are_per_replica_under_mirrored_strategy():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    x = _inputs((8, 3))
    with strategy.scope():
        model = keras.Sequential([keras.Input((3,)), GhostBatchNormalization(2, epsilon=EPSILON)])
        too_large = keras.Sequential([keras.Input((3,)), GhostBatchNormalization(8)])
    per_replica = _replica_outputs(strategy, model, x)
    assert [r.shape[0] for r in per_replica] == [4, 4]
    expected, _, _ = _numpy_ghost_norm(x, 2, np.ones(3), np.zeros(3))
    np.testing.assert_allclose(np.concatenate(per_replica), expected, rtol=1e-5, atol=1e-5)
    # A ghost size that divides the global batch of 8 but not the 4 per replica fails.
    with pytest.raises(ValueError, match=r"batch size 4 .* not a multiple of virtual_batch_size=8"):
        _replica_outputs(strategy, too_large, x)
