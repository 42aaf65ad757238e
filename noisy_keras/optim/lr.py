"""Learning-rate rules for large mini-batch training.

Three rules, each a small pure function, and one Keras schedule that combines
them per optimizer step:

* **Scaling with the batch size.** `scale_learning_rate` multiplies a learning
  rate tuned at `base_batch_size` by `B / B0` ("linear", Goyal et al. 2017) or
  `sqrt(B / B0)` ("sqrt", Hoffer et al. 2017), or leaves it ("none").
* **Gradual warm-up** (Goyal et al. 2017, Sec. 2.2). Over the first
  `warmup_epochs` the learning rate rises linearly, step by step, from the
  unscaled base learning rate to the scaled one.
* **Step decay** (Jaiswal & Taura, Sec. 5): "decaying the learning rates by 10%
  at 25, 40 epochs and every 10 epochs after that". We read "by 10%" as a 10%
  decrease: the learning rate is multiplied by `decay_factor=0.9` at each
  boundary. The other reading, dividing by 10, is `decay_factor=0.1`.

`WarmupStepDecay` is the Keras `LearningRateSchedule` (a function of the
optimizer's step, usable inside `tf.function` and XLA); `learning_rate_at` is
the same rule in plain Python, so tests and logs can compare the two.

Epochs are counted from 0: during epoch `e` (0-based, `e = step //
steps_per_epoch`), the number of decays applied is the number of boundaries
`b <= e`. So with the default boundaries the first decay takes effect at the
start of epoch index 25, i.e. after 25 complete epochs.

References:
    Jaiswal & Taura, "Overcoming Generalization Gap in Large Mini-Batch
    Training of Deep Neural Networks".
    Goyal et al. 2017, "Accurate, Large Minibatch SGD: Training ImageNet in
    1 Hour", https://arxiv.org/abs/1706.02677.
    Hoffer, Hubara & Soudry 2017, "Train longer, generalize better: closing the
    generalization gap in large batch training of neural networks",
    https://arxiv.org/abs/1705.08741.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import keras
from keras import ops

from noisy_keras._validation import check_int
from noisy_keras.optim.registry import LR_SCALING_RULES

SCALING_RULES = LR_SCALING_RULES
"""Names accepted by `scale_learning_rate(rule=...)`."""

DEFAULT_DECAY_EPOCHS = (25, 40)
DEFAULT_DECAY_EVERY = 10
DEFAULT_DECAY_FACTOR = 0.9


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_positive_number(name: str, value) -> None:
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0; received {name}={value!r}.")


def _check_positive_int(name: str, value) -> None:
    check_int(name, value, 1)


def scale_learning_rate(
    base_learning_rate: float, batch_size: int, base_batch_size: int, rule: str = "linear"
) -> float:
    """Scales a learning rate tuned at `base_batch_size` to `batch_size`.

    * ``"linear"`` (Goyal et al. 2017): ``lr = base_learning_rate * B / B0``.
    * ``"sqrt"`` (Hoffer et al. 2017): ``lr = base_learning_rate * sqrt(B / B0)``.
    * ``"none"``: ``lr = base_learning_rate``.

    Jaiswal & Taura use the linear rule (B=32 lr 0.01, B=64 lr 0.02, B=128
    lr 0.04).

    Args:
        base_learning_rate: learning rate that works at `base_batch_size`, > 0.
        batch_size: global mini-batch size B, an integer >= 1.
        base_batch_size: batch size B0 the base learning rate was tuned for.
        rule: one of `SCALING_RULES`.

    Returns:
        The scaled learning rate, a Python float.

    Raises:
        ValueError: a non-positive number or size, or an unknown rule.

    Example:
        >>> scale_learning_rate(0.01, batch_size=128, base_batch_size=32)
        0.04
    """
    _check_positive_number("base_learning_rate", base_learning_rate)
    _check_positive_int("batch_size", batch_size)
    _check_positive_int("base_batch_size", base_batch_size)
    ratio = batch_size / base_batch_size
    if rule == "linear":
        return float(base_learning_rate * ratio)
    if rule == "sqrt":
        return float(base_learning_rate * math.sqrt(ratio))
    if rule == "none":
        return float(base_learning_rate)
    raise ValueError(f"rule must be one of {SCALING_RULES}; received rule={rule!r}.")


def _validated_decay_epochs(decay_epochs) -> tuple[int, ...]:
    if isinstance(decay_epochs, str) or not isinstance(decay_epochs, Sequence):
        raise ValueError(
            "decay_epochs must be a sequence of strictly increasing integers >= 1; "
            f"received decay_epochs={decay_epochs!r}."
        )
    epochs = tuple(decay_epochs)
    if not all(_is_int(e) and e >= 1 for e in epochs) or any(
        later <= earlier for earlier, later in zip(epochs, epochs[1:], strict=False)
    ):
        raise ValueError(
            "decay_epochs must be strictly increasing integers >= 1; "
            f"received decay_epochs={decay_epochs!r}."
        )
    return tuple(int(e) for e in epochs)


def _check_decay_args(decay_factor, decay_epochs, decay_every) -> tuple[int, ...]:
    if not _is_number(decay_factor) or not 0 < decay_factor <= 1:
        raise ValueError(
            "decay_factor must be a number in (0, 1] (0.9 = decrease by 10%, 0.1 = divide "
            f"by 10, 1 = no decay); received decay_factor={decay_factor!r}."
        )
    if decay_every is not None:
        _check_positive_int("decay_every", decay_every)
    return _validated_decay_epochs(decay_epochs)


def num_decays(
    epoch: int,
    decay_epochs: Sequence[int] = DEFAULT_DECAY_EPOCHS,
    decay_every: int | None = DEFAULT_DECAY_EVERY,
) -> int:
    """Number of step-decay boundaries passed by the start of `epoch` (0-based).

    The boundaries are `decay_epochs`, then every `decay_every` epochs after the
    last of them (with the defaults: 25, 40, 50, 60, ...). With an empty
    `decay_epochs` the periodic boundaries are `decay_every, 2 * decay_every,
    ...`; `decay_every=None` keeps only the listed boundaries.

    Args:
        epoch: epoch index, counted from 0, an integer >= 0.
        decay_epochs: strictly increasing epochs (>= 1) at which to decay.
        decay_every: period in epochs after the last listed boundary, or None.

    Returns:
        The count of boundaries `b` with `b <= epoch`.
    """
    if not _is_int(epoch) or epoch < 0:
        raise ValueError(f"epoch must be an integer >= 0; received epoch={epoch!r}.")
    boundaries = _validated_decay_epochs(decay_epochs)
    if decay_every is not None:
        _check_positive_int("decay_every", decay_every)
    count = sum(1 for boundary in boundaries if epoch >= boundary)
    if decay_every is not None:
        last = boundaries[-1] if boundaries else 0
        if epoch >= last + decay_every:
            count += (epoch - last) // decay_every
    return count


def step_decay_multiplier(
    epoch: int,
    decay_factor: float = DEFAULT_DECAY_FACTOR,
    decay_epochs: Sequence[int] = DEFAULT_DECAY_EPOCHS,
    decay_every: int | None = DEFAULT_DECAY_EVERY,
) -> float:
    """The paper's step decay: ``decay_factor ** num_decays(epoch, ...)``.

    Jaiswal & Taura decay "by 10% at 25, 40 epochs and every 10 epochs after
    that"; the default `decay_factor=0.9` reads this as a 10% decrease per
    boundary (`decay_factor=0.1` is the divide-by-10 reading).

    Args:
        epoch: epoch index counted from 0.
        decay_factor: multiplier applied at each boundary, in (0, 1].
        decay_epochs: strictly increasing listed boundaries.
        decay_every: period after the last listed boundary, or None.

    Returns:
        The factor multiplying the (peak) learning rate during `epoch`.
    """
    _check_decay_args(decay_factor, decay_epochs, decay_every)
    return float(decay_factor) ** num_decays(epoch, decay_epochs, decay_every)


def warmup_learning_rate(
    step: int, *, start_learning_rate: float, peak_learning_rate: float, warmup_steps: int
) -> float:
    """Gradual warm-up (Goyal et al. 2017): a linear ramp per step.

    ``lr(step) = start + (peak - start) * min(step / warmup_steps, 1)``, so the
    first step uses `start_learning_rate` and every step from `warmup_steps` on
    uses `peak_learning_rate`. `warmup_steps=0` means no warm-up.

    Args:
        step: optimizer step (updates already applied), an integer >= 0.
        start_learning_rate: learning rate at step 0 (Goyal et al.: the
            unscaled base learning rate).
        peak_learning_rate: learning rate reached at `warmup_steps` (the scaled
            learning rate).
        warmup_steps: length of the ramp in steps, an integer >= 0.

    Returns:
        The warmed-up learning rate, a Python float.
    """
    if not _is_int(step) or step < 0:
        raise ValueError(f"step must be an integer >= 0; received step={step!r}.")
    if not _is_int(warmup_steps) or warmup_steps < 0:
        raise ValueError(
            f"warmup_steps must be an integer >= 0; received warmup_steps={warmup_steps!r}."
        )
    if warmup_steps == 0 or step >= warmup_steps:
        return float(peak_learning_rate)
    fraction = step / warmup_steps
    return float(start_learning_rate + (peak_learning_rate - start_learning_rate) * fraction)


def _warmup_steps(warmup_epochs: float, steps_per_epoch: int) -> int:
    return int(round(warmup_epochs * steps_per_epoch))


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
        _check_positive_number("peak_learning_rate", peak_learning_rate)
        _check_positive_int("steps_per_epoch", steps_per_epoch)
        if not _is_number(warmup_epochs) or not math.isfinite(warmup_epochs) or warmup_epochs < 0:
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
                not _is_number(warmup_start_learning_rate)
                or not math.isfinite(warmup_start_learning_rate)
                or warmup_start_learning_rate < 0
            ):
                raise ValueError(
                    "warmup_start_learning_rate must be a finite number >= 0 or None; received "
                    f"warmup_start_learning_rate={warmup_start_learning_rate!r}."
                )
        self.decay_epochs = _check_decay_args(decay_factor, decay_epochs, decay_every)
        self.peak_learning_rate = float(peak_learning_rate)
        self.steps_per_epoch = int(steps_per_epoch)
        self.warmup_epochs = warmup_epochs
        self.warmup_start_learning_rate = (
            None if warmup_start_learning_rate is None else float(warmup_start_learning_rate)
        )
        self.decay_factor = float(decay_factor)
        self.decay_every = None if decay_every is None else int(decay_every)
        self.name = name
        self.warmup_steps = _warmup_steps(warmup_epochs, self.steps_per_epoch)

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
