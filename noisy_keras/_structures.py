"""Small facts about tensors and nests of them that several packages need, each said once."""

from __future__ import annotations

import tensorflow as tf

__all__ = ["batch_size", "dense", "dense_all", "replica_in_sync"]


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


def replica_in_sync():
    """(replica id, replicas in sync) of the current replica context; (0, 1) outside one.

    The id is a Python int or a scalar tensor (as `tf.distribute` gives it), the
    count always a Python int.
    """
    context = tf.distribute.get_replica_context()
    if context is None:
        return 0, 1
    return context.replica_id_in_sync_group, int(context.num_replicas_in_sync)
