"""Per-replica input: which positions of each epoch an input pipeline reads, and its keys.

Under `tf.distribute` every replica computes on its slice of the global batch.
`noisy_keras.engine.fit.fit` hands a `ShardedEpochs` to
`strategy.distribute_datasets_from_function`, which builds one input pipeline
per worker; each pipeline reads only its replicas' slices of every global
batch (`shard_positions`), so the global batches, and hence training, are the
same whatever the number of workers, and no worker reads another's examples.

Random augmentation is keyed by position, never by pipeline: `batch_key`
(seed, epoch, step) for per-batch draws, `example_key` (seed, epoch,
position in the epoch order) for per-example draws.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from noisy_keras._validation import check_int, replica_share

# Salts folded into the per-epoch key so augmentation draws differ from the order's.
_AUGMENT_SALT = 0x5EED
_EXAMPLE_SALT = 0xC0DE

__all__ = [
    "InputShard",
    "ShardedEpochs",
    "batch_key",
    "example_key",
    "input_shard",
    "shard_positions",
]


@dataclasses.dataclass(frozen=True)
class InputShard:
    """What one input pipeline reads of each global batch.

    The global batch of B examples is split into `num_replicas` contiguous
    slices of B / num_replicas; this pipeline feeds replicas `first_replica`
    to `first_replica + local_replicas - 1` (one worker's devices) and yields
    their slices in that order, step after step.

    Attributes:
        num_replicas: replicas in sync over all workers.
        first_replica: the first replica this pipeline feeds.
        local_replicas: replicas this pipeline feeds.
        pipeline_id: this pipeline's index, 0 <= pipeline_id < num_pipelines.
        num_pipelines: input pipelines (workers).
    """

    num_replicas: int = 1
    first_replica: int = 0
    local_replicas: int = 1
    pipeline_id: int = 0
    num_pipelines: int = 1


def input_shard(input_context=None) -> InputShard:
    """The `InputShard` of a `tf.distribute.InputContext` (None: one pipeline, one replica).

    Raises:
        ValueError: replicas not divisible by input pipelines.
    """
    if input_context is None:
        return InputShard()
    replicas = int(input_context.num_replicas_in_sync)
    pipelines = int(input_context.num_input_pipelines)
    if replicas % pipelines:
        raise ValueError(
            f"num_replicas_in_sync={replicas} is not divisible by num_input_pipelines="
            f"{pipelines}; every worker must have the same number of devices."
        )
    local = replicas // pipelines
    index = int(input_context.input_pipeline_id)
    return InputShard(replicas, index * local, local, index, pipelines)


def shard_positions(batch_size: int, num_batches: int, shard: InputShard) -> np.ndarray:
    """Positions in the epoch order that `shard` reads, in the order it yields them.

    Rule: step k's global batch is positions k B ... (k + 1) B - 1 of the
    epoch order, replica r's slice of it is k B + r b ... k B + (r + 1) b - 1
    with b = B / num_replicas; the shard yields, for k = 0 ... num_batches - 1,
    the slices of replicas first_replica ... first_replica + local_replicas - 1.
    Over all shards every position < num_batches B appears exactly once.

    Args:
        batch_size: the global (step) batch B, a multiple of shard.num_replicas.
        num_batches: steps per epoch.
        shard: the pipeline's `InputShard`.

    Returns:
        int64 array of num_batches x local_replicas x b positions.
    """
    check_int("batch_size", batch_size, 1)
    check_int("num_batches", num_batches, 1)
    per_replica = replica_share(batch_size, shard.num_replicas)
    if per_replica is None:
        raise ValueError(
            f"batch_size={batch_size} is not divisible by the {shard.num_replicas} replicas in "
            "sync; see noisy_keras.engine.fit.split_global_batch."
        )
    grid = np.arange(num_batches * batch_size, dtype=np.int64).reshape(
        num_batches, shard.num_replicas, per_replica
    )
    mine = grid[:, shard.first_replica : shard.first_replica + shard.local_replicas]
    return mine.reshape(-1)


class ShardedEpochs:
    """Training data for `noisy_keras.engine.fit.fit` that each input pipeline can read a shard of.

    Called with an epoch it gives that epoch's global batches (one pipeline,
    e.g. one device); `for_pipeline(input_context)` gives the function a
    pipeline of `strategy.distribute_datasets_from_function` reads: that
    epoch's per-replica batches of its `InputShard`, local_replicas per step.

    Attributes:
        batch_size: the global (step) batch.
        batches_per_epoch: steps per epoch.
        python_epochs: True when the epoch must be a Python int (a TFDS reader
            seeded per epoch); `epoch_stream` then concatenates the epochs.
    """

    def __init__(self, make_epoch, *, batch_size: int, batches_per_epoch: int, python_epochs=False):
        """`make_epoch(shard: InputShard, epoch) -> tf.data.Dataset` of the shard's batches."""
        self._make_epoch = make_epoch
        self.batch_size = batch_size
        self.batches_per_epoch = batches_per_epoch
        self.python_epochs = python_epochs

    def __call__(self, epoch) -> tf.data.Dataset:
        return self._make_epoch(InputShard(), epoch)

    def for_pipeline(self, input_context):
        """A function epoch -> this pipeline's per-replica batches of that epoch.

        Its `python_epochs` attribute is that of this object, for `epoch_stream`.
        """
        shard = input_shard(input_context)
        make_epoch = self._make_epoch

        def pipeline_epoch(epoch):
            return make_epoch(shard, epoch)

        pipeline_epoch.python_epochs = self.python_epochs
        pipeline_epoch.shard = shard
        return pipeline_epoch


def batch_key(seed, epoch, step):
    """The stateless key of the augmentation of global batch `step` of `epoch`, from `seed`."""
    epoch_key = tf.stack([tf.cast(seed, tf.int64), tf.cast(epoch, tf.int64)])
    salted = tf.random.experimental.stateless_fold_in(epoch_key, _AUGMENT_SALT)
    return tf.random.experimental.stateless_fold_in(salted, tf.cast(step, tf.int64))


def example_key(seed, epoch, position):
    """The stateless key of the draws for the example at `position` of `epoch`'s order."""
    epoch_key = tf.stack([tf.cast(seed, tf.int64), tf.cast(epoch, tf.int64)])
    salted = tf.random.experimental.stateless_fold_in(epoch_key, _EXAMPLE_SALT)
    return tf.random.experimental.stateless_fold_in(salted, tf.cast(position, tf.int64))
