"""Where a streamed dataset's encoded images come from: a folder's files or a TFDS builder.

Each source gives, per input pipeline, the (encoded image, label, position) of
its share of epoch e, and the examples of a split in stored order, for
`noisy_keras.data.streaming.StreamedImageData`, which decodes them.

Epoch order, a function of (seed, epoch):

* folder: exactly as in memory. The stratified 3:1 split is
  `noisy_keras.data.pipeline.stratified_split` of the labels (from the folder names)
  with `seed`; epoch e visits the training files in
  `noisy_keras.data.epochs.epoch_order(num_train, seed, e)`, so a streamed folder
  gives bit for bit the batches of the same folder held in memory (with the
  default ``resize`` preprocessing).
* TFDS (no random access into its record files): each epoch opens a reader
  whose file order is shuffled with a seed derived from (seed, epoch),
  interleaves `TFDS_INTERLEAVE_FILES` files deterministically, and passes the
  examples through a shuffle buffer of `TFDS_SHUFFLE_BUFFER` seeded from
  (seed, epoch); the epoch never depends on the one before, so a resumed run
  sees the same batches. (TensorFlow's global seed, which the main job never
  sets, would enter the two shuffles too.)
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from noisy_keras.data.epochs import epoch_order
from noisy_keras.data.shards import InputShard, shard_positions

TFDS_SHUFFLE_BUFFER = 10_000
"""Examples (encoded) in the shuffle buffer of a TFDS training pipeline."""
TFDS_INTERLEAVE_FILES = 16
"""TFDS record files read at once, interleaved deterministically."""
_FILE_SEED_SALT, _BUFFER_SEED_SALT = 1, 2

__all__ = [
    "TFDS_INTERLEAVE_FILES",
    "TFDS_SHUFFLE_BUFFER",
    "FolderFiles",
    "TfdsSplits",
    "derived_seed",
]


def derived_seed(seed: int, epoch: int, salt: int) -> int:
    """A 31-bit seed that is a function of (seed, epoch, salt) only (NumPy's SeedSequence)."""
    state = np.random.SeedSequence([int(seed), int(epoch), int(salt)]).generate_state(1)[0]
    return int(state) & 0x7FFFFFFF


@dataclasses.dataclass(frozen=True, eq=False)
class FolderFiles:
    """The files of a class-per-folder tree, split: paths (str) and int32 labels."""

    train_paths: np.ndarray
    train_labels: np.ndarray
    val_paths: np.ndarray
    val_labels: np.ndarray

    python_epochs = False

    @property
    def num_train(self) -> int:
        return len(self.train_labels)

    @property
    def num_val(self) -> int:
        return len(self.val_labels)

    def train_examples(self, shard: InputShard, epoch, seed: int, batch_size: int, batches: int):
        """(encoded image, label, position) of the shard's share of epoch `epoch`, in order."""
        positions = shard_positions(batch_size, batches, shard)
        ids = tf.gather(epoch_order(self.num_train, seed, epoch), positions)
        paths = tf.constant(self.train_paths)
        labels = tf.constant(self.train_labels)
        return tf.data.Dataset.from_tensor_slices((positions, ids)).map(
            lambda position, i: (tf.io.read_file(paths[i]), labels[i], position),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )

    def ordered_examples(self, split: str):
        """(encoded image, label) of the "train" or "val" files in stored order."""
        paths, labels = (
            (self.train_paths, self.train_labels)
            if split == "train"
            else (self.val_paths, self.val_labels)
        )
        return tf.data.Dataset.from_tensor_slices((paths, labels)).map(
            lambda path, label: (tf.io.read_file(path), label),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )


@dataclasses.dataclass(frozen=True, eq=False)
class TfdsSplits:
    """A prepared TFDS builder and the split strings read for training and validation."""

    builder: object
    train_split: str
    val_split: str
    num_train: int
    num_val: int

    python_epochs = True  # the reader's file-order seed is a Python int per epoch

    def _read(self, split: str, *, shuffle_seed: int | None = None, input_context=None):
        import tensorflow_datasets as tfds

        read_config = tfds.ReadConfig(
            shuffle_seed=shuffle_seed,
            interleave_cycle_length=TFDS_INTERLEAVE_FILES,
            input_context=input_context,
            try_autocache=False,
        )
        examples = self.builder.as_dataset(
            split=split,
            shuffle_files=shuffle_seed is not None,
            decoders={"image": tfds.decode.SkipDecoding()},
            read_config=read_config,
        )
        return examples.map(lambda e: (e["image"], tf.cast(e["label"], tf.int32)))

    def train_examples(self, shard: InputShard, epoch, seed: int, batch_size: int, batches: int):
        """(encoded image, label, position) of the shard's share of epoch `epoch`, in order.

        Positions number the examples of all pipelines without collisions
        (pipeline_id + num_pipelines x index), for per-example random keys.
        """
        epoch = int(epoch)
        context = None
        if shard.num_pipelines > 1:
            context = tf.distribute.InputContext(
                num_input_pipelines=shard.num_pipelines,
                input_pipeline_id=shard.pipeline_id,
                num_replicas_in_sync=shard.num_replicas,
            )
        count = batches * shard.local_replicas * (batch_size // shard.num_replicas)
        examples = self._read(
            self.train_split,
            shuffle_seed=derived_seed(seed, epoch, _FILE_SEED_SALT),
            input_context=context,
        )
        examples = examples.shuffle(
            min(TFDS_SHUFFLE_BUFFER, self.num_train),
            seed=derived_seed(seed, epoch, _BUFFER_SEED_SALT),
        )
        return (
            examples.repeat()
            .take(count)
            .enumerate()
            .map(
                lambda index, example: (
                    example[0],
                    example[1],
                    index * shard.num_pipelines + shard.pipeline_id,
                )
            )
        )

    def ordered_examples(self, split: str):
        """(encoded image, label) of the training or validation split in TFDS' read order."""
        return self._read(self.train_split if split == "train" else self.val_split)
