"""Reaching a noise wrapper through the wrappers around it.

Under the 'mixed_float16' policy `model.compile` wraps the optimizer in Keras'
`LossScaleOptimizer`, so `model.optimizer` is not the noise wrapper itself.
Keras' wrappers and this package's all name the optimizer they wrap
`inner_optimizer`; `optimizer_chain` is the one walk of that chain, and the
rest of the package finds what it needs with it.
"""

from __future__ import annotations

import keras

from noisy_keras.noise.optimizer import GradientNoiseWrapper

__all__ = [
    "current_noise_stddev",
    "find_noisy_optimizer",
    "find_wrapper",
    "optimizer_accumulation_steps",
    "optimizer_chain",
]


def find_noisy_optimizer(optimizer) -> GradientNoiseWrapper | None:
    """The noise wrapper in `optimizer` (a `NoisyOptimizer`, `MatchedNoiseOptimizer`, ...).

    Follows `inner_optimizer` through wrappers.

    Under the 'mixed_float16' policy `model.compile` wraps the optimizer in Keras'
    `LossScaleOptimizer`, so `model.optimizer` is not the `NoisyOptimizer` itself;
    this follows the chain of `inner_optimizer` attributes to it.

    Args:
        optimizer: a Keras optimizer, e.g. `model.optimizer`.

    Returns:
        The first noise wrapper in the chain, or None when there is none.

    Raises:
        ValueError: `optimizer` is not a Keras optimizer.
    """
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise ValueError(
            "optimizer must be a Keras optimizer (e.g. model.optimizer); received "
            f"{type(optimizer).__name__}."
        )
    return find_wrapper(optimizer, GradientNoiseWrapper)


def optimizer_chain(optimizer):
    """`optimizer`, then each `inner_optimizer` below it (LossScaleOptimizer, NoisyOptimizer, ...).

    The one walk of a wrapped optimizer: Keras' and this package's wrappers all
    name the optimizer they wrap `inner_optimizer`.
    """
    while optimizer is not None:
        yield optimizer
        optimizer = getattr(optimizer, "inner_optimizer", None)


def find_wrapper(optimizer, kind: type):
    """The first optimizer of class `kind` (or a subclass) in `optimizer`'s chain, or None."""
    return next((o for o in optimizer_chain(optimizer) if isinstance(o, kind)), None)


def current_noise_stddev(optimizer) -> float:
    """sigma_t of the next update, however the `NoisyOptimizer` is wrapped.

    sigma_t = sqrt(alpha / (1 + t)^gamma) at t = `iterations` (Jaiswal & Taura,
    Section 3.1), or the rule of another noise kind; the wrapper is
    found with `find_noisy_optimizer` (so `model.optimizer` works under
    'mixed_float16', where it is a `LossScaleOptimizer`).

    Args:
        optimizer: a Keras optimizer, e.g. `model.optimizer`.

    Returns:
        sigma_t as a Python float; 0.0 when the chain holds no noise wrapper
        (no noise is added).

    Raises:
        ValueError: `optimizer` is not a Keras optimizer.

    Example:
        >>> keras.config.set_dtype_policy("mixed_float16")
        >>> model.compile(optimizer=NoisyOptimizer(keras.optimizers.SGD(0.1)), loss=...)
        >>> current_noise_stddev(model.optimizer)   # model.optimizer is a LossScaleOptimizer
        0.0031622776
    """
    noisy = find_noisy_optimizer(optimizer)
    return 0.0 if noisy is None else float(noisy.noise_stddev)


def optimizer_accumulation_steps(optimizer) -> int | None:
    """Keras' `gradient_accumulation_steps` set anywhere in an optimizer chain (None: none).

    Follows `inner_optimizer` through wrappers (LossScaleOptimizer, NoisyOptimizer).
    """
    for link in optimizer_chain(optimizer):
        k = getattr(link, "gradient_accumulation_steps", None)
        if k:
            return int(k)
    return None
