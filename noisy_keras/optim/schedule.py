"""The learning rate per optimizer step: warm-up, then the paper's step decay, as a Keras schedule.

`WarmupStepDecay` is the Keras `LearningRateSchedule` that combines the rules of
`optim.lr` (a function of the optimizer's step, usable inside `tf.function` and
XLA); `learning_rate_at` is the same rule in plain Python, so tests and logs can
compare the two; `paper_schedule` scales, warms up and decays as Jaiswal & Taura do.

References:
    Jaiswal & Taura, "Overcoming Generalization Gap in Large Mini-Batch
    Training of Deep Neural Networks".
    Goyal et al. 2017, "Accurate, Large Minibatch SGD: Training ImageNet in
    1 Hour", https://arxiv.org/abs/1706.02677.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import keras
from keras import ops

from noisy_keras._validation import check_positive_int, check_positive_number, is_number
from noisy_keras.optim.lr import (
    DEFAULT_DECAY_EPOCHS,
    DEFAULT_DECAY_EVERY,
    DEFAULT_DECAY_FACTOR,
    check_decay_args,
    scale_learning_rate,
    step_decay_multiplier,
    warmup_learning_rate,
    warmup_steps,
)

__all__ = ["WarmupStepDecay", "learning_rate_at", "paper_schedule"]


def learning_rate_at(
    step: int,
    *,
    peak_learning_rate: float,
    steps_per_epoch: int,
    warmup_epochs: float = 0,
    warmup_start_learning_rate: float | None = None,
    decay_factor: float = DEFAULT_DECAY_FACTOR,
    decay_epochs: Sequence[int] = DEFAULT_DECAY_EPOCHS,
    decay_every: int | None = DEFAULT_DECAY_EVERY,
) -> float:
    """Plain-Python value of `WarmupStepDecay` at an optimizer step.

    ``lr(step) = warmup_learning_rate(step) * step_decay_multiplier(step //
    steps_per_epoch)``, with a warm-up of ``round(warmup_epochs *
    steps_per_epoch)`` steps starting from `warmup_start_learning_rate` (0.0
    when None).

    Args:
        step: optimizer step, an integer >= 0 (0 for the first update).
        peak_learning_rate: learning rate after warm-up and before any decay.
        steps_per_epoch: optimizer steps per epoch, an integer >= 1.
        warmup_epochs: warm-up length in epochs (may be fractional), >= 0.
        warmup_start_learning_rate: learning rate at step 0 of the warm-up.
        decay_factor: multiplier per decay boundary, in (0, 1].
        decay_epochs: listed decay boundaries in epochs.
        decay_every: period of the boundaries after the last listed one, or None.

    Returns:
        The learning rate used by the update at `step`.
    """
    schedule = WarmupStepDecay(
        peak_learning_rate,
        steps_per_epoch,
        warmup_epochs=warmup_epochs,
        warmup_start_learning_rate=warmup_start_learning_rate,
        decay_factor=decay_factor,
        decay_epochs=decay_epochs,
        decay_every=decay_every,
    )
    return schedule.value_at(step)


@keras.saving.register_keras_serializable(package="noisy_keras")
class WarmupStepDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up followed by the paper's step decay, per optimizer step.

    ``lr(step) = ramp(step) * decay_factor ** num_decays(step // steps_per_epoch)``
    where ``ramp`` rises linearly from `warmup_start_learning_rate` at step 0 to
    `peak_learning_rate` at ``round(warmup_epochs * steps_per_epoch)`` and stays
    there (Goyal et al. 2017), and the decay boundaries are `decay_epochs` then
    every `decay_every` epochs (Jaiswal & Taura: 25, 40, 50, 60, ...).

    The schedule is built from `keras.ops` without Python branches on tensors,
    so it runs inside `tf.function(jit_compile=True)`. `value_at(step)` gives
    the same value in plain Python.

    Args:
        peak_learning_rate: learning rate after warm-up, before decay (usually
            `scale_learning_rate(base, B, B0)`), > 0.
        steps_per_epoch: optimizer steps per epoch, an integer >= 1.
        warmup_epochs: warm-up length in epochs, >= 0 (0 = no warm-up).
        warmup_start_learning_rate: learning rate at step 0 when warming up.
            Goyal et al. start from the unscaled base learning rate; None
            means 0.0. Must be None when `warmup_epochs` is 0.
        decay_factor: multiplier per decay boundary in (0, 1]. 0.9 (default)
            reads the paper's "decaying by 10%" as a 10% decrease; 0.1 is the
            divide-by-10 reading; 1.0 disables decay.
        decay_epochs: strictly increasing epochs (0-based index of the first
            epoch that uses the decayed rate) at which to decay.
        decay_every: period in epochs after the last of `decay_epochs`, or None
            for no periodic decay.
        name: name of the schedule.

    Example:
        >>> schedule = WarmupStepDecay(0.04, steps_per_epoch=100, warmup_epochs=5,
        ...                            warmup_start_learning_rate=0.01)
        >>> optimizer = keras.optimizers.SGD(learning_rate=schedule, momentum=0.9)
    """

    def __init__(
        self,
        peak_learning_rate: float,
        steps_per_epoch: int,
        warmup_epochs: float = 0,
        warmup_start_learning_rate: float | None = None,
        decay_factor: float = DEFAULT_DECAY_FACTOR,
        decay_epochs: Sequence[int] = DEFAULT_DECAY_EPOCHS,
        decay_every: int | None = DEFAULT_DECAY_EVERY,
        name: str = "warmup_step_decay",
    ):
        super().__init__()
        check_positive_number("peak_learning_rate", peak_learning_rate)
        check_positive_int("steps_per_epoch", steps_per_epoch)
        if not is_number(warmup_epochs) or not math.isfinite(warmup_epochs) or warmup_epochs < 0:
            raise ValueError(
                f"warmup_epochs must be a finite number >= 0; received warmup_epochs="
                f"{warmup_epochs!r}."
            )
        if warmup_start_learning_rate is not None:
            if warmup_epochs == 0:
                raise ValueError(
                    "warmup_start_learning_rate is only used with warmup_epochs > 0; received "
                    f"warmup_start_learning_rate={warmup_start_learning_rate!r} with "
                    "warmup_epochs=0."
                )
            if (
                not is_number(warmup_start_learning_rate)
                or not math.isfinite(warmup_start_learning_rate)
                or warmup_start_learning_rate < 0
            ):
                raise ValueError(
                    "warmup_start_learning_rate must be a finite number >= 0 or None; received "
                    f"warmup_start_learning_rate={warmup_start_learning_rate!r}."
                )
        self.decay_epochs = check_decay_args(decay_factor, decay_epochs, decay_every)
        self.peak_learning_rate = float(peak_learning_rate)
        self.steps_per_epoch = int(steps_per_epoch)
        self.warmup_epochs = warmup_epochs
        self.warmup_start_learning_rate = (
            None if warmup_start_learning_rate is None else float(warmup_start_learning_rate)
        )
        self.decay_factor = float(decay_factor)
        self.decay_every = None if decay_every is None else int(decay_every)
        self.name = name
        self.warmup_steps = warmup_steps(warmup_epochs, self.steps_per_epoch)

    @property
    def _start(self) -> float:
        return 0.0 if self.warmup_start_learning_rate is None else self.warmup_start_learning_rate

    def value_at(self, step: int) -> float:
        """The learning rate at optimizer step `step`, in plain Python."""
        warm = warmup_learning_rate(
            step,
            start_learning_rate=self._start,
            peak_learning_rate=self.peak_learning_rate,
            warmup_steps=self.warmup_steps,
        )
        epoch = step // self.steps_per_epoch
        return warm * step_decay_multiplier(
            epoch, self.decay_factor, self.decay_epochs, self.decay_every
        )

    def __call__(self, step):
        step = ops.cast(step, "int64")
        epoch = ops.floor_divide(step, self.steps_per_epoch)
        decays = ops.zeros((), "int64")
        for boundary in self.decay_epochs:
            decays = decays + ops.cast(ops.greater_equal(epoch, boundary), "int64")
        if self.decay_every is not None:
            last = self.decay_epochs[-1] if self.decay_epochs else 0
            periodic = ops.floor_divide(epoch - last, self.decay_every)
            decays = decays + ops.where(
                ops.greater_equal(epoch, last + self.decay_every), periodic, 0
            )
        multiplier = ops.power(
            ops.convert_to_tensor(self.decay_factor, "float32"), ops.cast(decays, "float32")
        )
        learning_rate = ops.convert_to_tensor(self.peak_learning_rate, "float32")
        if self.warmup_steps > 0:
            fraction = ops.minimum(ops.cast(step, "float32") / float(self.warmup_steps), 1.0)
            learning_rate = self._start + (self.peak_learning_rate - self._start) * fraction
        return learning_rate * multiplier

    def get_config(self) -> dict:
        return {
            "peak_learning_rate": self.peak_learning_rate,
            "steps_per_epoch": self.steps_per_epoch,
            "warmup_epochs": self.warmup_epochs,
            "warmup_start_learning_rate": self.warmup_start_learning_rate,
            "decay_factor": self.decay_factor,
            "decay_epochs": list(self.decay_epochs),
            "decay_every": self.decay_every,
            "name": self.name,
        }

    @classmethod
    def from_config(cls, config: dict) -> WarmupStepDecay:
        config = dict(config)
        config["decay_epochs"] = tuple(config.get("decay_epochs", DEFAULT_DECAY_EPOCHS))
        return cls(**config)


