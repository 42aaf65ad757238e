"""The pure functions each replica compiles: forward pass, loss, gradients, predictions.

A core receives the values of the model's trainable, non-trainable and metric
variables as tensors, runs `model.stateless_call` and the compiled loss (under
a `GradientTape` when training), and returns the loss, the gradients, the
predictions and the new values of the non-trainable and metric variables that
changed (BatchNormalization statistics, RNG state, per-output loss trackers).
Because it captures no variable, each replica compiles and runs it on its own
device (`tf.function(jit_compile=True)`); the steps around it
(`noisy_keras.engine.steps`) write the values back and apply the update.

A gradient method (`noisy_keras.engine.methods`: SAM, the gradient-norm
penalty) replaces the train core by one that runs the plain core twice inside
the same compiled function (`method_loss_and_gradients`): once at w, whose
loss, predictions and state changes the step keeps (BatchNormalization's
statistics and the metrics move once per step, at w), and once at the shifted
weights, whose gradients it combines (`noisy_keras.optim.sharpness`). The
second pass starts from the same state as the first, so a dropout layer draws
the same masks in both.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from noisy_keras import _keras_internals as internals
from noisy_keras._structures import dense_all, replica_in_sync
from noisy_keras.engine.state import changed, check_state_unchanged_in_length
from noisy_keras.optim import sharpness

__all__ = ["METHOD_ATTRIBUTE", "StatelessCores", "gradient_method"]

METHOD_ATTRIBUTE = "_noisy_keras_gradient_method"
"""Name of the model attribute holding its gradient method (`noisy_keras.engine.methods`)."""


def gradient_method(model: keras.Model):
    """The model's active gradient method (`SAM`, `GradientNormPenalty`), or None.

    A method with a zero setting (rho = 0, lambda = 0) is inactive: the plain
    core runs, bit for bit.
    """
    method = getattr(model, METHOD_ATTRIBUTE, None)
    return method if method is not None and method.active else None


class StatelessCores:
    """The cores of one model, compiled with `jit_compile` (XLA) or as plain graphs.

    Attributes:
        loss_and_gradients, loss_and_predictions, predictions: the compiled
            train, test and predict cores.
        plain_loss_and_gradients: the train core uncompiled, for the noise
            kinds' variants (`noisy_keras.engine.hooks`), which compile their own.

    `train_core(method, num_replicas)` is the compiled train core for a
    gradient method (the plain one for None), `uncompiled_train_core` the same
    uncompiled; `method_in_force()` is the key of the step being traced.

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

        self._compiled = compiled
        self.loss_and_gradients = compiled(self.plain_loss_and_gradients)
        self._method_cores = {}
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

    def method_in_force(self) -> tuple:
        """(the model's gradient method or None, R of the replica context): a train core's key.

        Read while the step is traced, in the replica context.
        """
        return gradient_method(self.model), replica_in_sync()[1]

    def uncompiled_train_core(self, method, num_replicas: int):
        """The train core for `method` (None: the plain one) with R replicas, uncompiled."""
        if method is None:
            return self.plain_loss_and_gradients

        def method_loss_and_gradients(trainable, non_trainable, metrics, loss_scale, x, y, sw):
            return self._method_loss_and_gradients(
                method, num_replicas, trainable, non_trainable, metrics, loss_scale, x, y, sw
            )

        return method_loss_and_gradients

    def train_core(self, method, num_replicas: int):
        """The compiled train core for `method` (None: `loss_and_gradients`), one per key."""
        if method is None:
            return self.loss_and_gradients
        key = (method, num_replicas)
        if key not in self._method_cores:
            core = self.uncompiled_train_core(method, num_replicas)
            self._method_cores[key] = self._compiled(core)
        return self._method_cores[key]

    def method_cores(self) -> list:
        """The gradient methods' compiled train cores traced so far (to inspect, e.g. for XLA)."""
        return list(self._method_cores.values())

    def _method_loss_and_gradients(
        self, method, num_replicas, trainable, non_trainable, metrics, loss_scale, x, y, sw
    ):
        """Two passes of the plain core: at w (kept) and at shifted weights (module doc)."""
        core = self.plain_loss_and_gradients
        inputs = (non_trainable, metrics, loss_scale, x, y, sw)
        trainable = list(trainable)
        penalty = isinstance(method, sharpness.GradientNormPenalty)
        # c = loss scale / R: the core's gradients are c grad L (Keras divides by R).
        scale = tf.cast(loss_scale, tf.float32) / float(num_replicas)
        if penalty and method.gradient == "double_backprop":
            with tf.GradientTape() as tape:
                tape.watch(trainable)
                loss, gradients, y_pred, new_non_trainable, new_metrics = core(trainable, *inputs)
                gradients = dense_all(gradients)
                # c (L + lambda |grad L|^2) = scaled loss + lambda |c grad L|^2 / c.
                objective = tf.cast(loss, tf.float32) * tf.cast(loss_scale, tf.float32)
                objective += method.strength * tf.square(sharpness.global_norm(gradients)) / scale
            gradients = tape.gradient(objective, trainable)
            return loss, gradients, y_pred, new_non_trainable, new_metrics
        loss, gradients, y_pred, new_non_trainable, new_metrics = core(trainable, *inputs)
        gradients = dense_all(gradients)
        # SAM's e, or the finite difference's h g = epsilon g / |g| (SAM's e at radius epsilon).
        if penalty:
            shift = sharpness.sam_perturbation(gradients, trainable, rho=method.epsilon)
        else:
            shift = sharpness.sam_perturbation(
                gradients, trainable, rho=method.rho, adaptive=method.adaptive, eta=method.eta
            )
        shifted = [w if d is None else w + d for w, d in zip(trainable, shift, strict=True)]
        shifted_gradients = dense_all(core(shifted, *inputs)[1])
        if penalty:
            gradients = sharpness.finite_difference_penalty_gradients(
                gradients,
                shifted_gradients,
                strength=method.strength,
                epsilon=method.epsilon,
                gradient_scale=scale,
            )
        else:
            gradients = shifted_gradients
        return loss, gradients, y_pred, new_non_trainable, new_metrics

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
