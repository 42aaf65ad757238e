"""Image preprocessing for the input pipelines: decode, resize, crop, flip, normalize.

Pure TensorFlow functions of one image (or one batch) and a stateless random
key, so every random draw is a function of (seed, epoch, position in the
epoch): a resumed run, or the same run read by several input pipelines, sees
the same pixels.

Two recipes, by name (`PREPROCESSING_NAMES`):

* ``resize`` (the package's default): the whole image resized to size x size
  (bilinear, antialiased, rounded back to uint8, `resize_uint8`); training may
  add `translate_and_flip` per batch (the light CIFAR-style augmentation).
* ``resnet``: the standard ResNet-50 ImageNet preprocessing (He et al. 2016;
  Goyal et al. 2017), with the scale augmentation of Szegedy et al. 2015.
  Training (`resnet_train_image`): a random crop covering 8% to 100% of the
  image's area with aspect ratio in [3/4, 4/3] (`random_resized_crop_window`),
  resized to size x size, mirrored with probability 1/2. Evaluation
  (`resnet_eval_image`): the shorter side resized to round(size / 0.875)
  (256 for 224), then the central size x size crop.

Pixels are scaled to [0, 1] (divided by 255), as everywhere in the package.

References:
    K. He et al., "Deep Residual Learning for Image Recognition", CVPR 2016.
    P. Goyal et al., "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour", 2017.
    C. Szegedy et al., "Going Deeper with Convolutions", CVPR 2015.
"""

from __future__ import annotations

import math

import tensorflow as tf

from noisy_keras.data.registry import PREPROCESSING_NAMES

DEFAULT_IMAGE_SIZE = 224
"""Side in pixels images are resized to when no size is given (the ResNet-50 input)."""
CROP_AREA_RANGE = (0.08, 1.0)
"""Fraction of the image area a random-resized crop covers (Szegedy et al. 2015)."""
CROP_ASPECT_RANGE = (3 / 4, 4 / 3)
"""Width / height of a random-resized crop."""
CROP_ATTEMPTS = 10
"""Crop draws tried before falling back to the central crop."""
EVAL_CROP_FRACTION = 0.875
"""Central crop side / resized shorter side at evaluation (224 / 256)."""

__all__ = [
    "CROP_AREA_RANGE",
    "CROP_ASPECT_RANGE",
    "CROP_ATTEMPTS",
    "EVAL_CROP_FRACTION",
    "PREPROCESSING_NAMES",
    "central_crop_window",
    "decode_image",
    "eval_resize_side",
    "normalize",
    "random_resized_crop_window",
    "resize_uint8",
    "resnet_eval_image",
    "resnet_train_image",
    "translate_and_flip",
]


def normalize(x):
    """uint8 images -> float32 in [0, 1] (divided by 255); float data is taken as normalized."""
    if x.dtype == tf.uint8:
        return tf.cast(x, tf.float32) / 255.0
    return tf.cast(x, tf.float32)


def decode_image(contents, channels: int = 3):
    """Encoded bytes (JPEG, PNG, BMP, GIF: first frame) -> uint8 (height, width, channels)."""
    image = tf.io.decode_image(contents, channels=channels, expand_animations=False)
    return tf.ensure_shape(image, (None, None, channels))


def resize_uint8(image, size: tuple[int, int] | None):
    """Resizes a uint8 image to `size` (bilinear, antialiased), rounded and clipped to uint8.

    None, or an image already of that size, is returned unchanged.
    """
    if size is not None and tuple(image.shape[:2]) != tuple(size):
        image = tf.image.resize(image, size, method="bilinear", antialias=True)
        image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
    return image