def paper_schedule(
    *,
    base_learning_rate: float,
    batch_size: int,
    base_batch_size: int,
    steps_per_epoch: int,
    rule: str = "linear",
    warmup_epochs: float = 0,
    decay_factor: float = DEFAULT_DECAY_FACTOR,
    decay_epochs: Sequence[int] = DEFAULT_DECAY_EPOCHS,
    decay_every: int | None = DEFAULT_DECAY_EVERY,
) -> WarmupStepDecay:
    """The full recipe: scale the base learning rate, warm up to it, step-decay.

    Peak = `scale_learning_rate(base_learning_rate, batch_size, base_batch_size,
    rule)`; with `warmup_epochs > 0` the ramp starts at the unscaled
    `base_learning_rate`, as in Goyal et al. 2017.

    Args:
        base_learning_rate: learning rate tuned at `base_batch_size`.
        batch_size: global batch size of this run.
        base_batch_size: batch size the base learning rate belongs to.
        steps_per_epoch: optimizer steps per epoch.
        rule: scaling rule, one of `SCALING_RULES`.
        warmup_epochs: warm-up length in epochs (0 = none).
        decay_factor: step-decay multiplier per boundary.
        decay_epochs: listed step-decay boundaries in epochs.
        decay_every: period of the boundaries after the last listed one, or None.

    Returns:
        A `WarmupStepDecay` schedule.
    """
    peak = scale_learning_rate(base_learning_rate, batch_size, base_batch_size, rule)
    return WarmupStepDecay(
        peak,
        steps_per_epoch,
        warmup_epochs=warmup_epochs,
        warmup_start_learning_rate=float(base_learning_rate) if warmup_epochs > 0 else None,
        decay_factor=decay_factor,
        decay_epochs=decay_epochs,
        decay_every=decay_every,
    )
