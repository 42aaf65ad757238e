"""`NoiseLogger`: the noise, and the gap it is meant to close, in Keras' epoch logs.

A Keras callback that adds to `logs` at the end of every epoch (so that
`keras.callbacks.TensorBoard`, `CSVLogger`, `History` and any experiment
tracker's Keras callback record them with no code of their own):

    noise_step                     t, the epoch's last parameter update (0 for the first update)
    noise_stddev                   sigma_t of that update (0.0: no noise wrapper, or alpha = 0)
    noise_covariance_trace         MatchedNoiseOptimizer only: its estimate of tr(Sigma)
    noise_multiplicative_variance  multiplicative noise only: s^2 of the example weights
    gap                            logs[gap_metric] - logs["val_" + gap_metric], when both exist

Every value is that of the epoch's last update, read from the optimizer when
the epoch ends: for `NoisyOptimizer` sigma_t^2 = alpha / (1 + t)^gamma at that
t; for `MatchedNoiseOptimizer` the moving average of tr(Sigma) that the last
update used and the sigma it gave (the engine observes the estimate before each
update). Nothing is carried from one epoch to the next, so a resumed run logs
what an uninterrupted one does. The wrapper is found through Keras'
`LossScaleOptimizer` (`noisy_keras.noise.chain`).

Callbacks see `logs` in the order they are listed (Keras' `History` and
progress bar come last), so put `NoiseLogger` before the callbacks that should
record its values.

With `log_dir` and `update_freq=N`, sigma_t (and tr(Sigma) for matched noise)
are also written as TensorBoard scalars every N updates, at step t, tags
`update_noise_stddev` and `update_noise_covariance_trace`, to `log_dir/train`
(the run Keras' `TensorBoard(log_dir)` writes its training scalars to).
"""

from __future__ import annotations

import os

import keras
import numpy as np
import tensorflow as tf

from noisy_keras._validation import check_positive_int
from noisy_keras.noise import multiplicative
from noisy_keras.noise.chain import find_noisy_optimizer
from noisy_keras.noise.matched import MatchedNoiseOptimizer

NOISE_STEP = "noise_step"
NOISE_STDDEV = "noise_stddev"
COVARIANCE_TRACE = "noise_covariance_trace"
MULTIPLICATIVE_VARIANCE = "noise_multiplicative_variance"
GAP = "gap"
UPDATE_TAG_PREFIX = "update_"

__all__ = [
    "COVARIANCE_TRACE",
    "GAP",
    "MULTIPLICATIVE_VARIANCE",
    "NOISE_STDDEV",
    "NOISE_STEP",
    "NoiseLogger",
    "noise_values",
]


def _updates_applied(model: keras.Model) -> int:
    """The optimizer's update count, through any wrappers (they all share the inner one's)."""
    return int(keras.ops.convert_to_numpy(model.optimizer.iterations))


def noise_values(model: keras.Model) -> dict:
    """The noise of the last update `model.optimizer` applied, as `NoiseLogger` logs it.

    Returns:
        {} before the first update; else `noise_step` and `noise_stddev`, plus
        `noise_covariance_trace` under a `MatchedNoiseOptimizer` and
        `noise_multiplicative_variance` when `enable_multiplicative_noise` is in
        force (see the module docstring). Python numbers.
    """
    return _noise_values(model, _updates_applied(model))


def _noise_values(model: keras.Model, applied: int) -> dict:
    """`noise_values` once `applied`, the optimizer's update count, has been read."""
    if applied == 0:
        return {}
    step = applied - 1
    values = {NOISE_STEP: step, NOISE_STDDEV: 0.0}
    wrapper = find_noisy_optimizer(model.optimizer)
    if wrapper is not None:
        values[NOISE_STDDEV] = float(wrapper.noise_stddev_at(tf.constant(step, tf.int64)))
        if isinstance(wrapper, MatchedNoiseOptimizer):  # built: it has applied an update
            values[COVARIANCE_TRACE] = float(wrapper.covariance_trace)
    settings = multiplicative.active_multiplicative_noise(model)
    if settings is not None:
        values[MULTIPLICATIVE_VARIANCE] = float(settings.variance)
    return values


