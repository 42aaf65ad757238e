"""The deterministic epoch: its order as a function of (seed, epoch), and epochs as a stream.

The epoch order is a pure function of (seed, epoch) (`epoch_order`), so a run
resumed at epoch e sees exactly the batches an uninterrupted run saw;
`epoch_batches` gives the same form for arrays, and `epoch_stream` is the one
place where epochs become a stream. `noisy_keras.data.pipeline.ClassificationData`,
`noisy_keras.data.streaming` and the engine's `fit` build on them.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from noisy_keras._validation import check_int

__all__ = [
    "check_batches_per_epoch",
    "epoch_batches",
    "epoch_order",
    "epoch_permutation",
    "epoch_stream",
]


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
