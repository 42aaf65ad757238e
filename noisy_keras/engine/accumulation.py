"""Gradient accumulation: k micro-batches per parameter update, under any strategy.

Keras' own `gradient_accumulation_steps` calls `merge_call` inside a `tf.cond`
and fails under `MirroredStrategy`; the engine accumulates instead, and this
module is the one owner of how. Each replica adds its gradients of the first
k - 1 micro-batches to replica-local (ON_READ) accumulators; the k-th
micro-batch's step applies the average (accumulated + current) / k with
`optimizer.apply`, which all-reduces it, and zeroes the accumulators. Which of
the two kinds of step runs is decided on the host (`cycle`), so no
synchronisation point sits inside control flow.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import keras
import tensorflow as tf

__all__ = ["GradientAccumulator", "cycle"]


class GradientAccumulator:
    """Replica-local sums of the gradients of one model's trainable variables.

    Args:
        model: the model; the accumulators are made in its strategy's scope.
        accumulation_steps: k >= 2, micro-batches per update.
    """

    def __init__(self, model: keras.Model, accumulation_steps: int):
        self.accumulation_steps = accumulation_steps
        with model.distribute_strategy.scope():
            self.variables = [
                tf.Variable(
                    tf.zeros(v.shape, v.dtype),
                    trainable=False,
                    synchronization=tf.VariableSynchronization.ON_READ,
                    aggregation=tf.VariableAggregation.SUM,
                    name="gradient_accumulator",
                )
                for v in model.trainable_variables
            ]

    def add(self, gradients: Sequence) -> None:
        """Adds this replica's gradients of one of the first k - 1 micro-batches."""
        for accumulator, g in zip(self.variables, gradients, strict=True):
            if g is not None:
                accumulator.assign_add(g)

    def average(self, gradients: Sequence) -> list:
        """(accumulated + `gradients`) / k for the k-th micro-batch; the sums are then zeroed."""
        k = float(self.accumulation_steps)
        averaged = [
            None if g is None else (accumulator.read_value() + g) / k
            for accumulator, g in zip(self.variables, gradients, strict=True)
        ]
        with tf.control_dependencies([a for a in averaged if a is not None]):
            for accumulator in self.variables:
                accumulator.assign(tf.zeros_like(accumulator))
        return averaged


def cycle(functions: Sequence[Callable]) -> Callable:
    """A train function whose s-th call runs `functions[s mod k]` (k = len(functions)).

    The engine makes it at the start of `fit`, and its checkpoints fall between
    updates, so s mod k = 0 at every restored `optimizer.iterations`, as in the
    uninterrupted run.
    """
    k = len(functions)
    steps_taken = [0]

    def train_function(iterator):
        step = functions[steps_taken[0] % k]
        steps_taken[0] += 1
        return step(iterator)

    return train_function
