"""Streamed image datasets: files read and decoded every epoch, never held in memory.

`noisy_keras.data.datasets.load_dataset` returns a `StreamedImageData` for a
``folder:PATH`` or ``tfds:NAME`` dataset when `streaming` is "true", when the
ResNet preprocessing is asked for, or ("auto") when its decoded training and
validation images would exceed `IN_MEMORY_LIMIT_BYTES`; smaller sets are held
in memory (`noisy_keras.data.pipeline.ClassificationData`). Both have the same methods,
so the main job, `noisy_keras.engine.fit.fit` and the analysis tools take either.

What a pipeline holds: for a folder, the list of file paths and labels (the
elements are file paths until the map that reads and decodes them, in
parallel, `AUTOTUNE`, deterministic order); for TFDS, its reader's file list
and a shuffle buffer of encoded images. Decoded images exist only per batch.

Where the encoded images come from, and in which order each epoch reads them
(a function of (seed, epoch)), is `noisy_keras.data.sources`.

Validation split: a folder's is stratified from `seed`, as in memory. A TFDS
dataset's own ``validation`` split is used when it has one; otherwise, since
labels cannot be read without reading the whole set, the last
round(val_fraction x N) examples of its ``train`` split in TFDS' stored order
(TFDS shuffles examples when it prepares a dataset) are held out by split
slicing: ``train[:N - v]`` / ``train[N - v:]``, the same for every seed.

Per-worker input (see `noisy_keras.data.shards`): a folder pipeline reads
only its replicas' slices of every global batch; a TFDS pipeline reads every
n-th record file (TFDS' `input_context` sharding) and, if its files hold fewer
examples than its share of the epoch, starts over on them.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from noisy_keras._validation import check_int
from noisy_keras.data.epochs import check_batches_per_epoch, epoch_stream
from noisy_keras.data.preprocessing import (
    decode_image,
    normalize,
    resize_uint8,
    resnet_eval_image,
    resnet_train_image,
    translate_and_flip,
)
from noisy_keras.data.shards import (
    InputShard,
    ShardedEpochs,
    batch_key,
    example_key,
)
from noisy_keras.data.sources import FolderFiles, TfdsSplits

IN_MEMORY_LIMIT_BYTES = 2 * 2**30
"""With streaming="auto", datasets whose decoded uint8 images exceed this are streamed."""

__all__ = ["IN_MEMORY_LIMIT_BYTES", "StreamedImageData", "decoded_bytes", "should_stream"]


def decoded_bytes(num_images: int, image_shape: tuple[int, ...]) -> int:
    """Bytes of `num_images` uint8 images of `image_shape`: what holding them in memory takes."""
    return int(num_images) * int(np.prod(image_shape))


@dataclasses.dataclass(frozen=True, eq=False)
class StreamedImageData:
    """An image classification dataset read from files every epoch (see the module docstring).

    The same methods as `noisy_keras.data.pipeline.ClassificationData`, except that
    `train_arrays` is refused (use `train_eval_batches` or `train_sample`).

    Attributes:
        name: the name it was loaded by.
        source: a `FolderFiles` or `TfdsSplits`.
        num_classes: number of classes.
        class_names: one name per class index.
        validation: how the validation split was formed, in words.
        horizontal_flip: whether augmentation may mirror images.
        image_size: side of the square images the model sees.
        channels: 3 (RGB) or 1.
        preprocess: "resize" or "resnet" (`noisy_keras.data.preprocessing`).
    """

    name: str
    source: FolderFiles | TfdsSplits
    num_classes: int
    class_names: tuple[str, ...]
    validation: str
    horizontal_flip: bool
    image_size: int
    channels: int
    preprocess: str

    is_image = True

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.image_size, self.image_size, self.channels)

    @property
    def num_train(self) -> int:
        return int(self.source.num_train)

    @property
    def num_val(self) -> int:
        return int(self.source.num_val)

    def steps_per_epoch(self, batch_size: int) -> int:
        """Full batches per epoch: num_train // batch_size."""
        self._check_batch_size(batch_size)
        return self.num_train // batch_size

    def _check_batch_size(self, batch_size: int) -> None:
        check_int("batch_size", batch_size, 1)
        if batch_size > self.num_train:
            raise ValueError(
                f"batch_size must be at most the number of training examples ({self.num_train}) "
                f"of {self.name!r}; received batch_size={batch_size}."
            )

    def _loader(self, training: bool):
        """fn(encoded image, key) -> one image: uint8 for "resize", float32 for "resnet"."""
        size, channels, flip = self.image_size, self.channels, self.horizontal_flip
        if self.preprocess == "resnet":
            if training:
                return lambda contents, key: resnet_train_image(contents, key, size, channels, flip)
            return lambda contents, key: resnet_eval_image(contents, size, channels)

        def resized(contents, key):
            image = resize_uint8(decode_image(contents, channels), (size, size))
            return tf.ensure_shape(image, (size, size, channels))

        return resized

    def train_epochs(
        self,
        batch_size: int,
        seed: int,
        augment: bool = False,
        batches_per_epoch: int | None = None,
    ) -> ShardedEpochs:
        """A `ShardedEpochs`: epoch -> that epoch's training batches (see the module docstring).

        Each example is read, decoded and preprocessed in its own map call
        (parallel, deterministic order); "resnet" draws its crop and flip from
        `example_key(seed, epoch, position)`; "resize" with `augment` applies
        `translate_and_flip` per global batch with `batch_key(seed, epoch,
        step)`, as in memory.

        Args:
            batch_size: global (step) batch, 1 <= batch_size <= num_train.
            seed: integer >= 0.
            augment: the translation and flip of "resize" preprocessing.
            batches_per_epoch: steps per epoch (None: num_train // batch_size).

        Returns:
            A `ShardedEpochs` of (x float32 (batch, *input_shape), y int32 (batch,)).
        """
        self._check_batch_size(batch_size)
        check_int("seed", seed, 0)
        batches = check_batches_per_epoch(self.name, self.num_train, batch_size, batches_per_epoch)
        if augment and self.preprocess == "resnet":
            raise ValueError(
                "augment=True adds the translation of preprocess='resize'; preprocess='resnet' "
                "has its own random-resized crop and flip. Use augment=False."
            )
        load = self._loader(training=True)
        source, flip, resize = self.source, self.horizontal_flip, self.preprocess == "resize"

        def make_epoch(shard: InputShard, epoch):
            per_replica = batch_size // shard.num_replicas
            examples = source.train_examples(shard, epoch, seed, batch_size, batches)
            images = examples.map(
                lambda contents, label, position: (
                    load(contents, example_key(seed, epoch, position)),
                    label,
                ),
                num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True,
            ).batch(per_replica, drop_remainder=True)
            if not resize:
                return images

            def finish(index, batch):
                x = normalize(batch[0])
                if augment:
                    step, local = index // shard.local_replicas, index % shard.local_replicas
                    first = (shard.first_replica + local) * per_replica
                    x = translate_and_flip(x, batch_key(seed, epoch, step), flip, first, batch_size)
                return x, batch[1]

            return images.enumerate().map(finish)

        return ShardedEpochs(
            make_epoch,
            batch_size=batch_size,
            batches_per_epoch=batches,
            python_epochs=source.python_epochs,
        )

    def train_batches(
        self,
        batch_size: int,
        seed: int,
        first_epoch: int = 0,
        augment: bool = False,
        batches_per_epoch: int | None = None,
        epochs: int | None = None,
    ) -> tf.data.Dataset:
        """The batches of `train_epochs` from `first_epoch` to `epochs` (None: endless; folders)."""
        make_epoch = self.train_epochs(batch_size, seed, augment, batches_per_epoch)
        return epoch_stream(make_epoch, first_epoch=first_epoch, epochs=epochs)

    def _eval_batches(self, split: str, batch_size: int, pad_remainder: bool, count=None):
        check_int("batch_size", batch_size, 1)
        load = self._loader(training=False)
        examples = self.source.ordered_examples(split)
        if count is None:
            count = self.num_train if split == "train" else self.num_val
        else:
            examples = examples.take(count)
        images = examples.map(
            lambda contents, label: (load(contents, None), label),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        if pad_remainder:
            extra = -(-count // batch_size) * batch_size - count
            zero_image = tf.zeros(self.input_shape, images.element_spec[0].dtype)
            padding = tf.data.Dataset.from_tensors((zero_image, tf.constant(0, tf.int32), 0.0))
            images = images.map(lambda x, y: (x, y, 1.0)).concatenate(padding.repeat(extra))
            batches = images.batch(batch_size).map(lambda x, y, w: (normalize(x), y, w))
        else:
            batches = images.batch(batch_size).map(lambda x, y: (normalize(x), y))
        return batches.prefetch(tf.data.AUTOTUNE)

    def val_batches(self, batch_size: int, pad_remainder: bool = False) -> tf.data.Dataset:
        """The validation images in stored order, evaluation preprocessing, each once.

        Same elements as `ClassificationData.val_batches`.
        """
        return self._eval_batches("val", batch_size, pad_remainder)

    def train_eval_batches(self, batch_size: int, pad_remainder: bool = False) -> tf.data.Dataset:
        """The training images in stored order, evaluation preprocessing, each once."""
        return self._eval_batches("train", batch_size, pad_remainder)

    def train_arrays(self):
        """Refused: a streamed dataset is never held in memory.

        Raises:
            ValueError: always, naming what to use instead.
        """
        gigabytes = decoded_bytes(self.num_train, self.input_shape) * 4 / 1e9
        raise ValueError(
            f"{self.name!r} is streamed from disk and never held in memory ({self.num_train} "
            f"training images of shape {self.input_shape}, {gigabytes:.1f} GB as float32). Use "
            "train_eval_batches(batch_size), a tf.data.Dataset that the analysis tools take, or "
            "train_sample(count) for arrays of the first count training images."
        )

    def train_sample(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """The first `count` training images in stored order, evaluation preprocessing, as arrays.

        Returns:
            (x float32 (n, *input_shape), y int32 (n,)), n = min(count, num_train).
        """
        check_int("count", count, 1)
        count = min(count, self.num_train)
        xs, ys = zip(*self._eval_batches("train", 256, False, count).as_numpy_iterator())
        return np.concatenate(xs), np.concatenate(ys)


def should_stream(mode: str, preprocess: str, num_images: int | None, image_shape) -> bool:
    """Whether to stream: asked for, "resnet" preprocessing, or "auto" over the memory limit.

    "auto" holds a dataset of unknown size (TFDS without split sizes) in memory.
    """
    if mode == "true" or preprocess == "resnet":
        return True
    if mode == "false" or num_images is None:
        return False
    return decoded_bytes(num_images, image_shape) > IN_MEMORY_LIMIT_BYTES
