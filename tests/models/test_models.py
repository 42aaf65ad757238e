"""Model registry: shapes, parameter counts, seeding, one training step, ghost BN swap."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from noisy_keras.models.layers import GhostBatchNormalization, Subsample2D
from noisy_keras.models.registry import (
    MODEL_NAMES,
    MODELS_WITH_BATCH_NORM,
    MODELS_WITH_MAX_POOLING,
)
from noisy_keras.models.zoo import build_model, has_max_pooling

SMALL_MODELS = {
    # name: (input_shape, total parameters for 10 classes)
    "mlp": ((8, 8, 1), 64 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10),
    "cnn": ((8, 8, 1), 159_626),
    "cnn1d": ((40, 1), 12_106),
    "cnn1d_bn": ((40, 1), 12_394),  # 3 BN layers: 96 gammas/betas trainable, 192 moving stats
    "resnet20": ((16, 16, 3), 271_098),  # global pooling: the count is size-independent
}


def _batch(input_shape, batch_size, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch_size,) + input_shape).astype("float32")
    return x, np.arange(batch_size) % 10


def _loss_before_and_after_one_step(model, x, y, jit_compile):
    model.compile(
        optimizer=keras.optimizers.SGD(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
    )
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    before = float(loss(y, model(x, training=False)))
    model.train_on_batch(x, y)
    return before, float(loss(y, model(x, training=False)))


@pytest.mark.parametrize("name", sorted(SMALL_MODELS))
def test_model_builds_counts_parameters_and_trains_one_step(name):
    input_shape, parameters = SMALL_MODELS[name]
    model = build_model(name, input_shape=input_shape, num_classes=10, seed=0)
    assert model.count_params() == parameters
    x, y = _batch(input_shape, 8)
    logits = np.asarray(model(x, training=False))
    assert logits.shape == (8, 10)
    assert not np.allclose(logits.sum(axis=1), 1.0)  # logits, not probabilities
    trainable_before = [np.array(w) for w in model.trainable_weights]
    # Train-mode BN makes the inference loss of resnet20 a poor yardstick; use training loss.
    if name in MODELS_WITH_BATCH_NORM:
        model.compile(
            optimizer=keras.optimizers.SGD(0.01),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=True,
        )
        first = float(model.train_on_batch(x, y))
        second = float(model.train_on_batch(x, y))
        assert second < first
    else:
        before, after = _loss_before_and_after_one_step(model, x, y, jit_compile=True)
        assert after < before
    assert all(
        not np.array_equal(old, new)
        for old, new in zip(trainable_before, model.trainable_weights, strict=True)
    )


def test_bn_free_models_have_no_batch_normalization():
    for name in ("mlp", "cnn", "cnn1d"):
        input_shape, _ = SMALL_MODELS[name]
        model = build_model(name, input_shape=input_shape, num_classes=10)
        assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers)
        assert not model.non_trainable_weights


@pytest.mark.parametrize("name", sorted(SMALL_MODELS))
def test_same_seed_same_weights_other_seed_other_weights(name):
    input_shape, _ = SMALL_MODELS[name]
    weights = [
        build_model(name, input_shape=input_shape, num_classes=10, seed=seed).get_weights()
        for seed in (3, 3, 4)
    ]
    for first, again in zip(weights[0], weights[1], strict=True):
        np.testing.assert_array_equal(first, again)
    kernels = [(a, b) for a, b in zip(weights[0], weights[2], strict=True) if a.std() > 0]
    assert kernels and all(not np.array_equal(a, b) for a, b in kernels)


def test_cnn1d_bn_is_cnn1d_with_batch_normalization_and_takes_ghost_batches():
    plain = build_model("cnn1d", input_shape=(40, 1), num_classes=10, seed=0)
    with_bn = build_model("cnn1d_bn", input_shape=(40, 1), num_classes=10, seed=0)
    bn = [layer for layer in with_bn.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert [layer.name for layer in bn] == ["bn0", "bn1", "bn2"]
    convs = [layer for layer in with_bn.layers if isinstance(layer, keras.layers.Conv1D)]
    assert [c.kernel.shape for c in convs] == [
        c.kernel.shape for c in plain.layers if isinstance(c, keras.layers.Conv1D)
    ]
    assert not any(c.use_bias for c in convs)  # BN's beta is the bias
    # the trainable difference from cnn1d: 3 x 32 conv biases out, 3 x 32 (gamma, beta) in
    assert sum(int(np.prod(w.shape)) for w in with_bn.trainable_weights) == 12_106 - 96 + 192
    ghost = build_model("cnn1d_bn", input_shape=(40, 1), num_classes=10, seed=0, ghost_batch_size=4)
    gbn = [layer for layer in ghost.layers if isinstance(layer, GhostBatchNormalization)]
    assert [(layer.name, layer.virtual_batch_size) for layer in gbn] == [
        ("bn0", 4),
        ("bn1", 4),
        ("bn2", 4),
    ]
    for a, b in zip(with_bn.get_weights(), ghost.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_ghost_swap_replaces_every_batch_normalization_in_resnet20():
    plain = build_model("resnet20", input_shape=(16, 16, 3), num_classes=10, seed=1)
    ghost = build_model(
        "resnet20", input_shape=(16, 16, 3), num_classes=10, seed=1, ghost_batch_size=2
    )
    bn = [layer for layer in plain.layers if isinstance(layer, keras.layers.BatchNormalization)]
    gbn = [layer for layer in ghost.layers if isinstance(layer, GhostBatchNormalization)]
    assert len(bn) == len(gbn) == 19
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in ghost.layers)
    assert [layer.name for layer in bn] == [layer.name for layer in gbn]
    assert {(layer.momentum, layer.epsilon, layer.virtual_batch_size) for layer in gbn} == {
        (0.9, 1e-5, 2)
    }
    # Same seed: the ghost model starts from exactly the plain model's weights.
    for a, b in zip(plain.get_weights(), ghost.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    # Ghost batches of 2 in a batch of 4 normalize differently from full-batch BN.
    x, y = _batch((16, 16, 3), 4)
    assert not np.allclose(plain(x, training=True), ghost(x, training=True), atol=1e-4)
    ghost.compile(
        optimizer=keras.optimizers.SGD(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=True,
    )
    ghost.train_on_batch(x, y)
    assert np.abs(np.asarray(gbn[0].moving_mean)).max() > 0


def test_resnet20_saves_and_loads(tmp_path):
    model = build_model("resnet20", input_shape=(8, 8, 3), num_classes=4, ghost_batch_size=2)
    path = tmp_path / "resnet20.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    x, _ = _batch((8, 8, 3), 2)
    np.testing.assert_allclose(loaded(x, training=False), model(x, training=False), rtol=1e-6)


def test_resnet50_with_ghost_batch_normalization_trains_one_step():
    model = build_model(
        "resnet50", input_shape=(32, 32, 3), num_classes=10, seed=0, ghost_batch_size=2
    )
    assert model.count_params() == 23_608_202  # keras.applications ResNet50, 10 classes
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers)
    assert sum(isinstance(layer, GhostBatchNormalization) for layer in model.layers) == 53
    x, y = _batch((32, 32, 3), 2)
    model.compile(
        optimizer=keras.optimizers.SGD(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=False,
    )
    kernel = model.get_layer("conv1_conv").kernel
    before = np.array(kernel)
    model.train_on_batch(x, y)
    assert not np.array_equal(before, np.asarray(kernel))
    assert model(x, training=False).shape == (2, 10)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"name": "vgg16"},
            r"Unknown model name='vgg16'; valid names are " + ", ".join(MODEL_NAMES),
        ),
        (
            {"name": "mlp", "ghost_batch_size": 8},
            r"ghost_batch_size=8 has no effect on model 'mlp'",
        ),
        ({"name": "resnet20", "ghost_batch_size": 0}, r"ghost_batch_size must be an integer >= 1"),
        ({"name": "cnn", "input_shape": (40, 1)}, r"model 'cnn' needs image inputs"),
        ({"name": "resnet50", "input_shape": (8, 8, 1)}, r"sides >= 32.*input_shape=\(8, 8, 1\)"),
        ({"name": "mlp", "num_classes": 1}, r"num_classes must be an integer >= 2"),
        ({"name": "mlp", "input_shape": (0, 3)}, r"input_shape must be a non-empty tuple"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    arguments = {"input_shape": (8, 8, 1), "num_classes": 10, **kwargs}
    with pytest.raises(ValueError, match=message):
        build_model(arguments.pop("name"), **arguments)


REGISTRY_INPUTS = {**{n: shape for n, (shape, _) in SMALL_MODELS.items()}, "resnet50": (32, 32, 3)}


def test_max_pooling_table_and_float32_logits_under_mixed_precision():
    """MODELS_WITH_MAX_POOLING (what the determinism policy reads) is what the models hold."""
    assert sorted(REGISTRY_INPUTS) == sorted(MODEL_NAMES)
    for policy in ("float32", "mixed_float16"):
        keras.config.set_dtype_policy(policy)
        for name, input_shape in REGISTRY_INPUTS.items():
            model = build_model(name, input_shape=input_shape, num_classes=10)
            assert has_max_pooling(model) == (name in MODELS_WITH_MAX_POOLING), name
            assert model.outputs[0].dtype == "float32", (policy, name)
            compute = {layer.compute_dtype for layer in model.layers if layer.weights}
            assert compute == ({"float32"} if policy == "float32" else {"float16"}), name
            if name in SMALL_MODELS:
                assert model.count_params() == SMALL_MODELS[name][1]


@pytest.mark.parametrize("side", [7, 8])
def test_subsample_equals_max_pooling_of_size_one_in_value_and_gradient(side):
    x = tf.constant(np.random.default_rng(side).normal(size=(2, side, side, 3)), tf.float32)
    weights = tf.constant(np.random.default_rng(1).normal(size=(2, 4, 4, 3)), tf.float32)
    outputs, gradients = [], []
    for layer in (keras.layers.MaxPooling2D(1, strides=2), Subsample2D(2)):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
            loss = tf.reduce_sum(y * weights)
        outputs.append(y.numpy())
        gradients.append(tape.gradient(loss, x).numpy())
        assert layer.compute_output_shape((None, side, side, 3)) == (None, 4, 4, 3)
    np.testing.assert_array_equal(outputs[0], outputs[1])
    np.testing.assert_array_equal(outputs[1], x.numpy()[:, ::2, ::2, :])
    np.testing.assert_array_equal(gradients[0], gradients[1])


def test_xla_under_op_determinism_takes_subsampling_but_not_max_pooling():
    """Why resnet20 subsamples with a slice: TensorFlow's answer for the two, as of 2.21."""
    tf.config.experimental.enable_op_determinism()
    x = tf.constant(np.random.default_rng(0).normal(size=(2, 8, 8, 3)), tf.float32)

    def gradient_of(layer):
        @tf.function(jit_compile=True)
        def gradient(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = tf.reduce_sum(layer(x) ** 2)
            return tape.gradient(loss, x)

        return gradient(x)

    expected = np.zeros((2, 8, 8, 3), np.float32)
    expected[:, ::2, ::2, :] = 2 * x.numpy()[:, ::2, ::2, :]
    np.testing.assert_array_equal(gradient_of(Subsample2D(2)), expected)
    with pytest.raises(tf.errors.UnimplementedError, match="deterministic XLA implementation"):
        gradient_of(keras.layers.MaxPooling2D(2))
