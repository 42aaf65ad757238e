"""The pure functions each replica compiles: forward pass, loss, gradients, predictions.

A core receives the values of the model's trainable, non-trainable and metric
variables as tensors, runs `model.stateless_call` and the compiled loss (under
a `GradientTape` when training), and returns the loss, the gradients, the
predictions and the new values of the non-trainable and metric variables that
changed (BatchNormalization statistics, RNG state, per-output loss trackers).
Because it captures no variable, each replica compiles and runs it on its own
device (`tf.function(jit_compile=True)`); the steps around it
(`noisy_keras.engine.steps`) write the values back and apply the update.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from noisy_keras import _keras_internals as internals
from noisy_keras.engine.state import changed, check_state_unchanged_in_length

__all__ = ["StatelessCores"]


class StatelessCores:
    """The cores of one model, compiled with `jit_compile` (XLA) or as plain graphs.

    Attributes:
        loss_and_gradients, loss_and_predictions, predictions: the compiled
            train, test and predict cores.
        plain_loss_and_gradients: the train core uncompiled, for the noise
            kinds' variants (`noisy_keras.engine.hooks`), which compile their own.

    Args:
        model: a compiled Keras model.
        jit_compile: compile the cores with XLA.
    """

    def __init__(self, model: keras.Model, jit_compile: bool):
        self.model = model
        has_training_arg = internals.call_has_training_arg(model)
        self._call_kwargs = {"training": True} if has_training_arg else {}
        self._eval_kwargs = {"training": False} if has_training_arg else {}

        def compiled(fn):
            return tf.function(fn, jit_compile=jit_compile, reduce_retracing=True)

        self.loss_and_gradients = compiled(self.plain_loss_and_gradients)
        self.loss_and_predictions = compiled(self._loss_and_predictions)
        self.predictions = compiled(self._predictions)

    def _forward_and_loss(self, trainable, non_trainable, metrics, x, y, sample_weight, kwargs):
        model = self.model
        old_non_trainable, old_metrics = list(non_trainable), list(metrics)
        y_pred, non_trainable, extra_losses = model.stateless_call(
            trainable, non_trainable, x, return_losses=True, **kwargs
        )
        # compute_loss reads model.losses: hand it the forward pass' ones.
        with internals.losses_override(model, extra_losses):
            loss, (_, non_trainable, metrics) = model.stateless_compute_loss(
                trainable,
                non_trainable,
                metrics,
                x=x,
                y=y,
                y_pred=y_pred,
                sample_weight=sample_weight,
                training=kwargs.get("training", True),
            )
        check_state_unchanged_in_length("metrics_variables", old_metrics, metrics)
        non_trainable = changed(old_non_trainable, non_trainable)
        metrics = changed(old_metrics, metrics)
        return loss, y_pred, non_trainable, metrics

    def plain_loss_and_gradients(self, trainable, non_trainable, metrics, loss_scale, x, y, sw):
        with tf.GradientTape() as tape:
            tape.watch(trainable)
            loss, y_pred, non_trainable, metrics = self._forward_and_loss(
                trainable, non_trainable, metrics, x, y, sw, self._call_kwargs
            )
            scaled_loss = loss * tf.cast(loss_scale, loss.dtype)
        gradients = tape.gradient(scaled_loss, trainable)
        return loss, gradients, y_pred, non_trainable, metrics

    def _loss_and_predictions(self, trainable, non_trainable, metrics, x, y, sw):
        loss, y_pred, non_trainable, metrics = self._forward_and_loss(
            trainable, non_trainable, metrics, x, y, sw, self._eval_kwargs
        )
        return loss, y_pred, non_trainable, metrics

    def _predictions(self, trainable, non_trainable, x):
        old_non_trainable = list(non_trainable)
        y_pred, non_trainable = self.model.stateless_call(
            trainable, non_trainable, x, **self._eval_kwargs
        )
        # Seeded layers that draw at inference (Keras' predict advances their state too).
        return y_pred, changed(old_non_trainable, non_trainable)
