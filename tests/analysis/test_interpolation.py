"""Tests for noisy_keras.analysis.interpolation against losses computed by hand."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from noisy_keras.analysis import (
    evaluate_loss_accuracy,
    interpolate_weights,
    interpolated_model,
    parametric_interpolation,
    recompute_batchnorm_statistics,
)

RNG = np.random.default_rng(0)
X_TRAIN = RNG.normal(size=(20, 4)).astype("float32")
Y_TRAIN = RNG.integers(0, 3, size=20)
X_VAL = RNG.normal(size=(12, 4)).astype("float32")
Y_VAL = RNG.integers(0, 3, size=12)


def linear_model(seed):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    rng = np.random.default_rng(seed)
    model.set_weights([rng.normal(size=(4, 3)), rng.normal(size=(3,))])
    return model


def by_hand(weights_s, weights_l, alpha, x, y):
    kernel = (1 - alpha) * weights_s[0].astype(np.float64) + alpha * weights_l[0]
    bias = (1 - alpha) * weights_s[1].astype(np.float64) + alpha * weights_l[1]
    logits = x.astype(np.float64) @ kernel + bias
    top = logits.max(axis=1, keepdims=True)
    log_normalizer = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
    loss = np.mean(log_normalizer - logits[np.arange(len(y)), y])
    accuracy = np.mean(np.argmax(logits, axis=1) == y)
    return loss, accuracy


def test_linear_model_path_matches_hand_computation():
    small, large = linear_model(1), linear_model(2)
    before = [w.copy() for w in small.get_weights() + large.get_weights()]
    result = parametric_interpolation(
        small, large, (X_TRAIN, Y_TRAIN), (X_VAL, Y_VAL), batch_size=8
    )
    np.testing.assert_array_equal(result.alphas, np.linspace(-1, 2, 25))
    ws, wl = small.get_weights(), large.get_weights()
    for i, alpha in enumerate(result.alphas):
        train = by_hand(ws, wl, alpha, X_TRAIN, Y_TRAIN)
        val = by_hand(ws, wl, alpha, X_VAL, Y_VAL)
        assert result.train_loss[i] == pytest.approx(train[0], rel=1e-5)
        assert result.train_accuracy[i] == train[1]
        assert result.val_loss[i] == pytest.approx(val[0], rel=1e-5)
        assert result.val_accuracy[i] == val[1]
    # The inputs are untouched.
    for old, new in zip(before, small.get_weights() + large.get_weights(), strict=True):
        np.testing.assert_array_equal(old, new)
    # The end points are the models themselves.
    i0, i1 = 8, 16
    assert result.alphas[i0] == 0.0 and result.alphas[i1] == 1.0
    assert result.train_loss[i0] == pytest.approx(
        evaluate_loss_accuracy(small, (X_TRAIN, Y_TRAIN))[0]
    )
    assert result.val_accuracy[i1] == evaluate_loss_accuracy(large, (X_VAL, Y_VAL))[1]


def test_dataset_files_and_one_hot_give_the_same_answers(tmp_path):
    small, large = linear_model(3), linear_model(4)
    alphas = [-0.5, 0.0, 0.5, 1.5]
    reference = parametric_interpolation(small, large, (X_TRAIN, Y_TRAIN), alphas=alphas)
    assert reference.val_loss is None and reference.val_accuracy is None
    dataset = tf.data.Dataset.from_tensor_slices((X_TRAIN, Y_TRAIN)).batch(7)  # 7, 7, 6
    small.save(tmp_path / "small.keras")
    large.save(tmp_path / "large.keras")
    from_files = parametric_interpolation(
        tmp_path / "small.keras", str(tmp_path / "large.keras"), dataset, alphas=alphas
    )
    np.testing.assert_allclose(from_files.train_loss, reference.train_loss, rtol=1e-6)
    np.testing.assert_array_equal(from_files.train_accuracy, reference.train_accuracy)
    one_hot = keras.losses.CategoricalCrossentropy(from_logits=True)
    with_one_hot = parametric_interpolation(
        small, large, (X_TRAIN, np.eye(3)[Y_TRAIN]), alphas=alphas, loss=one_hot
    )
    np.testing.assert_allclose(with_one_hot.train_loss, reference.train_loss, rtol=1e-6)
    np.testing.assert_array_equal(with_one_hot.train_accuracy, reference.train_accuracy)


def batchnorm_model(seed):
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(2),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(3),
        ]
    )
    rng = np.random.default_rng(seed)
    model.set_weights(
        [rng.normal(size=w.shape) + (1.0 if "variance" in w.path else 0.0) for w in model.weights]
    )
    model.layers[1].moving_variance.assign(np.abs(model.layers[1].moving_variance.numpy()) + 0.5)
    return model


def test_batchnorm_statistics_interpolated_by_default():
    small, large = batchnorm_model(5), batchnorm_model(6)
    model = interpolated_model(small, large, 0.25)
    for index in (4, 5):  # moving mean and variance
        s, g = (np.float64(m.weights[index].numpy()) for m in (small, large))
        np.testing.assert_allclose(model.weights[index].numpy(), 0.75 * s + 0.25 * g, atol=1e-7)


def test_batchnorm_statistics_recomputed_from_training_data():
    small, large = batchnorm_model(5), batchnorm_model(6)
    small_before = [w.copy() for w in small.get_weights()]
    model = interpolated_model(
        small, large, 0.25, batchnorm="recompute", train_data=(X_TRAIN, Y_TRAIN), batch_size=8
    )
    kernel = 0.75 * small.get_weights()[0] + 0.25 * large.get_weights()[0]
    bias = 0.75 * small.get_weights()[1] + 0.25 * large.get_weights()[1]
    hidden = X_TRAIN.astype(np.float64) @ kernel + bias
    batches = [hidden[0:8], hidden[8:16], hidden[16:20]]  # sizes 8, 8, 4
    sizes = np.array([8, 8, 4])[:, None]
    expected_mean = hidden.mean(axis=0)
    expected_variance = (sizes * np.array([b.var(axis=0) for b in batches])).sum(axis=0) / 20
    layer = model.layers[1]
    np.testing.assert_allclose(layer.moving_mean.numpy(), expected_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.moving_variance.numpy(), expected_variance, rtol=1e-5)
    assert layer.momentum == 0.99 and layer.trainable
    for old, new in zip(small_before, small.get_weights(), strict=True):
        np.testing.assert_array_equal(old, new)
    # Recomputation changes the losses between the end points, and only through BN.
    default = parametric_interpolation(small, large, (X_TRAIN, Y_TRAIN), alphas=[0.25])
    recomputed = parametric_interpolation(
        small, large, (X_TRAIN, Y_TRAIN), alphas=[0.25], batchnorm="recompute", batch_size=8
    )
    assert recomputed.batchnorm == "recompute"
    assert recomputed.train_loss[0] == pytest.approx(
        evaluate_loss_accuracy(model, (X_TRAIN, Y_TRAIN))[0], rel=1e-6
    )
    assert recomputed.train_loss[0] != pytest.approx(default.train_loss[0], rel=1e-3)
    assert recompute_batchnorm_statistics(linear_model(0), (X_TRAIN, Y_TRAIN)) == 0


def test_interpolate_weights_extrapolates_and_keeps_dtypes():
    small = [np.array([1.0, 2.0], dtype=np.float32), np.array([3], dtype=np.int64)]
    large = [np.array([3.0, 6.0], dtype=np.float32), np.array([9], dtype=np.int64)]
    out = interpolate_weights(small, large, 2.0)
    np.testing.assert_array_equal(out[0], [5.0, 10.0])
    assert out[0].dtype == np.float32
    np.testing.assert_array_equal(out[1], [3])


def test_bad_arguments_raise():
    small = linear_model(1)
    other = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    data = (X_TRAIN, Y_TRAIN)
    with pytest.raises(ValueError, match="same architecture"):
        parametric_interpolation(small, other, data)
    with pytest.raises(ValueError, match="batchnorm must be one of"):
        parametric_interpolation(small, small, data, batchnorm="reset")
    with pytest.raises(ValueError, match="alphas"):
        parametric_interpolation(small, small, data, alphas=[])
    with pytest.raises(ValueError, match="needs train_data"):
        interpolated_model(small, small, 0.5, batchnorm="recompute")
    with pytest.raises(ValueError, match="model_large must be a keras.Model or the path"):
        parametric_interpolation(small, "missing.keras", data)
    with pytest.raises(ValueError, match="same number of examples"):
        parametric_interpolation(small, small, (X_TRAIN, Y_TRAIN[:5]))
    with pytest.raises(ValueError, match="one output per class"):
        evaluate_loss_accuracy(
            keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)]),
            data,
            loss=keras.losses.MeanSquaredError(),
        )