def random_resized_crop_window(
    height,
    width,
    key,
    area_range: tuple[float, float] = CROP_AREA_RANGE,
    aspect_range: tuple[float, float] = CROP_ASPECT_RANGE,
    attempts: int = CROP_ATTEMPTS,
):
    """The window (top, left, crop_height, crop_width) of a random-resized crop.

    Rule (Szegedy et al. 2015, as used for ResNet-50 by Goyal et al. 2017):
    each of `attempts` draws takes an area fraction a ~ U(area_range) and an
    aspect ratio r = exp(U(log aspect_range)) and proposes
    w = round(sqrt(a H W r)), h = round(sqrt(a H W / r)); the first proposal
    with 1 <= h <= H and 1 <= w <= W is placed at top = floor(u (H - h + 1)),
    left = floor(v (W - w + 1)), u, v ~ U[0, 1). If none fits, the central crop
    of the whole image with its aspect ratio clipped to `aspect_range` is used
    (`central_crop_window`). Every draw is `tf.random.stateless_uniform` keyed
    by `key`, so the window is a function of (height, width, key).

    Args:
        height, width: the image's size (scalar integer tensors or ints).
        key: a stateless key, shape (2,) int64/int32.
        area_range: (min, max) fraction of the area, 0 < min <= max <= 1.
        aspect_range: (min, max) width / height, 0 < min <= max.
        attempts: proposals before the fallback, >= 1.

    Returns:
        (top, left, crop_height, crop_width), int32 scalars.
    """
    height = tf.cast(height, tf.int32)
    width = tf.cast(width, tf.int32)
    draws = tf.random.stateless_uniform([4, attempts], key, dtype=tf.float32)
    area = tf.cast(height * width, tf.float32) * (
        area_range[0] + (area_range[1] - area_range[0]) * draws[0]
    )
    log_low, log_high = math.log(aspect_range[0]), math.log(aspect_range[1])
    aspect = tf.exp(log_low + (log_high - log_low) * draws[1])
    crop_w = tf.cast(tf.round(tf.sqrt(area * aspect)), tf.int32)
    crop_h = tf.cast(tf.round(tf.sqrt(area / aspect)), tf.int32)
    fits = (crop_h >= 1) & (crop_h <= height) & (crop_w >= 1) & (crop_w <= width)
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
    chosen_h, chosen_w = crop_h[first], crop_w[first]
    top = tf.cast(draws[2, first] * tf.cast(height - chosen_h + 1, tf.float32), tf.int32)
    left = tf.cast(draws[3, first] * tf.cast(width - chosen_w + 1, tf.float32), tf.int32)
    fallback = central_crop_window(height, width, aspect_range)
    found = tf.reduce_any(fits)
    window = tf.where(found, tf.stack([top, left, chosen_h, chosen_w]), tf.stack(fallback))
    return window[0], window[1], window[2], window[3]


def central_crop_window(height, width, aspect_range=CROP_ASPECT_RANGE):
    """The largest central window of the image whose width / height lies in `aspect_range`.

    Returns:
        (top, left, crop_height, crop_width), int32 scalars.
    """
    height = tf.cast(height, tf.int32)
    width = tf.cast(width, tf.int32)
    ratio = tf.cast(width, tf.float32) / tf.cast(height, tf.float32)
    crop_w = tf.where(
        ratio > aspect_range[1],
        tf.cast(tf.round(tf.cast(height, tf.float32) * aspect_range[1]), tf.int32),
        width,
    )
    crop_h = tf.where(
        ratio < aspect_range[0],
        tf.cast(tf.round(tf.cast(width, tf.float32) / aspect_range[0]), tf.int32),
        height,
    )
    crop_w = tf.clip_by_value(crop_w, 1, width)
    crop_h = tf.clip_by_value(crop_h, 1, height)
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def _image_shape(contents, channels: int):
    """(height, width) of an encoded image; JPEG headers are read without decoding."""
    return tf.cond(
        tf.io.is_jpeg(contents),
        lambda: tf.image.extract_jpeg_shape(contents)[:2],
        lambda: tf.shape(decode_image(contents, channels))[:2],
    )


def _decode_window(contents, window, channels: int):
    """Decodes only `window` of a JPEG (`decode_and_crop_jpeg`); other formats fully, then crop."""
    top, left, crop_h, crop_w = window

    def jpeg():
        return tf.image.decode_and_crop_jpeg(
            contents, tf.stack([top, left, crop_h, crop_w]), channels=channels
        )

    def other():
        return decode_image(contents, channels)[top : top + crop_h, left : left + crop_w]

    return tf.ensure_shape(tf.cond(tf.io.is_jpeg(contents), jpeg, other), (None, None, channels))


