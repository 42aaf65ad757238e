"""Training data as deterministic `tf.data` pipelines: split, epoch order, epoch streams.

A `ClassificationData` (made by `noisy_keras.data.datasets.load_dataset`) holds a
dataset split into training and validation; its `train_epochs` and
`val_batches` make the `tf.data` pipelines. The epoch order is a pure function
of (seed, epoch) (`epoch_order`), so a run resumed at epoch e sees exactly the
batches an uninterrupted run saw; `epoch_batches` gives the same form for
arrays, and `epoch_stream` is the one place where epochs become a stream.

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


def epoch_batches(arrays, *, batch_size: int, seed: int, drop_remainder: bool = True):
    """Returns `make_epoch(epoch) -> tf.data.Dataset` whose order depends only on (seed, epoch).

    Epoch e visits the examples of `arrays` in the permutation
    `epoch_order(n, seed, e)`, batched. Since nothing depends on earlier
    epochs, a run resumed at epoch e sees exactly the batches an uninterrupted
    run sees. Pass the result to `noisy_keras.engine.fit.fit` as `train_data`.

    Args:
        arrays: an array or a tuple/dict of arrays with the same first dimension
            (e.g. `(x, y)`).
        batch_size: the step batch (over all replicas), see
            `noisy_keras.engine.fit.split_global_batch`.
        seed: integer seed of the order.
        drop_remainder: drop the last partial batch (keeps every step's batch,
            and hence the per-replica split, the same shape).

    Returns:
        A function of a scalar int64 epoch tensor.
    """
    check_int("batch_size", batch_size, 1)
    arrays = tf.nest.map_structure(tf.convert_to_tensor, arrays)
    n = int(tf.nest.flatten(arrays)[0].shape[0])

    def make_epoch(epoch):
        order = epoch_order(n, seed, epoch)
        return (
            tf.data.Dataset.from_tensor_slices(order)
            .batch(batch_size, drop_remainder=drop_remainder)
            .map(lambda idx: tf.nest.map_structure(lambda a: tf.gather(a, idx), arrays))
        )

    return make_epoch


def epoch_stream(
    train_data,
    *,
    first_epoch: int = 0,
    epochs: int | None = None,
    batches_per_epoch: int | None = None,
) -> tf.data.Dataset:
    """One dataset with the batches of epochs `first_epoch, ..., epochs - 1`, in order.

    The one place where epochs become a stream: `ClassificationData.train_batches`
    and `noisy_keras.engine.fit.fit` both use it.

    Args:
        train_data: a function `epoch -> tf.data.Dataset` of that epoch's
            batches (`epoch_batches`, `ClassificationData.train_epochs`), or a
            deterministic `tf.data.Dataset` of batches, which is repeated and
            fast-forwarded by `first_epoch * batches_per_epoch` batches.
        first_epoch: the first epoch, >= 0.
        epochs: one past the last epoch; None for an endless stream.
        batches_per_epoch: batches taken of each epoch (None: all of them);
            required for a `tf.data.Dataset` with `first_epoch > 0`.

    Returns:
        A prefetched `tf.data.Dataset`.

    Raises:
        ValueError: `train_data` is neither a dataset nor a function, or a bad count.
    """
    check_int("first_epoch", first_epoch, 0)
    if batches_per_epoch is not None:
        check_int("batches_per_epoch", batches_per_epoch, 1)
    if isinstance(train_data, tf.data.Dataset):
        # Deterministic pipelines replay identically; skip what was already trained on.
        if first_epoch and batches_per_epoch is None:
            raise ValueError(
                "epoch_stream needs batches_per_epoch to resume a tf.data.Dataset at "
                f"first_epoch={first_epoch}."
            )
        return train_data.repeat().skip(first_epoch * (batches_per_epoch or 0))
    if not callable(train_data):
        raise ValueError(
            "train_data must be a tf.data.Dataset or a function epoch -> tf.data.Dataset "
            f"(see epoch_batches); received {type(train_data).__name__}."
        )

    def one_epoch(epoch):
        batches = train_data(epoch)
        return batches if batches_per_epoch is None else batches.take(batches_per_epoch)

    if getattr(train_data, "python_epochs", False):
        # Epochs whose pipeline needs the epoch as a Python int (TFDS' file-order seed):
        # concatenated lazily, each epoch's reader is opened when the previous one ends.
        if epochs is None:
            raise ValueError(
                "This training data builds each epoch from a Python epoch number (a TFDS "
                "reader); epoch_stream needs a finite epochs=..., received epochs=None."
            )
        stream = None
        for epoch in range(first_epoch, epochs):
            stream = one_epoch(epoch) if stream is None else stream.concatenate(one_epoch(epoch))
        if stream is None:
            raise ValueError(f"epochs={epochs} must exceed first_epoch={first_epoch}.")
        return stream.prefetch(tf.data.AUTOTUNE)
    if epochs is None:
        epoch_indices = tf.data.Dataset.counter(start=first_epoch)
    else:
        epoch_indices = tf.data.Dataset.range(first_epoch, epochs)
    return epoch_indices.flat_map(one_epoch).prefetch(tf.data.AUTOTUNE)


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


def check_batches_per_epoch(name, num_train, batch_size, batches_per_epoch) -> int:
    """`batches_per_epoch`, or num_train // batch_size when None, checked against that bound."""
    full_batches = num_train // batch_size
    if batches_per_epoch is None:
        return full_batches
    check_int("batches_per_epoch", batches_per_epoch, 1)
    if batches_per_epoch > full_batches:
        raise ValueError(
            f"batches_per_epoch must be at most num_train // batch_size = {full_batches} for "
            f"{name!r}; received batches_per_epoch={batches_per_epoch}."
        )
    return batches_per_epoch


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
