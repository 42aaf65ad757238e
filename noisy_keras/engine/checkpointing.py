"""Crash-safe, exactly resumable checkpoints, and a stop for diverged runs.

A run's state at an epoch boundary is the model's variables, the optimizer's
variables (slots, `iterations`, which is both the noise step t of
`NoisyOptimizer` and the position of a learning-rate schedule, and gradient
accumulators) and the number of epochs completed. `Checkpointer` saves that
state with `tf.train.CheckpointManager`: the files of checkpoint N are
written first, then the small "checkpoint" state file naming N as the latest
is replaced atomically, and only after that are checkpoints older than the
`max_to_keep` newest deleted. A process killed at any moment therefore leaves
the previous checkpoint as the latest, intact (at worst with the orphan files
of an unfinished one, which are ignored). Restarting with the same arguments
restores the latest and continues at the next epoch; when the epoch-e data
order depends only on (seed, e), the resumed run repeats exactly what the
killed run would have done.
"""

from __future__ import annotations

import math
import os
import re
import shutil

import keras
import tensorflow as tf

from noisy_keras.engine import distribute

__all__ = ["Checkpointer", "DivergenceGuard", "EpochCheckpoint", "checkpointed_epochs"]


def checkpointed_epochs(directory: str) -> int:
    """Epochs completed by the latest checkpoint in `directory` (0 without one).

    `Checkpointer.save` numbers each checkpoint by the epochs it completed
    (`ckpt-3` holds the state after three epochs), so the count is read from
    the name without restoring anything.
    """
    latest = tf.train.latest_checkpoint(directory)
    match = re.search(r"-(\d+)$", latest or "")
    return int(match.group(1)) if match else 0


def _tf_variable(variable):
    """The TensorFlow variable behind a Keras variable (distributed under a strategy)."""
    return (
        getattr(variable, "value", variable) if isinstance(variable, keras.Variable) else variable
    )


class Checkpointer:
    """Saves and restores model, optimizer and epoch count under `directory`.

    Only the chief worker's files are kept: under `MultiWorkerMirroredStrategy`
    every worker must take part in `save` (reading distributed variables may
    need collectives), so the others write to a private temporary directory
    that is deleted right after. All workers restore from `directory`, which
    must be on a file system they share.

    The model and the optimizer must be built
    (`optimizer.build(model.trainable_variables)`) before the `Checkpointer`
    is made, so that all their variables exist; they are saved as two lists
    in the order of `model.variables` and `optimizer.variables`, and a
    restore must match them one to one (`assert_consumed`).

    Args:
        model: a compiled Keras model; its `optimizer` is saved with it.
        directory: where checkpoints live.
        max_to_keep: how many of the newest checkpoints to keep (>= 1).
        strategy: the model's strategy (decides who is the chief).
    """

    def __init__(self, model: keras.Model, directory: str, max_to_keep: int = 2, strategy=None):
        if not isinstance(max_to_keep, int) or isinstance(max_to_keep, bool) or max_to_keep < 1:
            raise ValueError(f"max_to_keep must be an integer >= 1; received {max_to_keep!r}.")
        if model.optimizer is None:
            raise ValueError("`model` must be compiled with an optimizer to be checkpointed.")
        self.directory = directory
        self._strategy = strategy or model.distribute_strategy
        self._is_chief = distribute.is_chief(self._strategy)
        self._epochs = tf.Variable(0, dtype=tf.int64, trainable=False, name="epochs_completed")
        # Keras 3 models are not fully tracked by tf.train.Checkpoint (their
        # non-trainable variables, e.g. BatchNormalization statistics and RNG
        # seed state, would be left out), so the variables are listed explicitly.
        self._model_variables = [_tf_variable(v) for v in model.variables]
        self._optimizer_variables = [_tf_variable(v) for v in model.optimizer.variables]
        self._checkpoint = tf.train.Checkpoint(
            model_variables=self._model_variables,
            optimizer_variables=self._optimizer_variables,
            epochs_completed=self._epochs,
        )
        if self._is_chief:
            write_directory = directory
        else:
            index = distribute.worker_index(self._strategy)
            write_directory = os.path.join(directory, f".worker-{index}-tmp")
        self._write_directory = write_directory
        self._manager = tf.train.CheckpointManager(
            self._checkpoint, write_directory, max_to_keep=max_to_keep
        )

    @property
    def latest(self) -> str | None:
        """Path prefix of the latest complete checkpoint in `directory`, or None."""
        return tf.train.latest_checkpoint(self.directory)

    def restore_latest(self) -> int:
        """Restores the latest checkpoint, if any; returns the epochs it had completed.

        Returns:
            0 when there is no checkpoint (nothing restored), else the number of
            completed epochs, i.e. the `initial_epoch` to resume at.
        """
        path = self.latest
        if path is None:
            return 0
        self._checkpoint.restore(path).assert_consumed()
        return int(self._epochs.numpy())

    def save(self, epochs_completed: int) -> str | None:
        """Saves the state after `epochs_completed` epochs; returns the chief's path.

        The checkpoint number is the epoch count, so `ckpt-3` holds the state
        after three epochs.
        """
        self._epochs.assign(epochs_completed)
        path = self._manager.save(checkpoint_number=epochs_completed)
        if not self._is_chief:
            shutil.rmtree(self._write_directory, ignore_errors=True)
            return None
        return path


