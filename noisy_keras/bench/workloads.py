"""The benchmark workloads: a model from the registry at a batch size, with its data and step."""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from noisy_keras import datasets, models


@dataclasses.dataclass(frozen=True)
class Workload:
    """A model and its batch size: `cnn` or `mlp` on digits, `resnet20` on synthetic images."""

    model: str
    batch_size: int


DIGITS_CNN = "cnn"
DIGITS_MLP = "mlp"  # the smoke run's model: the fastest to compile
RESNET20 = "resnet20"


def batch_arrays(workload: Workload, num_batches: int = 1):
    """(x, y) as NumPy arrays of num_batches * batch_size examples.

    `cnn`, `mlp`: the first digits training examples in a fixed order (real
    data, normalized as in training; up to the 1,347 training examples).
    `resnet20`: uniform [0, 1) 32x32x3 images and uniform labels of 10
    classes, from a fixed seed (the step time does not depend on the values).
    """
    n = num_batches * workload.batch_size
    if workload.model in (DIGITS_CNN, DIGITS_MLP):
        digits = datasets.load_dataset("digits", seed=0)
        x, y = digits.train_arrays()
        if n > len(y):
            raise ValueError(
                f"batch_size * batches = {n} exceeds the {len(y)} digits training examples; "
                f"allowed: batch_size <= {len(y) // num_batches}."
            )
        return x[:n], y[:n]
    if workload.model == RESNET20:
        rng = np.random.default_rng(0)
        return (
            rng.random((n, 32, 32, 3), dtype=np.float32),
            rng.integers(0, 10, size=n).astype("int32"),
        )
    raise ValueError(
        f"Unknown workload model={workload.model!r}; allowed: {DIGITS_CNN!r}, {DIGITS_MLP!r}, "
        f"{RESNET20!r}."
    )


def build_workload_model(workload: Workload) -> keras.Model:
    """The workload's model: 8x8x1 digits inputs, or 32x32x3 for resnet20; 10 classes."""
    input_shape = (32, 32, 3) if workload.model == RESNET20 else (8, 8, 1)
    return models.build_model(workload.model, input_shape=input_shape, num_classes=10, seed=0)


def inner_optimizer(name: str) -> keras.optimizers.Optimizer:
    """SGD with momentum 0.9 (lr 0.01) or Adam (lr 1e-3) by name."""
    if name == "momentum":
        return keras.optimizers.SGD(learning_rate=0.01, momentum=0.9)
    if name == "adam":
        return keras.optimizers.Adam(learning_rate=1e-3)
    raise ValueError(f"Unknown optimizer={name!r}; allowed: 'momentum', 'adam'.")


def train_step(model, optimizer, jit_compile: bool):
    """One SGD step as a `tf.function`: forward, loss, gradients, `optimizer.apply`.

    The whole step, optimizer update and noise included, is one XLA
    computation when `jit_compile` is True (what `model.compile(jit_compile=
    True)` does on one device).
    """
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function(jit_compile=jit_compile)
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        return loss

    return step


def count_parameters(model) -> int:
    """Trainable parameters of `model`."""
    return int(sum(int(v.shape.num_elements()) for v in model.trainable_variables))