class NoiseLogger(keras.callbacks.Callback):
    """Puts the noise's size (sigma_t, t, tr(Sigma), s^2) and the gap into Keras' epoch logs.

    See the module docstring for the keys and what each holds. Works with
    Keras' `model.fit` and with the engine (`noisy_keras.engine.fit.fit`), which
    runs callbacks as `fit` does.

    Args:
        gap_metric: the metric whose train - validation difference is logged as
            `gap` (when both `gap_metric` and `"val_" + gap_metric` are in the
            epoch's logs).
        log_dir: a TensorBoard log directory for the per-update scalars, or None.
        update_freq: N, write the per-update scalars every N updates (needs
            `log_dir`); None writes none. An update is seen when a training
            batch ends, so with Keras' `steps_per_execution` > 1 only the
            updates that end an execution can be written.

    Raises:
        ValueError: a bad argument (named in the message).

    Example:
        >>> model.fit(x, y, validation_data=(xv, yv), epochs=30, callbacks=[
        ...     noisy_keras.NoiseLogger(), keras.callbacks.TensorBoard("logs")])
        # TensorBoard shows epoch_noise_stddev, epoch_noise_step and epoch_gap.
    """

    def __init__(self, gap_metric: str = "accuracy", log_dir=None, update_freq=None):
        super().__init__()
        if not isinstance(gap_metric, str) or not gap_metric or gap_metric.startswith("val_"):
            raise ValueError(
                "gap_metric must be the name of a training metric in the logs (e.g. "
                f"'accuracy'), not empty and without 'val_'; received gap_metric={gap_metric!r}."
            )
        if update_freq is not None:
            update_freq = check_positive_int("update_freq", update_freq)
            if log_dir is None:
                raise ValueError(
                    f"update_freq={update_freq} needs log_dir, the TensorBoard directory to "
                    "write the per-update scalars to; received log_dir=None."
                )
        if log_dir is not None:
            if not isinstance(log_dir, (str, os.PathLike)) or not os.fspath(log_dir):
                raise ValueError(
                    f"log_dir must be a directory path or None; received log_dir={log_dir!r}."
                )
            if update_freq is None:
                raise ValueError(
                    f"log_dir={os.fspath(log_dir)!r} is only used for the per-update scalars; "
                    "give update_freq=N (every N updates) too, or leave log_dir=None (the epoch "
                    "values reach TensorBoard through keras.callbacks.TensorBoard)."
                )
        self.gap_metric = gap_metric
        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        self.update_freq = update_freq
        self._writer = None
        self._last_written = None

    # ---- Epochs --------------------------------------------------------------------

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        logs.update(noise_values(self.model))
        train, validation = self.gap_metric, f"val_{self.gap_metric}"
        if train in logs and validation in logs:
            logs[GAP] = float(np.asarray(logs[train])) - float(np.asarray(logs[validation]))

    # ---- Per-update scalars --------------------------------------------------------

    def on_train_begin(self, logs=None):
        if self.update_freq is not None:
            self._writer = tf.summary.create_file_writer(os.path.join(self.log_dir, "train"))
            self._last_written = None

    def on_train_batch_end(self, batch, logs=None):
        if self._writer is None:
            return
        applied = _updates_applied(self.model)
        step = applied - 1
        if step < 0 or step % self.update_freq or step == self._last_written:
            return
        values = _noise_values(self.model, applied)
        with self._writer.as_default():
            for key in (NOISE_STDDEV, COVARIANCE_TRACE):
                if key in values:
                    tf.summary.scalar(UPDATE_TAG_PREFIX + key, values[key], step=step)
        self._last_written = step

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None

    def get_config(self) -> dict:
        return {
            "gap_metric": self.gap_metric,
            "log_dir": self.log_dir,
            "update_freq": self.update_freq,
        }
