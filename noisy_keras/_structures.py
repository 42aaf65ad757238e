"""Small facts about tensors and nests of them that several packages need, each said once."""

from __future__ import annotations

import tensorflow as tf

__all__ = ["batch_size", "dense", "dense_all"]


def batch_size(structure) -> tuple[int | None, tf.Tensor]:
    """(static, dynamic) leading size of the first non-None tensor of a nest (a batch's x)."""
    first = next(t for t in tf.nest.flatten(structure) if t is not None)
    static = first.shape[0] if first.shape.rank else None
    return static, tf.shape(first)[0]


def dense(gradient):
    """A `tf.IndexedSlices` gradient (e.g. of an `Embedding`) as a dense tensor; others as given.

    Norms, all-reductions and added noise need every row, not only the gathered ones.
    """
    return tf.convert_to_tensor(gradient) if isinstance(gradient, tf.IndexedSlices) else gradient


def dense_all(gradients) -> list:
    """`dense` of each gradient of a list (None stays None)."""
    return [dense(g) for g in gradients]
