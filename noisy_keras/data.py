"""Datasets as deterministic `tf.data` pipelines.

`load_dataset(name)` loads a classification dataset into memory and returns a
frozen `ClassificationData`; its `train_batches` and `val_batches` make the
`tf.data` pipelines. Names:

* ``digits`` (default): scikit-learn's bundled handwritten digits (1,797 real
  8x8 scans, offline), as 8x8x1 images, split stratified 3:1 into
  train/validation from `seed` like the paper.
* ``mnist1d``: MNIST-1D (Greydanus 2020), generated procedurally by the
  `mnist1d` package with its published settings (no download): 4,000 train and
  1,000 test 40-long signals, shape (40, 1). Its own test split is the
  validation split here; `val_fraction` and `seed` do not change it.
* ``tfds:NAME`` (``tfds:cifar10``, ``tfds:caltech101``, ...): any TFDS image
  classification dataset with ``image`` and ``label`` features, prepared by TFDS
  itself in `data_dir` (downloaded when not there yet). Its ``validation``
  split is used when it has one; otherwise its ``train`` split is split
  stratified by `val_fraction` (3:1 by default). Its ``test`` split is not used.
* ``folder:PATH``: a class-per-subfolder image tree (the layout of
  Caltech101's ``101_ObjectCategories``): every subfolder of PATH is a class
  (sorted by name), every ``.jpg/.jpeg/.png/.bmp/.gif`` file in it an example,
  decoded as RGB; split stratified by `val_fraction`.

Normalization: digits are divided by 16 (their maximum), images (TFDS, folder)
by 255, so inputs lie in [0, 1]; MNIST-1D keeps the package's standardization
(zero mean, unit standard deviation over the whole dataset). Images are stored
as uint8 and converted per batch. Images of differing sizes (and any dataset
given `image_size`) are resized with bilinear, antialiased resampling to
`image_size` x `image_size` (default 224, the ResNet-50 input).

Everything is held in memory (Caltech101 at 224x224: about 1.4 GB as uint8),
which makes the epoch order a pure function of (seed, epoch).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import os
import random

import numpy as np
import tensorflow as tf

from noisy_keras._validation import check_int

DATASET_NAMES = ("digits", "mnist1d")
DATASET_PREFIXES = ("tfds:", "folder:")
DEFAULT_IMAGE_SIZE = 224
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
# TFDS datasets whose classes change under a horizontal flip (digits, letters).
NO_FLIP_TFDS_NAMES = ("mnist", "emnist", "kmnist", "binarized_mnist", "svhn_cropped")
# Salt folded into the per-epoch key so augmentation draws differ from the order's.
_AUGMENT_SALT = 0x5EED


def stratified_split(
    labels: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified train/validation split.

    For each class (in sorted order) its example indices are permuted with a
    NumPy generator seeded with `seed`, and the first ``floor(val_fraction * n_c
    + 0.5)`` go to validation, at most ``n_c - 1`` so every class keeps a
    training example.

    Args:
        labels: integer labels, shape (N,).
        val_fraction: fraction of each class held out, in (0, 1).
        seed: integer >= 0.

    Returns:
        (train_indices, val_indices), each sorted ascending, disjoint, covering
        range(N).
    """
    if not isinstance(val_fraction, numbers.Real) or not 0 < val_fraction < 1:
        raise ValueError(
            f"val_fraction must be a number in (0, 1); received val_fraction={val_fraction!r}."
        )
    check_int("seed", seed, 0)
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    val_parts = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        num_val = min(int(math.floor(val_fraction * len(members) + 0.5)), len(members) - 1)
        val_parts.append(members[:num_val])
    val_indices = np.sort(np.concatenate(val_parts)) if val_parts else np.zeros(0, np.int64)
    train_mask = np.ones(len(labels), bool)
    train_mask[val_indices] = False
    return np.flatnonzero(train_mask), val_indices


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The order of the training examples in `epoch`: a function of (seed, epoch) only.

    It is TensorFlow's stateless shuffle keyed by ``[seed, epoch]``, the same op
    the training pipeline runs, so it does not depend on any global seed.

    Args:
        num_examples: number of training examples.
        seed: integer >= 0.
        epoch: epoch index, integer >= 0.

    Returns:
        A permutation of range(num_examples), int64.
    """
    check_int("num_examples", num_examples, 1)
    check_int("seed", seed, 0)
    check_int("epoch", epoch, 0)
    return epoch_order(num_examples, seed, epoch).numpy()


def epoch_order(num_examples: int, seed, epoch) -> tf.Tensor:
    """`epoch_permutation` as a tensor op; `seed` and `epoch` may be tensors (inside tf.data)."""
    key = tf.stack([tf.cast(seed, tf.int64), tf.cast(epoch, tf.int64)])
    return tf.random.experimental.stateless_shuffle(tf.range(num_examples, dtype=tf.int64), key)


@dataclasses.dataclass(frozen=True, eq=False)
class ClassificationData:
    """A classification dataset in memory, split into train and validation.

    Attributes:
        name: the name it was loaded by.
        x_train, y_train, x_val, y_val: examples as stored (uint8 images, or
            float32 already normalized) and int32 labels.
        num_classes: number of classes.
        class_names: one name per class index.
        validation: how the validation split was formed, in words.
        is_image: whether the examples are images (H, W, C), so augmentation
            applies.
        horizontal_flip: whether augmentation may flip images left-right
            (False for digits, whose class a mirror image can change).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    num_classes: int
    class_names: tuple[str, ...]
    validation: str
    is_image: bool
    horizontal_flip: bool

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example, without the batch axis."""
        return tuple(int(d) for d in self.x_train.shape[1:])

    @property
    def num_train(self) -> int:
        return int(len(self.y_train))

    @property
    def num_val(self) -> int:
        return int(len(self.y_val))

    def steps_per_epoch(self, batch_size: int) -> int:
        """Full batches per epoch of `train_batches(batch_size)`: num_train // batch_size."""
        self._check_batch_size(batch_size, self.num_train)
        return self.num_train // batch_size

    def _check_batch_size(self, batch_size: int, limit: int) -> None:
        check_int("batch_size", batch_size, 1)
        if batch_size > limit:
            raise ValueError(
                f"batch_size must be at most the number of training examples ({limit}) of "
                f"{self.name!r}; received batch_size={batch_size}."
            )

    def train_epochs(
        self,
        batch_size: int,
        seed: int,
        augment: bool = False,
        batches_per_epoch: int | None = None,
    ):
        """A function `epoch -> tf.data.Dataset` of that epoch's training batches.

        Epoch e visits the training examples in the order
        `epoch_permutation(num_train, seed, e)`, cut into ``num_train //
        batch_size`` full batches (the last ``num_train % batch_size`` examples
        of that order are left out of that epoch, a different few each epoch):
        static shapes for XLA and a fixed batch size for the gradient noise.
        Nothing depends on earlier epochs, so a run resumed at epoch e sees
        exactly the batches an uninterrupted run saw; this is the form
        `noisy_keras.training.fit` takes as `train_data`. `batches_per_epoch`
        keeps only the first that many batches of each epoch (e.g. with
        gradient accumulation: updates per epoch x accumulation steps, at the
        micro-batch size).

        With `augment`, each image is translated by a random crop of the image
        padded with zeros by ``max(1, round(side / 8))`` pixels (4 for 32x32)
        and, when `horizontal_flip`, mirrored with probability 1/2; the draws
        are keyed by (seed, epoch, batch index) and so reproducible too.

        Args:
            batch_size: global batch size, 1 <= batch_size <= num_train.
            seed: integer >= 0.
            augment: whether to apply the light image augmentation.
            batches_per_epoch: batches per epoch, 1 <= batches_per_epoch <=
                num_train // batch_size; None: num_train // batch_size.

        Returns:
            A function of the epoch index (a Python int or a scalar integer
            tensor, e.g. inside `tf.data`) returning a `tf.data.Dataset` of
            (x float32 (batch_size, *input_shape), y int32 (batch_size,)).
        """
        self._check_batch_size(batch_size, self.num_train)
        check_int("seed", seed, 0)
        full_batches = self.num_train // batch_size
        if batches_per_epoch is None:
            batches_per_epoch = full_batches
        check_int("batches_per_epoch", batches_per_epoch, 1)
        if batches_per_epoch > full_batches:
            raise ValueError(
                f"batches_per_epoch must be at most num_train // batch_size = {full_batches} for "
                f"{self.name!r}; received batches_per_epoch={batches_per_epoch}."
            )
        if augment and not self.is_image:
            raise ValueError(
                f"augment=True needs an image dataset; {self.name!r} has examples of shape "
                f"{self.input_shape}. Use augment=False."
            )
        x_all = tf.convert_to_tensor(self.x_train)
        y_all = tf.convert_to_tensor(self.y_train)
        num_train = self.num_train
        seed_tensor = tf.constant(seed, tf.int64)
        flip = self.horizontal_flip

        def load(epoch, batch_index, ids):
            x = _normalize(tf.gather(x_all, ids))
            if augment:
                key = tf.random.experimental.stateless_fold_in(
                    tf.random.experimental.stateless_fold_in(
                        tf.stack([seed_tensor, epoch]), _AUGMENT_SALT
                    ),
                    batch_index,
                )
                x = _augment_images(x, key, flip)
            return x, tf.gather(y_all, ids)

        def make_epoch(epoch):
            epoch = tf.cast(epoch, tf.int64)
            order = epoch_order(num_train, seed_tensor, epoch)
            batches = (
                tf.data.Dataset.from_tensor_slices(order)
                .batch(batch_size, drop_remainder=True)
                .take(batches_per_epoch)
            )
            return batches.enumerate().map(
                lambda index, ids: load(epoch, index, ids),
                num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True,
            )

        return make_epoch

    def train_batches(
        self,
        batch_size: int,
        seed: int,
        first_epoch: int = 0,
        augment: bool = False,
        batches_per_epoch: int | None = None,
    ) -> tf.data.Dataset:
        """An endless stream of training batches, epoch after epoch from `first_epoch`.

        The batches of `train_epochs` (see there for order, batching and
        augmentation), concatenated; starting at `first_epoch` gives exactly
        what an uninterrupted run saw from there on.

        Args:
            batch_size, seed, augment, batches_per_epoch: as in `train_epochs`.
            first_epoch: index of the first epoch to yield, >= 0.

        Returns:
            A prefetched `tf.data.Dataset` of (x, y) batches.
        """
        check_int("first_epoch", first_epoch, 0)
        make_epoch = self.train_epochs(batch_size, seed, augment, batches_per_epoch)
        dataset = tf.data.Dataset.counter(start=first_epoch).flat_map(make_epoch)
        return dataset.prefetch(tf.data.AUTOTUNE)

    def train_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The training examples in stored order, normalized as in training, unaugmented.

        For measurements on the training set (final training accuracy, Hessian
        sharpness, gradient noise) rather than for training. For large image
        datasets prefer `train_eval_batches`, which normalizes per batch instead
        of holding a float32 copy of every image.

        Returns:
            (x float32 (num_train, *input_shape), y int32 (num_train,)).
        """
        return _normalize(tf.convert_to_tensor(self.x_train)).numpy(), self.y_train

    def val_batches(self, batch_size: int, pad_remainder: bool = False) -> tf.data.Dataset:
        """The validation examples in their stored order, every one of them, once.

        Args:
            batch_size: examples per batch, >= 1.
            pad_remainder: False: the last batch holds the remaining
                ``num_val % batch_size`` examples (if any). True: the last batch
                is padded with zero examples of label 0 to a full batch, and
                each element carries a third tensor, the sample weight (1.0 for
                real examples, 0.0 for padding), for fixed shapes under XLA.

        Returns:
            A `tf.data.Dataset` of (x, y) or (x, y, weight), prefetched.
        """
        return _ordered_batches(self.x_val, self.y_val, batch_size, pad_remainder)

    def train_eval_batches(self, batch_size: int, pad_remainder: bool = False) -> tf.data.Dataset:
        """The training examples in stored order, unaugmented, each once (for evaluation).

        Same arguments and elements as `val_batches`.
        """
        return _ordered_batches(self.x_train, self.y_train, batch_size, pad_remainder)


def _ordered_batches(x, y, batch_size: int, pad_remainder: bool) -> tf.data.Dataset:
    check_int("batch_size", batch_size, 1)
    if pad_remainder:
        padded = -(-len(y) // batch_size) * batch_size
        extra = padded - len(y)
        weight = np.concatenate([np.ones(len(y), "float32"), np.zeros(extra, "float32")])
        x = np.concatenate([x, np.zeros((extra,) + x.shape[1:], x.dtype)])
        y = np.concatenate([y, np.zeros(extra, y.dtype)])
        dataset = tf.data.Dataset.from_tensor_slices((x, y, weight)).batch(batch_size)
        dataset = dataset.map(lambda xb, yb, wb: (_normalize(xb), yb, wb))
    else:
        dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)
        dataset = dataset.map(lambda xb, yb: (_normalize(xb), yb))
    return dataset.prefetch(tf.data.AUTOTUNE)


def _normalize(x):
    """uint8 images -> float32 in [0, 1]; float data is already normalized."""
    if x.dtype == tf.uint8:
        return tf.cast(x, tf.float32) / 255.0
    return tf.cast(x, tf.float32)


def _augment_images(images, key, flip: bool):
    """Random translation (zero-padded crop) and optional flip, per image, stateless."""
    batch, height, width = images.shape[0], images.shape[1], images.shape[2]
    pad = max(1, round(min(height, width) / 8))
    padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
    keys = [tf.random.experimental.stateless_fold_in(key, i) for i in range(3)]
    offset_rows = tf.random.stateless_uniform(
        [batch], keys[0], minval=0, maxval=2 * pad + 1, dtype=tf.int32
    )
    offset_cols = tf.random.stateless_uniform(
        [batch], keys[1], minval=0, maxval=2 * pad + 1, dtype=tf.int32
    )
    rows = offset_rows[:, None] + tf.range(height)[None, :]
    cols = offset_cols[:, None] + tf.range(width)[None, :]
    images = tf.gather(padded, rows, axis=1, batch_dims=1)
    images = tf.gather(images, cols, axis=2, batch_dims=1)
    if flip:
        mirror = tf.random.stateless_uniform([batch], keys[2]) < 0.5
        images = tf.where(mirror[:, None, None, None], tf.reverse(images, axis=[2]), images)
    return images


def load_dataset(
    name: str = "digits",
    *,
    seed: int = 0,
    val_fraction: float = 0.25,
    data_dir: str | None = None,
    image_size: int | None = None,
) -> ClassificationData:
    """Loads a dataset by name (see the module docstring for the names).

    Args:
        name: ``digits``, ``mnist1d``, ``tfds:NAME`` or ``folder:PATH``.
        seed: seed of the train/validation split (digits, TFDS without a
            validation split, folder), integer >= 0.
        val_fraction: fraction of each class held out for validation where
            the split is ours, in (0, 1); the paper's 3:1 is 0.25.
        data_dir: TFDS data directory (None: TFDS' default).
        image_size: side in pixels to resize images to (TFDS, folder). None:
            keep a TFDS dataset's fixed size, else `DEFAULT_IMAGE_SIZE`.

    Returns:
        A `ClassificationData`.

    Raises:
        ValueError: unknown name, bad arguments, or an unusable folder.
        FileNotFoundError: the folder of ``folder:PATH`` does not exist.
    """
    if not isinstance(name, str):
        raise ValueError(f"name must be a string; received name={name!r}.")
    if not isinstance(val_fraction, numbers.Real) or not 0 < val_fraction < 1:
        raise ValueError(
            f"val_fraction must be a number in (0, 1); received val_fraction={val_fraction!r}."
        )
    check_int("seed", seed, 0)
    if image_size is not None:
        check_int("image_size", image_size, 1)
    if name == "digits":
        return _load_digits(seed, val_fraction)
    if name == "mnist1d":
        return _load_mnist1d()
    if name.startswith("tfds:") and len(name) > len("tfds:"):
        return _load_tfds(name, seed, val_fraction, data_dir, image_size)
    if name.startswith("folder:") and len(name) > len("folder:"):
        return _load_folder(name, seed, val_fraction, image_size)
    raise ValueError(
        f"Unknown dataset name={name!r}; valid names are {', '.join(DATASET_NAMES)}, "
        "tfds:NAME (e.g. tfds:cifar10) and folder:PATH."
    )


def _from_split(name, x, y, seed, val_fraction, **fields) -> ClassificationData:
    train, val = stratified_split(y, val_fraction, seed)
    return ClassificationData(
        name=name,
        x_train=x[train],
        y_train=y[train],
        x_val=x[val],
        y_val=y[val],
        validation=(f"stratified {val_fraction:g} of the examples of each class, seed {seed}"),
        **fields,
    )


def _load_digits(seed: int, val_fraction: float) -> ClassificationData:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    y = digits.target.astype("int32")
    return _from_split(
        "digits",
        x,
        y,
        seed,
        val_fraction,
        num_classes=10,
        class_names=tuple(str(c) for c in range(10)),
        is_image=True,
        horizontal_flip=False,
    )


@functools.lru_cache(maxsize=1)
def _mnist1d_arrays() -> tuple[np.ndarray, ...]:
    from mnist1d.data import get_dataset_args, make_dataset

    # make_dataset seeds NumPy's and Python's global generators; restore them.
    numpy_state, python_state = np.random.get_state(), random.getstate()  # noqa: NPY002
    try:
        raw = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(numpy_state)  # noqa: NPY002
        random.setstate(python_state)
    arrays = (
        raw["x"].astype("float32")[..., None],
        raw["y"].astype("int32"),
        raw["x_test"].astype("float32")[..., None],
        raw["y_test"].astype("int32"),
    )
    for array in arrays:
        array.flags.writeable = False
    return arrays


def _load_mnist1d() -> ClassificationData:
    x_train, y_train, x_val, y_val = _mnist1d_arrays()
    return ClassificationData(
        name="mnist1d",
        x_train=x_train,
        y_train=y_train,
        x_val=x_val,
        y_val=y_val,
        num_classes=10,
        class_names=tuple(str(c) for c in range(10)),
        validation="the mnist1d package's own test split (1,000 examples)",
        is_image=False,
        horizontal_flip=False,
    )


def _resize_uint8(image, size: tuple[int, int] | None):
    if size is not None and tuple(image.shape[:2]) != size:
        image = tf.image.resize(image, size, method="bilinear", antialias=True)
        image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
    return image


def _images_to_numpy(dataset: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Collects a dataset of (uint8 image, label) of fixed image shape into arrays."""
    images, labels = [], []
    for image_batch, label_batch in dataset.batch(256).as_numpy_iterator():
        images.append(image_batch)
        labels.append(label_batch)
    return np.concatenate(images), np.concatenate(labels).astype("int32")


def _tfds_split_names(builder) -> set[str]:
    """Split names of a prepared TFDS builder (empty when TFDS does not know them)."""
    return set(builder.info.splits.keys())


def _load_tfds(
    name: str, seed: int, val_fraction: float, data_dir: str | None, image_size: int | None
) -> ClassificationData:
    import tensorflow_datasets as tfds

    tfds_name = name[len("tfds:") :]
    builder = tfds.builder(tfds_name, data_dir=data_dir)
    features = builder.info.features
    if "image" not in features or "label" not in features:
        raise ValueError(
            f"dataset {name!r} needs 'image' and 'label' features for image classification; "
            f"it has {sorted(features.keys())}."
        )
    builder.download_and_prepare()
    native_shape = tuple(features["image"].shape)
    if image_size is None and None not in native_shape[:2]:
        size = None
        image_shape = native_shape
    else:
        side = DEFAULT_IMAGE_SIZE if image_size is None else image_size
        size = (side, side)
        image_shape = (side, side, native_shape[2])
    label_feature = features["label"]

    def read(split):
        dataset = builder.as_dataset(split=split, as_supervised=False, shuffle_files=False)
        dataset = dataset.map(
            lambda example: (
                tf.ensure_shape(_resize_uint8(example["image"], size), image_shape),
                example["label"],
            ),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        return _images_to_numpy(dataset)

    fields = dict(
        num_classes=int(label_feature.num_classes),
        class_names=tuple(label_feature.names),
        is_image=True,
        horizontal_flip=tfds_name.split("/")[0] not in NO_FLIP_TFDS_NAMES,
    )
    split_names = _tfds_split_names(builder)
    if "validation" in split_names:
        x_train, y_train = read("train")
        x_val, y_val = read("validation")
        return ClassificationData(
            name=name,
            x_train=x_train,
            y_train=y_train,
            x_val=x_val,
            y_val=y_val,
            validation="the dataset's own 'validation' split",
            **fields,
        )
    x, y = read("train")
    return _from_split(name, x, y, seed, val_fraction, **fields)


def _list_image_folder(root: str) -> tuple[list[str], list[int], tuple[str, ...]]:
    if not os.path.isdir(root):
        raise FileNotFoundError(f"Image folder {root!r} does not exist or is not a directory.")
    class_names = tuple(sorted(entry.name for entry in os.scandir(root) if entry.is_dir()))
    if not class_names:
        raise ValueError(
            f"Image folder {root!r} has no class subfolders; expected one subfolder of "
            "images per class (PATH/CLASS_NAME/IMAGE.jpg)."
        )
    paths, labels = [], []
    for label, class_name in enumerate(class_names):
        class_dir = os.path.join(root, class_name)
        files = sorted(
            f
            for f in os.listdir(class_dir)
            if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(class_dir, f))
        )
        if not files:
            raise ValueError(
                f"Class folder {class_dir!r} has no images (looked for files ending in "
                f"{', '.join(IMAGE_EXTENSIONS)})."
            )
        paths.extend(os.path.join(class_dir, f) for f in files)
        labels.extend([label] * len(files))
    return paths, labels, class_names


def _load_folder(
    name: str, seed: int, val_fraction: float, image_size: int | None
) -> ClassificationData:
    root = os.path.expanduser(name[len("folder:") :])
    paths, labels, class_names = _list_image_folder(root)
    side = DEFAULT_IMAGE_SIZE if image_size is None else image_size

    def decode(path, label):
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        image = _resize_uint8(tf.ensure_shape(image, (None, None, 3)), (side, side))
        return tf.ensure_shape(tf.cast(image, tf.uint8), (side, side, 3)), label

    dataset = tf.data.Dataset.from_tensor_slices((paths, labels)).map(
        decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
    try:
        x, y = _images_to_numpy(dataset)
    except tf.errors.InvalidArgumentError as error:
        raise ValueError(f"Could not decode an image under {root!r}: {error.message}") from None
    return _from_split(
        name,
        x,
        y,
        seed,
        val_fraction,
        num_classes=len(class_names),
        class_names=class_names,
        is_image=True,
        horizontal_flip=True,
    )
