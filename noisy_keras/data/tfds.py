"""TFDS datasets (`tfds:NAME`): prepared by TFDS, held in memory or streamed.

`load_tfds` is what `noisy_keras.data.datasets.load_dataset` calls for a
``tfds:NAME`` (see its docstring for the names and the split rules). TFDS is
imported only here, on first use. Preparing a dataset that is not in
`data_dir` yet downloads it; with no network, that fails at once with a
message saying so (the download host is probed with a short timeout before
TFDS retries for minutes).
"""

from __future__ import annotations

import math

import tensorflow as tf

from noisy_keras.data import pipeline as data
from noisy_keras.data import sources, streaming
from noisy_keras.data.preprocessing import DEFAULT_IMAGE_SIZE, resize_uint8

# TFDS datasets whose classes change under a horizontal flip (digits, letters).
NO_FLIP_TFDS_NAMES = ("mnist", "emnist", "kmnist", "binarized_mnist", "svhn_cropped")


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

    A dataset TFDS cannot download (ImageNet: `MANUAL_DOWNLOAD_INSTRUCTIONS`)
    whose files are not in TFDS' manual directory is refused with TFDS' own
    instructions, in one line.

    Raises:
        ConnectionError: the dataset is not prepared and cannot be downloaded.
        FileNotFoundError: the dataset is not prepared and needs a manual download.
    """
    where = f"data_dir={data_dir!r}" if data_dir else "TFDS' default data_dir"
    manual = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)

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
    except AssertionError as error:  # TFDS asserts that the manual directory has the files
        if not manual or builder.is_prepared():
            raise
        tfds_says = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
        raise FileNotFoundError(
            f"dataset {name!r} is not prepared in {where} ({builder.data_dir}) and needs a "
            f"manual download; TFDS says: {tfds_says}"
        ) from error
    except OSError as error:  # requests' ConnectionError is an OSError
        if builder.is_prepared():
            raise
        raise refuse(f"{type(error).__name__}: {str(error).splitlines()[0][:200]}") from error


def load_tfds(
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
        return data.images_to_numpy(dataset)

    fields = dict(
        num_classes=int(label_feature.num_classes),
        class_names=tuple(label_feature.names),
        is_image=True,
        horizontal_flip=tfds_name.split("/")[0] not in NO_FLIP_TFDS_NAMES,
    )
    split_names = _tfds_split_names(builder)
    sizes = [_tfds_split_size(builder, s) for s in ("train", "validation") if s in split_names]
    num_images = sum(sizes) if sizes and None not in sizes else None
    if streaming.should_stream(mode, preprocess, num_images, image_shape):
        return _stream_tfds(
            name, builder, split_names, val_fraction, image_shape, preprocess, fields
        )
    if "validation" in split_names:
        x_train, y_train = read("train")
        x_val, y_val = read("validation")
        return data.ClassificationData(
            name=name,
            x_train=x_train,
            y_train=y_train,
            x_val=x_val,
            y_val=y_val,
            validation="the dataset's own 'validation' split",
            **fields,
        )
    x, y = read("train")
    return data.from_split(name, x, y, seed, val_fraction, **fields)


def _stream_tfds(name, builder, split_names, val_fraction, image_shape, preprocess, fields):
    """A `StreamedImageData` of a prepared TFDS dataset (split rule: `data.streaming`)."""
    total = _tfds_split_size(builder, "train") if "train" in split_names else None
    num_val = _tfds_split_size(builder, "validation") if "validation" in split_names else 0
    if total is None or num_val is None:
        raise ValueError(
            f"TFDS reports no size for the 'train' (or 'validation') split of {name!r} (known "
            f"splits: {sorted(split_names)}); streaming needs it. Prepare the dataset with TFDS, "
            "or use streaming='false'."
        )
    if "validation" in split_names:
        source = sources.TfdsSplits(builder, "train", "validation", total, num_val)
        validation = "the dataset's own 'validation' split"
    else:
        num_val = min(max(int(math.floor(val_fraction * total + 0.5)), 1), total - 1)
        num_train = total - num_val
        source = sources.TfdsSplits(
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