def resnet_train_image(contents, key, size: int, channels: int = 3, flip: bool = True):
    """Training image of the ResNet recipe: random-resized crop, resize, random mirror.

    The crop window is `random_resized_crop_window` of the image's size under
    a key folded from `key`; only that window of a JPEG is decoded
    (`tf.image.decode_and_crop_jpeg`, much faster for small crops; near the
    window's edges its pixels can differ from a cropped full decode by the
    JPEG chroma upsampling). The crop is resized to size x size (bilinear)
    and mirrored left-right with probability 1/2 (when `flip`).

    Returns:
        float32 (size, size, channels) in [0, 1].
    """
    shape = _image_shape(contents, channels)
    window = random_resized_crop_window(
        shape[0], shape[1], tf.random.experimental.stateless_fold_in(key, 0)
    )
    crop = _decode_window(contents, window, channels)
    image = tf.image.resize(tf.cast(crop, tf.float32), (size, size), method="bilinear")
    if flip:
        mirror = tf.random.stateless_uniform([], tf.random.experimental.stateless_fold_in(key, 1))
        image = tf.where(mirror < 0.5, tf.reverse(image, axis=[1]), image)
    return tf.ensure_shape(tf.clip_by_value(image, 0.0, 255.0) / 255.0, (size, size, channels))


def eval_resize_side(size: int) -> int:
    """The shorter side evaluation images are resized to: round(size / 0.875) (256 for 224)."""
    return int(round(size / EVAL_CROP_FRACTION))


def resnet_eval_image(contents, size: int, channels: int = 3):
    """Evaluation image of the ResNet recipe: shorter side to `eval_resize_side`, central crop.

    Returns:
        float32 (size, size, channels) in [0, 1].
    """
    image = tf.cast(decode_image(contents, channels), tf.float32)
    height = tf.cast(tf.shape(image)[0], tf.float32)
    width = tf.cast(tf.shape(image)[1], tf.float32)
    scale = eval_resize_side(size) / tf.minimum(height, width)
    new_h = tf.maximum(tf.cast(tf.round(height * scale), tf.int32), size)
    new_w = tf.maximum(tf.cast(tf.round(width * scale), tf.int32), size)
    image = tf.image.resize(image, tf.stack([new_h, new_w]), method="bilinear")
    top, left = (new_h - size) // 2, (new_w - size) // 2
    image = image[top : top + size, left : left + size]
    return tf.ensure_shape(tf.clip_by_value(image, 0.0, 255.0) / 255.0, (size, size, channels))


def translate_and_flip(images, key, flip: bool, first: int = 0, total: int | None = None):
    """Random translation (zero-padded crop) and optional mirror of each image of a batch.

    Rule: every image of the global batch of `total` images is padded with
    zeros by p = max(1, round(side / 8)) pixels (4 for 32x32), cropped back at
    offsets drawn uniformly from {0, ..., 2p} per axis and, when `flip`,
    mirrored left-right with probability 1/2. The draws for all `total`
    images come from `key`; `images` are the global batch's images
    `first, ..., first + len(images) - 1`, so a replica's slice of a batch
    gets exactly the pixels it would get as part of the whole batch.

    Args:
        images: float32 (batch, height, width, channels).
        key: stateless key of the global batch.
        flip: whether to mirror.
        first: index of images[0] in the global batch.
        total: size of the global batch (None: len(images)).

    Returns:
        The augmented images, same shape.
    """
    batch, height, width = images.shape[0], images.shape[1], images.shape[2]
    total = batch if total is None else total
    pad = max(1, round(min(height, width) / 8))
    padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
    keys = [tf.random.experimental.stateless_fold_in(key, i) for i in range(3)]

    def draw(k, **kwargs):
        return tf.random.stateless_uniform([total], k, **kwargs)[first : first + batch]

    offset_rows = draw(keys[0], minval=0, maxval=2 * pad + 1, dtype=tf.int32)
    offset_cols = draw(keys[1], minval=0, maxval=2 * pad + 1, dtype=tf.int32)
    rows = offset_rows[:, None] + tf.range(height)[None, :]
    cols = offset_cols[:, None] + tf.range(width)[None, :]
    images = tf.gather(padded, rows, axis=1, batch_dims=1)
    images = tf.gather(images, cols, axis=2, batch_dims=1)
    if flip:
        mirror = draw(keys[2]) < 0.5
        images = tf.where(mirror[:, None, None, None], tf.reverse(images, axis=[2]), images)
    return images
