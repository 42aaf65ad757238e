"""Image preprocessing: the random-resized-crop rule, the evaluation crop, slice augmentation."""

import math

import numpy as np
import pytest
import tensorflow as tf

from noisy_keras.data import preprocessing


def _reference_window(height, width, key):
    """The rule of `random_resized_crop_window`, in NumPy float32, from the same uniform draws."""
    draws = tf.random.stateless_uniform([4, preprocessing.CROP_ATTEMPTS], key).numpy()
    low, high = preprocessing.CROP_AREA_RANGE
    area = np.float32(height * width) * (np.float32(low) + np.float32(high - low) * draws[0])
    log_low, log_high = (math.log(r) for r in preprocessing.CROP_ASPECT_RANGE)
    aspect = np.exp(np.float32(log_low) + np.float32(log_high - log_low) * draws[1])
    for attempt in range(preprocessing.CROP_ATTEMPTS):
        w = int(np.rint(np.sqrt(area[attempt] * aspect[attempt])))
        h = int(np.rint(np.sqrt(area[attempt] / aspect[attempt])))
        if 1 <= h <= height and 1 <= w <= width:
            top = int(draws[2, attempt] * np.float32(height - h + 1))
            left = int(draws[3, attempt] * np.float32(width - w + 1))
            return (top, left, h, w), True
    return tuple(int(v) for v in preprocessing.central_crop_window(height, width)), False


def test_random_resized_crop_window_follows_the_rule():
    found = 0
    for index in range(120):
        height, width = 20 + index % 37, 15 + (index * 7) % 50
        key = tf.constant([index, 11], tf.int64)
        window = tuple(int(v) for v in preprocessing.random_resized_crop_window(height, width, key))
        expected, fits = _reference_window(height, width, key)
        assert window == expected, (height, width, index)
        top, left, h, w = window
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
        if fits:
            found += 1
            # Rounding each side moves the area by at most (h + w) / 2 + 1/4 pixels.
            assert 0.08 * height * width - (h + w) <= h * w <= height * width
    assert found >= 110  # a proposal fits in most draws for these sizes


def test_crop_window_falls_back_to_the_central_crop_with_clipped_aspect():
    # One pixel high: no crop of >= 8% of the area with aspect <= 4/3 fits.
    window = preprocessing.random_resized_crop_window(1, 100, tf.constant([0, 1], tf.int64))
    assert [int(v) for v in window] == [0, 49, 1, 1]
    assert [int(v) for v in preprocessing.central_crop_window(100, 10)] == [43, 0, 13, 10]
    assert [int(v) for v in preprocessing.central_crop_window(30, 40)] == [0, 0, 30, 40]


def test_eval_image_resizes_the_shorter_side_and_crops_the_center():
    assert preprocessing.eval_resize_side(224) == 256
    rng = np.random.default_rng(0)
    # Shorter side 9 = round(8 / 0.875): no resize, only the central 8x8 crop.
    image = rng.integers(0, 256, size=(9, 13, 3), dtype=np.uint8)
    out = preprocessing.resnet_eval_image(tf.io.encode_png(image), 8).numpy()
    np.testing.assert_allclose(out, image[0:8, 2:10] / 255.0, rtol=1e-6)
    # Any size comes out size x size in [0, 1].
    other = rng.integers(0, 256, size=(40, 23, 3), dtype=np.uint8)
    out = preprocessing.resnet_eval_image(tf.io.encode_png(other), 8).numpy()
    assert out.shape == (8, 8, 3) and 0 <= out.min() and out.max() <= 1


def test_train_image_is_the_keyed_crop_resized_and_maybe_mirrored():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=(30, 41, 3), dtype=np.uint8)
    png = tf.io.encode_png(image)
    mirrored = 0
    for index in range(12):
        key = tf.constant([5, index], tf.int64)
        out = preprocessing.resnet_train_image(png, key, 16).numpy()
        top, left, h, w = (
            int(v)
            for v in preprocessing.random_resized_crop_window(
                30, 41, tf.random.experimental.stateless_fold_in(key, 0)
            )
        )
        crop = tf.image.resize(image[top : top + h, left : left + w].astype("float32"), (16, 16))
        expected = crop.numpy() / 255.0
        flip_key = tf.random.experimental.stateless_fold_in(key, 1)
        if tf.random.stateless_uniform([], flip_key) < 0.5:
            expected, mirrored = expected[:, ::-1], mirrored + 1
        np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(out, preprocessing.resnet_train_image(png, key, 16).numpy())
    assert 0 < mirrored < 12


def test_jpeg_train_images_decode_only_the_window():
    rng = np.random.default_rng(2)
    jpeg = tf.io.encode_jpeg(rng.integers(0, 256, size=(30, 41, 3), dtype=np.uint8))
    key = tf.constant([1, 2], tf.int64)
    top, left, h, w = preprocessing.random_resized_crop_window(
        30, 41, tf.random.experimental.stateless_fold_in(key, 0)
    )
    crop = tf.image.decode_and_crop_jpeg(jpeg, tf.stack([top, left, h, w]), channels=3)
    expected = tf.image.resize(tf.cast(crop, tf.float32), (16, 16)).numpy() / 255.0
    if tf.random.stateless_uniform([], tf.random.experimental.stateless_fold_in(key, 1)) < 0.5:
        expected = expected[:, ::-1]
    out = preprocessing.resnet_train_image(jpeg, key, 16).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("flip", [False, True])
def test_translate_and_flip_of_a_slice_is_that_slice_of_the_whole_batch(flip):
    images = tf.random.stateless_uniform([12, 8, 8, 3], [3, 4])
    key = tf.constant([9, 9], tf.int64)
    whole = preprocessing.translate_and_flip(images, key, flip).numpy()
    for first in (0, 4, 8):
        part = preprocessing.translate_and_flip(images[first : first + 4], key, flip, first, 12)
        np.testing.assert_array_equal(part.numpy(), whole[first : first + 4])
    assert not np.array_equal(whole, images.numpy())
