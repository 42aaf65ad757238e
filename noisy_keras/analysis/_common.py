"""Shared plumbing for the analysis tools: data batches, losses, flat parameter vectors.

Private module: the public tools validate their arguments through these helpers so
that every tool accepts the same kinds of data and reports errors the same way.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import keras
import numpy as np
import tensorflow as tf

from noisy_keras._validation import check_positive_int


def default_loss() -> keras.losses.Loss:
    """The loss assumed for classifiers that output logits."""
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def resolve_loss(loss):
    """Returns `loss`, or the default logits cross-entropy when `loss` is None."""
    if loss is None:
        return default_loss()
    if not callable(loss):
        raise ValueError(
            f"loss must be a keras.losses.Loss or a callable (y_true, y_pred) -> loss; "
            f"received {loss!r}."
        )
    return loss


def per_example_loss(loss, y_true, y_pred):
    """Unreduced loss, one value per example, for a Keras Loss or a plain loss function.

    A `keras.losses.Loss` is evaluated through its `call` method, which skips the
    reduction; a plain callable must already return one value per example.
    """
    values = (
        loss.call(y_true, y_pred) if isinstance(loss, keras.losses.Loss) else loss(y_true, y_pred)
    )
    values = tf.convert_to_tensor(values)
    if values.shape.rank == 0:
        raise ValueError(
            f"loss must return one value per example (shape (batch,)); {loss!r} returned a "
            "scalar. Pass a keras.losses.Loss or an unreduced loss function."
        )
    if values.shape.rank > 1:
        values = tf.reduce_mean(tf.reshape(values, [tf.shape(values)[0], -1]), axis=1)
    return values


def mean_loss(loss, y_true, y_pred):
    """Mean loss over the examples of one batch."""
    return tf.reduce_mean(per_example_loss(loss, y_true, y_pred))


def num_examples(x) -> int:
    """Number of examples in an array or a (nested) structure of arrays."""
    return int(np.shape(tf.nest.flatten(x)[0])[0])


def check_arrays(x, y, name: str = "data") -> int:
    """Checks that `x` and `y` hold the same positive number of examples; returns it."""
    n = num_examples(x)
    for leaf in tf.nest.flatten(x) + tf.nest.flatten(y):
        if np.ndim(leaf) == 0 or np.shape(leaf)[0] != n:
            raise ValueError(
                f"{name}: inputs and labels must have the same number of examples along the "
                f"first axis; received shapes {[np.shape(a) for a in tf.nest.flatten(x)]} and "
                f"{[np.shape(a) for a in tf.nest.flatten(y)]}."
            )
    if n == 0:
        raise ValueError(f"{name} must hold at least one example; received 0.")
    return n


def iterate_batches(data, batch_size: int = 256, name: str = "data") -> Iterator[tuple]:
    """Yields `(x, y)` batches from arrays or from a batched `tf.data.Dataset`.

    Args:
        data: a tuple `(x, y)` of arrays (x may be a structure of arrays), or a batched
            `tf.data.Dataset` whose elements are `(x, y)`. Elements with sample weights
            `(x, y, w)` are refused rather than silently unweighted.
        batch_size: batch size used to slice arrays; ignored for datasets, which are
            already batched.
        name: the argument's name, for error messages.
    """
    if isinstance(data, tf.data.Dataset):
        for element in data:
            if not isinstance(element, tuple | list) or len(element) != 2:
                raise ValueError(
                    f"{name}: dataset elements must be (x, y) pairs; received an element with "
                    f"structure {tf.nest.map_structure(lambda t: t.shape, element)}. Sample "
                    "weights are not supported."
                )
            yield element[0], element[1]
        return
    if not isinstance(data, tuple | list) or len(data) != 2:
        raise ValueError(
            f"{name} must be a tuple (x, y) of arrays or a batched tf.data.Dataset of (x, y); "
            f"received {type(data).__name__}."
        )
    batch_size = check_positive_int("batch_size", batch_size)
    x, y = data
    n = check_arrays(x, y, name)
    for start in range(0, n, batch_size):
        window = slice(start, min(start + batch_size, n))
        yield take(x, window), take(y, window)


def take(structure, index):
    """The rows `index` of every array in a (nested) structure, as tensors."""
    return tf.nest.map_structure(lambda a: tf.convert_to_tensor(np.asarray(a)[index]), structure)


def batch_length(y) -> int:
    """Number of examples in a batch of labels."""
    return int(tf.shape(tf.nest.flatten(y)[0])[0])


def flat_values(variables) -> np.ndarray:
    """Concatenates the values of `variables` into one float64 vector."""
    if not variables:
        return np.zeros(0)
    return np.concatenate([np.asarray(v.numpy(), dtype=np.float64).ravel() for v in variables])


def split_flat(flat, variables) -> list:
    """Splits a flat vector into tensors shaped and typed like `variables`."""
    flat = np.asarray(flat)
    pieces, offset = [], 0
    for v in variables:
        size = int(np.prod(v.shape))
        pieces.append(tf.constant(flat[offset : offset + size].reshape(v.shape), dtype=v.dtype))
        offset += size
    return pieces


def flatten_tensors(tensors) -> tf.Tensor:
    """Concatenates tensors into one flat float64 tensor."""
    return tf.concat([tf.reshape(tf.cast(t, tf.float64), [-1]) for t in tensors], axis=0)


def num_parameters(variables) -> int:
    return int(sum(int(np.prod(v.shape)) for v in variables))


def check_vector(vector, dim: int, name: str) -> np.ndarray:
    """Returns `vector` as a float64 array of shape (dim,), or raises naming it."""
    array = np.asarray(vector, dtype=np.float64)
    if array.shape != (dim,):
        raise ValueError(f"{name} must have shape ({dim},); received shape {array.shape}.")
    return array


def load_model(model_or_path, name: str) -> keras.Model:
    """Returns a Keras model, loading it from a `.keras` file if given a path."""
    if isinstance(model_or_path, keras.Model):
        return model_or_path
    if isinstance(model_or_path, str | os.PathLike):
        path = os.fspath(model_or_path)
        if not path.endswith(".keras") or not os.path.isfile(path):
            raise ValueError(
                f"{name} must be a keras.Model or the path of an existing .keras file; "
                f"received {path!r}."
            )
        return keras.models.load_model(path, compile=False)
    raise ValueError(
        f"{name} must be a keras.Model or the path of a .keras file; "
        f"received {type(model_or_path).__name__}."
    )


def clone_model(model: keras.Model) -> keras.Model:
    """A copy of `model` with its own variables holding the same values."""
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    return clone


def mean_loss_and_flat_gradient(model: keras.Model, variables, loss):
    """A `tf.function` (x, y) -> (mean loss, its gradient w.r.t. `variables` as one flat vector).

    Inference mode; variables the loss does not reach get zero gradients.
    """

    @tf.function(reduce_retracing=True)
    def value_and_gradient(x, y):
        with tf.GradientTape() as tape:
            value = mean_loss(loss, y, model(x, training=False))
        gradients = tape.gradient(
            value, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO
        )
        return value, flatten_tensors(gradients)

    return value_and_gradient
