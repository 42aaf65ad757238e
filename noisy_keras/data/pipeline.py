"""Training data as deterministic `tf.data` pipelines: the split and `ClassificationData`.

A `ClassificationData` (made by `noisy_keras.data.datasets.load_dataset`) holds a
dataset split into training and validation; its `train_epochs` and
`val_batches` make the `tf.data` pipelines. The epoch order is a pure function
of (seed, epoch) (`noisy_keras.data.epochs`), so a run resumed at epoch e sees
exactly the batches an uninterrupted run saw.

Per-replica input: `train_epochs` returns a `ShardedEpochs`, which
`noisy_keras.engine.fit.fit` hands to `strategy.distribute_datasets_from_function`
when there are several replicas: each input pipeline (one per worker) reads
only its replicas' slices of every global batch (`shard_positions`), so the
global batch, and the training, is the same whatever the number of workers.

Normalization: images stored as uint8 are divided by 255 per batch; float data
is taken as already normalized.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import numpy as np
import tensorflow as tf

from noisy_keras._validation import check_int
from noisy_keras.data.epochs import (
    check_batches_per_epoch,
    epoch_order,
    epoch_stream,
)
from noisy_keras.data.preprocessing import normalize as _normalize
from noisy_keras.data.preprocessing import translate_and_flip
from noisy_keras.data.shards import InputShard, ShardedEpochs, batch_key, shard_positions


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
    ) -> ShardedEpochs:
        """A function `epoch -> tf.data.Dataset` of that epoch's training batches (`ShardedEpochs`).

        Epoch e visits the training examples in the order
        `epoch_permutation(num_train, seed, e)`, cut into ``num_train //
        batch_size`` full batches (the last ``num_train % batch_size`` examples
        of that order are left out of that epoch, a different few each epoch):
        static shapes for XLA and a fixed batch size for the gradient noise.
        Nothing depends on earlier epochs, so a run resumed at epoch e sees
        exactly the batches an uninterrupted run saw; this is the form
        `noisy_keras.engine.fit.fit` takes as `train_data`. `batches_per_epoch`
        keeps only the first that many batches of each epoch (e.g. with
        gradient accumulation: updates per epoch x accumulation steps, at the
        micro-batch size).

        With `augment`, each image is translated by a random crop of the image
        padded with zeros by ``max(1, round(side / 8))`` pixels (4 for 32x32)
        and, when `horizontal_flip`, mirrored with probability 1/2; the draws
        are keyed by (seed, epoch, batch index) and so reproducible too.

        Under several replicas `fit` reads it per input pipeline
        (`ShardedEpochs.for_pipeline`): each pipeline gathers only its
        replicas' slices of every batch, with the same pixels.

        Args:
            batch_size: global batch size, 1 <= batch_size <= num_train.
            seed: integer >= 0.
            augment: whether to apply the light image augmentation.
            batches_per_epoch: batches per epoch, 1 <= batches_per_epoch <=
                num_train // batch_size; None: num_train // batch_size.

        Returns:
            A `ShardedEpochs`: a function of the epoch index (a Python int or a
            scalar integer tensor, e.g. inside `tf.data`) returning a
            `tf.data.Dataset` of (x float32 (batch_size, *input_shape), y int32
            (batch_size,)).
        """
        self._check_batch_size(batch_size, self.num_train)
        check_int("seed", seed, 0)
        batches_per_epoch = check_batches_per_epoch(
            self.name, self.num_train, batch_size, batches_per_epoch
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

        def make_epoch(shard: InputShard, epoch):
            epoch = tf.cast(epoch, tf.int64)
            positions = shard_positions(batch_size, batches_per_epoch, shard)
            per_replica = batch_size // shard.num_replicas
            ids = tf.gather(epoch_order(num_train, seed_tensor, epoch), positions)
            slices = tf.data.Dataset.from_tensor_slices(tf.reshape(ids, [-1, per_replica]))

            def load(index, slice_ids):
                x = _normalize(tf.gather(x_all, slice_ids))
                if augment:
                    step, local = index // shard.local_replicas, index % shard.local_replicas
                    first = (shard.first_replica + local) * per_replica
                    x = translate_and_flip(
                        x, batch_key(seed_tensor, epoch, step), flip, first, batch_size
                    )
                return x, tf.gather(y_all, slice_ids)

            return slices.enumerate().map(
                load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
            )

        return ShardedEpochs(make_epoch, batch_size=batch_size, batches_per_epoch=batches_per_epoch)

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
        make_epoch = self.train_epochs(batch_size, seed, augment, batches_per_epoch)
        return epoch_stream(make_epoch, first_epoch=first_epoch)

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

    def train_sample(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """The first `count` training examples in stored order, normalized, unaugmented.

        For measurements that need arrays (Hessian, sharpness, per-example
        gradients); streamed datasets have the same method.
        """
        check_int("count", count, 1)
        x = self.x_train[:count]
        return _normalize(tf.convert_to_tensor(x)).numpy(), self.y_train[:count]

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


def from_split(name, x, y, seed, val_fraction, **fields) -> ClassificationData:
    """A `ClassificationData` of arrays (x, y) split stratified by `val_fraction` from `seed`."""
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


def images_to_numpy(dataset: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Collects a dataset of (uint8 image, label) of fixed image shape into arrays."""
    images, labels = [], []
    for image_batch, label_batch in dataset.batch(256).as_numpy_iterator():
        images.append(image_batch)
        labels.append(label_batch)
    return np.concatenate(images), np.concatenate(labels).astype("int32")
