"""Datasets by name: digits, mnist1d, tfds:NAME and folder:PATH.

`load_dataset(name)` loads a classification dataset into memory and returns a
frozen `noisy_keras.data.pipeline.ClassificationData`, whose methods make the `tf.data`
pipelines. Names:

* ``digits`` (default): the UCI handwritten digits (1,797 real 8x8 scans; the
  copy scikit-learn ships, here shipped inside the package as
  ``noisy_keras/_data/digits.npz``, CC BY 4.0, see the README there), as 8x8x1
  images, split stratified 3:1 into train/validation from `seed` like the paper.
* ``mnist1d``: MNIST-1D (Greydanus 2020), generated procedurally by the
  `mnist1d` package (the ``[study]`` extra) with its published settings (no
  download): 4,000 train and
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

Images are held in memory (Caltech101 at 224x224: about 1.4 GB as uint8)
unless `streaming` says otherwise: ``true``, or ``auto`` for a dataset whose
decoded images exceed `noisy_keras.data.streaming.IN_MEMORY_LIMIT_BYTES` (2 GiB),
or the ``resnet`` preprocessing, give a `noisy_keras.data.streaming.StreamedImageData`
that reads and decodes the files every epoch (its docstring has the rules for
epoch order and validation split). Either way the epoch order is a pure
function of (seed, epoch).
"""

from __future__ import annotations

import functools
import importlib.resources
import numbers
import os
import random

import numpy as np
import tensorflow as tf

from noisy_keras import _extras
from noisy_keras._validation import check_int
from noisy_keras.data import pipeline as data
from noisy_keras.data import registry, sources, streaming
from noisy_keras.data import tfds as tfds_data
from noisy_keras.data.pipeline import ClassificationData
from noisy_keras.data.preprocessing import DEFAULT_IMAGE_SIZE, resize_uint8

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


def load_dataset(
    name: str = "digits",
    *,
    seed: int = 0,
    val_fraction: float = 0.25,
    data_dir: str | None = None,
    image_size: int | None = None,
    streaming: str = "auto",
    preprocess: str = "resize",
) -> ClassificationData | streaming.StreamedImageData:
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
        streaming: "auto", "true" or "false" (tfds and folder datasets; see the
            module docstring).
        preprocess: "resize" or "resnet" (`noisy_keras.data.preprocessing`);
            "resnet" streams.

    Returns:
        A `ClassificationData`, or a `noisy_keras.data.streaming.StreamedImageData`.

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
    for argument, value, allowed in (
        ("streaming", streaming, registry.STREAMING_CHOICES),
        ("preprocess", preprocess, registry.PREPROCESSING_NAMES),
    ):
        if value not in allowed:
            raise ValueError(f"{argument} must be one of {allowed}; received {argument}={value!r}.")
    is_files = name.startswith(registry.DATASET_PREFIXES)
    if (streaming == "true" or preprocess == "resnet") and not is_files:
        raise ValueError(
            f"streaming={streaming!r} with preprocess={preprocess!r} needs a tfds:NAME or "
            f"folder:PATH dataset; {name!r} is held in memory."
        )
    if preprocess == "resnet" and streaming == "false":
        raise ValueError(
            "preprocess='resnet' crops every decoded image and needs streaming='auto' or 'true'; "
            "received streaming='false'."
        )
    options = {"mode": streaming, "preprocess": preprocess}
    if name == "digits":
        return _load_digits(seed, val_fraction)
    if name == "mnist1d":
        return _load_mnist1d()
    if name.startswith("tfds:") and len(name) > len("tfds:"):
        return tfds_data.load_tfds(name, seed, val_fraction, data_dir, image_size, **options)
    if name.startswith("folder:") and len(name) > len("folder:"):
        return _load_folder(name, seed, val_fraction, image_size, **options)
    raise ValueError(
        f"Unknown dataset name={name!r}; valid names are {', '.join(registry.DATASET_NAMES)}, "
        "tfds:NAME (e.g. tfds:cifar10) and folder:PATH."
    )


DIGITS_FILE = "digits.npz"
"""The digits in `noisy_keras/_data`: `images` uint8 (1797, 8, 8) in 0..16, `target` uint8."""


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The shipped digits, in their original order: images (1797, 8, 8) and labels, uint8."""
    resource = importlib.resources.files("noisy_keras").joinpath("_data", DIGITS_FILE)
    with resource.open("rb") as file, np.load(file) as arrays:
        return arrays["images"], arrays["target"]


def _load_digits(seed: int, val_fraction: float) -> ClassificationData:
    images, target = digits_arrays()
    x = (images / 16.0).astype("float32")[..., None]
    y = target.astype("int32")
    return data.from_split(
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
    mnist1d_data = _extras.require("mnist1d.data", "dataset='mnist1d'")
    get_dataset_args, make_dataset = mnist1d_data.get_dataset_args, mnist1d_data.make_dataset

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
    name: str,
    seed: int,
    val_fraction: float,
    image_size: int | None,
    mode: str,
    preprocess: str,
):
    root = os.path.expanduser(name[len("folder:") :])
    paths, labels, class_names = _list_image_folder(root)
    side = DEFAULT_IMAGE_SIZE if image_size is None else image_size
    if streaming.should_stream(mode, preprocess, len(paths), (side, side, 3)):
        split = data.stratified_split(np.asarray(labels), val_fraction, seed)
        return _stream_folder(
            name, paths, labels, class_names, split, val_fraction, seed, side, preprocess
        )

    def decode(path, label):
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        image = resize_uint8(tf.ensure_shape(image, (None, None, 3)), (side, side))
        return tf.ensure_shape(tf.cast(image, tf.uint8), (side, side, 3)), label

    dataset = tf.data.Dataset.from_tensor_slices((paths, labels)).map(
        decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
    try:
        x, y = data.images_to_numpy(dataset)
    except tf.errors.InvalidArgumentError as error:
        raise ValueError(f"Could not decode an image under {root!r}: {error.message}") from None
    return data.from_split(
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


def _stream_folder(name, paths, labels, class_names, split, val_fraction, seed, side, preprocess):
    """A `StreamedImageData` of listed files, split like the in-memory folder (same seed rule)."""
    paths, labels = np.asarray(paths), np.asarray(labels, np.int32)
    train, val = split
    return streaming.StreamedImageData(
        name=name,
        source=sources.FolderFiles(paths[train], labels[train], paths[val], labels[val]),
        num_classes=len(class_names),
        class_names=class_names,
        validation=f"stratified {val_fraction:g} of the examples of each class, seed {seed}",
        horizontal_flip=True,
        image_size=side,
        channels=3,
        preprocess=preprocess,
    )