def _scalar(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


class DivergenceGuard(keras.callbacks.Callback):
    """Stops training at the first step whose loss is NaN or Inf.

    Keras' training logs carry the running mean of the loss over the epoch,
    which becomes non-finite at the first non-finite step and stays so; the
    guard checks it after every step (every `steps_per_execution` steps) and
    then sets `model.stop_training`, records where it happened in `message`
    and `diverged_at`, and `EpochCheckpoint` writes nothing afterwards, so the
    last good checkpoint stays the latest (big_vision stops the same way).

    Args:
        steps_per_epoch: steps in an epoch, to number the step globally.
        monitor: the log entry to check.
    """

    def __init__(self, steps_per_epoch: int, monitor: str = "loss"):
        super().__init__()
        self.steps_per_epoch = int(steps_per_epoch)
        self.monitor = monitor
        self.diverged_at: dict | None = None
        self.message = ""
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.diverged_at is not None:
            return
        value = _scalar((logs or {}).get(self.monitor))
        if value is None or math.isfinite(value):
            return
        step = self._epoch * self.steps_per_epoch + batch
        self.diverged_at = {"step": step, "epoch": self._epoch, "batch": batch}
        self.message = (  # epochs and batches from 1, as in the progress bar and metrics.csv
            f"{self.monitor} became {value} in epoch {self._epoch + 1}, batch {batch + 1} of "
            f"{self.steps_per_epoch} (step {step}, counting steps from 0); stopped. The last "
            "good checkpoint is kept."
        )
        self.model.stop_training = True


class EpochCheckpoint(keras.callbacks.Callback):
    """Saves a `Checkpointer` checkpoint at the end of every `every_epochs`-th epoch.

    It saves nothing for an epoch whose logged loss is not finite or after
    `guard` (a `DivergenceGuard`) has seen a non-finite loss.

    Args:
        checkpointer: the run's `Checkpointer`.
        every_epochs: save when the count of completed epochs is a multiple
            of it (and always after the last epoch of the run).
        last_epoch: the run's `epochs`, so the final state is always saved.
        guard: optional `DivergenceGuard` whose verdict vetoes saving.
    """

    def __init__(
        self,
        checkpointer: Checkpointer,
        every_epochs: int = 1,
        last_epoch: int | None = None,
        guard: DivergenceGuard | None = None,
    ):
        super().__init__()
        if not isinstance(every_epochs, int) or isinstance(every_epochs, bool) or every_epochs < 1:
            raise ValueError(f"every_epochs must be an integer >= 1; received {every_epochs!r}.")
        self.checkpointer = checkpointer
        self.every_epochs = every_epochs
        self.last_epoch = last_epoch
        self.guard = guard
        self.saved: list[int] = []

    def on_epoch_end(self, epoch, logs=None):
        if self.guard is not None and self.guard.diverged_at is not None:
            return
        loss = _scalar((logs or {}).get("loss"))
        if loss is not None and not math.isfinite(loss):
            return
        completed = epoch + 1
        if completed % self.every_epochs == 0 or completed == self.last_epoch:
            self.checkpointer.save(completed)
            self.saved.append(completed)
