"""The benchmark workloads: a model from the registry at a batch size, with its data and step."""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from noisy_keras.data import datasets
from noisy_keras.models import zoo as models


@dataclasses.dataclass(frozen=True)
class Workload:
    """A registry model and its global batch: `cnn` or `mlp` on digits, the others synthetic."""

    model: str
    batch_size: int


DIGITS_CNN = "cnn"
DIGITS_MLP = "mlp"  # the smoke run's model: the fastest to compile
RESNET20 = "resnet20"
INPUT_SHAPES = {
    "mlp": (8, 8, 1),
    "cnn": (8, 8, 1),
    "cnn1d": (40, 1),
    "cnn1d_bn": (40, 1),
    "resnet20": (32, 32, 3),
    "resnet50": (32, 32, 3),
}
"""Each registry model's input in the benchmarks: digits, MNIST-1D signals, 32 px RGB."""


def batch_arrays(workload: Workload, num_batches: int = 1):
    """(x, y) as NumPy arrays of num_batches * batch_size examples.

    `cnn`, `mlp`: the digits training examples in a fixed order (real data,
    normalized as in training), from the first again after all 1,347.
    `cnn1d`, `cnn1d_bn`, `resnet20`, `resnet50`: uniform [0, 1) inputs of `INPUT_SHAPES`
    and uniform labels of 10 classes, from a fixed seed (the step time does not
    depend on the values).
    """
    n = num_batches * workload.batch_size
    if workload.model in (DIGITS_CNN, DIGITS_MLP):
        digits = datasets.load_dataset("digits", seed=0)
        x, y = digits.train_arrays()
        order = np.arange(n) % len(y)  # large global batches (many GPUs) repeat examples
        return x[order], y[order]
    if workload.model in INPUT_SHAPES:
        rng = np.random.default_rng(0)
        return (
            rng.random((n, *INPUT_SHAPES[workload.model]), dtype=np.float32),
            rng.integers(0, 10, size=n).astype("int32"),
        )
    raise ValueError(
        f"Unknown workload model={workload.model!r}; allowed: {', '.join(INPUT_SHAPES)}."
    )


def build_workload_model(workload: Workload) -> keras.Model:
    """The workload's model for inputs of `INPUT_SHAPES`, 10 classes, seed 0."""
    input_shape = INPUT_SHAPES[workload.model]
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
