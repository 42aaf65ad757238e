"""Datasets by name: digits, mnist1d, tfds:NAME and folder:PATH.

`load_dataset(name)` loads a classification dataset into memory and returns a
frozen `noisy_keras.data.ClassificationData`, whose methods make the `tf.data`
pipelines. Names:

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

Images are held in memory (Caltech101 at 224x224: about 1.4 GB as uint8)
unless `streaming` says otherwise: ``true``, or ``auto`` for a dataset whose
decoded images exceed `noisy_keras.streaming.IN_MEMORY_LIMIT_BYTES` (2 GiB),
or the ``resnet`` preprocessing, give a `noisy_keras.streaming.StreamedImageData`
that reads and decodes the files every epoch (its docstring has the rules for
epoch order and validation split). Either way the epoch order is a pure
function of (seed, epoch).
"""

from __future__ import annotations

import functools
import math
import numbers
import os
import random

import numpy as np
import tensorflow as tf

from noisy_keras import config, streaming
from noisy_keras._validation import check_int
from noisy_keras.data import ClassificationData, stratified_split
from noisy_keras.preprocessing import resize_uint8

DEFAULT_IMAGE_SIZE = 224
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
# TFDS datasets whose classes change under a horizontal flip (digits, letters).
NO_FLIP_TFDS_NAMES = ("mnist", "emnist", "kmnist", "binarized_mnist", "svhn_cropped")


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
        preprocess: "resize" or "resnet" (`noisy_keras.preprocessing`);
            "resnet" streams.

    Returns:
        A `ClassificationData`, or a `noisy_keras.streaming.StreamedImageData`.

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
        ("streaming", streaming, config.STREAMING_CHOICES),
        ("preprocess", preprocess, config.PREPROCESSING_NAMES),
    ):
        if value not in allowed:
            raise ValueError(f"{argument} must be one of {allowed}; received {argument}={value!r}.")
    is_files = name.startswith(config.DATASET_PREFIXES)
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
        return _load_tfds(name, seed, val_fraction, data_dir, image_size, **options)
    if name.startswith("folder:") and len(name) > len("folder:"):
        return _load_folder(name, seed, val_fraction, image_size, **options)
    raise ValueError(
        f"Unknown dataset name={name!r}; valid names are {', '.join(config.DATASET_NAMES)}, "
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


def _streams(mode: str, preprocess: str, num_images: int | None, image_shape) -> bool:
    """Whether to stream: asked for, "resnet" preprocessing, or "auto" over the memory limit.

    "auto" holds a dataset of unknown size (TFDS without split sizes) in memory.
    """
    if mode == "true" or preprocess == "resnet":
        return True
    if mode == "false" or num_images is None:
        return False
    return streaming.decoded_bytes(num_images, image_shape) > streaming.IN_MEMORY_LIMIT_BYTES


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


def _tfds_split_size(builder, split: str) -> int | None:
    """Examples in `split` of a prepared TFDS builder (None when TFDS does not know)."""
    try:
        return int(builder.info.splits[split].num_examples)
    except KeyError:
        return None


TFDS_PROBE_ADDRESS: tuple[str, int] | None = None
"""(host, port) reached to tell that downloads are impossible; None: the dataset's own host."""


def _probe_address(builder) -> tuple[str, int]:
    """The host TFDS downloads `builder`'s first file from (its registered checksums)."""
    import urllib.parse

    urls = sorted(type(builder).url_infos or {})  # also loads the builder's checksums file
    if TFDS_PROBE_ADDRESS is not None:
        return TFDS_PROBE_ADDRESS
    parsed = urllib.parse.urlparse(urls[0] if urls else "https://storage.googleapis.com")
    return parsed.hostname, parsed.port or (80 if parsed.scheme == "http" else 443)


def _network_error(address: tuple[str, int], timeout_s: float = 5.0) -> str | None:
    """Why `address` cannot be reached, or None (also None behind a proxy)."""
    import socket
    import urllib.request

    if urllib.request.getproxies():
        return None  # a proxy decides; a direct connection says nothing
    try:
        socket.create_connection(address, timeout=timeout_s).close()
    except OSError as error:
        return f"connecting to {address[0]}:{address[1]} failed: {error}"
    return None


def _downloads_from_the_network(builder) -> bool:
    """Whether preparing `builder` means TFDS' own downloader fetching files.

    True for TFDS' catalogue datasets with TFDS' own `download_and_prepare`;
    False for manual-download datasets (read from `manual_dir`), builders
    defined elsewhere, and a replaced `download_and_prepare` (as
    `tfds.testing.mock_data` does).
    """
    cls = type(builder)
    prepare_module = getattr(cls.download_and_prepare, "__module__", "")
    return (
        cls.__module__.startswith("tensorflow_datasets.")
        and prepare_module == "tensorflow_datasets.core.dataset_builder"
        and not getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
    )


def _download_and_prepare(builder, name: str, data_dir: str | None) -> None:
    """`builder.download_and_prepare()`, failing within seconds when it cannot download.

    TFDS retries a failed download 10 times with backoff (about 3.5 minutes),
    and has no public option to bound that; so a catalogue dataset that is not
    prepared in `data_dir` is only downloaded after a quick connection test
    (`_downloads_from_the_network`), and a download that still fails for lack
    of network is reported as such. The test connects to the host of the
    dataset's first file (or `TFDS_PROBE_ADDRESS`), and is skipped behind a proxy.

    Raises:
        ConnectionError: the dataset is not prepared and cannot be downloaded.
    """
    where = f"data_dir={data_dir!r}" if data_dir else "TFDS' default data_dir"

    def refuse(reason: str) -> ConnectionError:
        return ConnectionError(
            f"dataset {name!r} is not prepared in {where} ({builder.data_dir}) and cannot be "
            f"downloaded: no network ({reason}). Prepare it on a machine with network access "
            "(tfds.builder(NAME, data_dir=DIR).download_and_prepare()) and pass --data_dir=DIR."
        )

    if _downloads_from_the_network(builder) and not builder.is_prepared():
        reason = _network_error(_probe_address(builder))
        if reason is not None:
            raise refuse(reason)
    try:
        builder.download_and_prepare()
    except OSError as error:  # requests' ConnectionError is an OSError
        if builder.is_prepared():
            raise
        raise refuse(f"{type(error).__name__}: {str(error).splitlines()[0][:200]}") from error


def _load_tfds(
    name: str,
    seed: int,
    val_fraction: float,
    data_dir: str | None,
    image_size: int | None,
    mode: str,
    preprocess: str,
):
    import tensorflow_datasets as tfds

    tfds_name = name[len("tfds:") :]
    builder = tfds.builder(tfds_name, data_dir=data_dir)
    features = builder.info.features
    if "image" not in features or "label" not in features:
        raise ValueError(
            f"dataset {name!r} needs 'image' and 'label' features for image classification; "
            f"it has {sorted(features.keys())}."
        )
    _download_and_prepare(builder, name, data_dir)
    native_shape = tuple(features["image"].shape)
    if image_size is None and None not in native_shape[:2] and preprocess == "resize":
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
                tf.ensure_shape(resize_uint8(example["image"], size), image_shape),
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
    sizes = [_tfds_split_size(builder, s) for s in ("train", "validation") if s in split_names]
    num_images = sum(sizes) if sizes and None not in sizes else None
    if _streams(mode, preprocess, num_images, image_shape):
        return _stream_tfds(
            name, builder, split_names, val_fraction, image_shape, preprocess, fields
        )
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


def _stream_tfds(name, builder, split_names, val_fraction, image_shape, preprocess, fields):
    """A `StreamedImageData` of a prepared TFDS dataset (split rule: `noisy_keras.streaming`)."""
    total = _tfds_split_size(builder, "train") if "train" in split_names else None
    num_val = _tfds_split_size(builder, "validation") if "validation" in split_names else 0
    if total is None or num_val is None:
        raise ValueError(
            f"TFDS reports no size for the 'train' (or 'validation') split of {name!r} (known "
            f"splits: {sorted(split_names)}); streaming needs it. Prepare the dataset with TFDS, "
            "or use streaming='false'."
        )
    if "validation" in split_names:
        source = streaming.TfdsSplits(builder, "train", "validation", total, num_val)
        validation = "the dataset's own 'validation' split"
    else:
        num_val = min(max(int(math.floor(val_fraction * total + 0.5)), 1), total - 1)
        num_train = total - num_val
        source = streaming.TfdsSplits(
            builder, f"train[:{num_train}]", f"train[{num_train}:]", num_train, num_val
        )
        validation = (
            f"the last {num_val} examples ({val_fraction:g} of {total}) of its 'train' split in "
            "TFDS' stored order; not stratified, the same for every seed"
        )
    return streaming.StreamedImageData(
        name=name,
        source=source,
        num_classes=fields["num_classes"],
        class_names=fields["class_names"],
        validation=validation,
        horizontal_flip=fields["horizontal_flip"],
        image_size=int(image_shape[0]),
        channels=int(image_shape[2] or 3),
        preprocess=preprocess,
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
    if _streams(mode, preprocess, len(paths), (side, side, 3)):
        split = stratified_split(np.asarray(labels), val_fraction, seed)
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


def _stream_folder(name, paths, labels, class_names, split, val_fraction, seed, side, preprocess):
    """A `StreamedImageData` of listed files, split like the in-memory folder (same seed rule)."""
    paths, labels = np.asarray(paths), np.asarray(labels, np.int32)
    train, val = split
    return streaming.StreamedImageData(
        name=name,
        source=streaming.FolderFiles(paths[train], labels[train], paths[val], labels[val]),
        num_classes=len(class_names),
        class_names=class_names,
        validation=f"stratified {val_fraction:g} of the examples of each class, seed {seed}",
        horizontal_flip=True,
        image_size=side,
        channels=3,
        preprocess=preprocess,
    )
