"""Learning-rate rules for large mini-batch training.

Three rules, each a small pure function (`optim.schedule` combines them per
optimizer step in a Keras schedule):

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
from collections.abc import Sequence

from noisy_keras._validation import check_positive_int, check_positive_number, is_int, is_number
from noisy_keras.optim.registry import LR_SCALING_RULES

SCALING_RULES = LR_SCALING_RULES
"""Names accepted by `scale_learning_rate(rule=...)`."""

DEFAULT_DECAY_EPOCHS = (25, 40)
DEFAULT_DECAY_EVERY = 10
DEFAULT_DECAY_FACTOR = 0.9


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
    check_positive_number("base_learning_rate", base_learning_rate)
    check_positive_int("batch_size", batch_size)
    check_positive_int("base_batch_size", base_batch_size)
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
    if not all(is_int(e) and e >= 1 for e in epochs) or any(
        later <= earlier for earlier, later in zip(epochs, epochs[1:], strict=False)
    ):
        raise ValueError(
            "decay_epochs must be strictly increasing integers >= 1; "
            f"received decay_epochs={decay_epochs!r}."
        )
    return tuple(int(e) for e in epochs)


def check_decay_args(decay_factor, decay_epochs, decay_every) -> tuple[int, ...]:
    if not is_number(decay_factor) or not 0 < decay_factor <= 1:
        raise ValueError(
            "decay_factor must be a number in (0, 1] (0.9 = decrease by 10%, 0.1 = divide "
            f"by 10, 1 = no decay); received decay_factor={decay_factor!r}."
        )
    if decay_every is not None:
        check_positive_int("decay_every", decay_every)
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
    if not is_int(epoch) or epoch < 0:
        raise ValueError(f"epoch must be an integer >= 0; received epoch={epoch!r}.")
    boundaries = _validated_decay_epochs(decay_epochs)
    if decay_every is not None:
        check_positive_int("decay_every", decay_every)
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
    check_decay_args(decay_factor, decay_epochs, decay_every)
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
    if not is_int(step) or step < 0:
        raise ValueError(f"step must be an integer >= 0; received step={step!r}.")
    if not is_int(warmup_steps) or warmup_steps < 0:
        raise ValueError(
            f"warmup_steps must be an integer >= 0; received warmup_steps={warmup_steps!r}."
        )
    if warmup_steps == 0 or step >= warmup_steps:
        return float(peak_learning_rate)
    fraction = step / warmup_steps
    return float(start_learning_rate + (peak_learning_rate - start_learning_rate) * fraction)


def warmup_steps(warmup_epochs: float, steps_per_epoch: int) -> int:
    return int(round(warmup_epochs * steps_per_epoch))
