"""Gradient methods on a model: SAM, adaptive SAM and the gradient-norm penalty.

SAM and the gradient-norm penalty need a second forward and backward pass of
the same batch at shifted weights, which an optimizer cannot do: Keras hands
`apply_gradients` the gradients, not the batch. They are therefore a change of
the model's training step, not an optimizer wrapper. `enable_sam(model, ...)`
and `enable_gradient_norm_penalty(model, ...)` attach the method to a compiled
model; the engine's per-replica step (`noisy_keras.engine.steps`, installed by
these functions when it is not there yet, with XLA as the model was compiled)
runs both passes inside one compiled core (`noisy_keras.engine.cores`) and
hands the combined gradient to the model's optimizer, whichever it is.

Order with the noise wrappers: the optimizer receives the method's gradient,
so `NoisyOptimizer` (or any noise kind) adds its noise to the SAM or penalized
gradient, after clipping, as to a plain one; multiplicative noise weights the
examples of both passes alike. Each replica perturbs by its own batch
(`noisy_keras.optim.sharpness.SAM`: m-sharpness with m = B / (k R)).
"""

from __future__ import annotations

import keras

from noisy_keras.engine import steps
from noisy_keras.engine.cores import METHOD_ATTRIBUTE, gradient_method
from noisy_keras.optim.sharpness import SAM, GradientNormPenalty

__all__ = [
    "disable_gradient_method",
    "enable_gradient_method",
    "enable_gradient_norm_penalty",
    "enable_sam",
    "gradient_method",
]


def enable_gradient_method(model: keras.Model, method) -> keras.Model:
    """Attaches a gradient method (`SAM` or `GradientNormPenalty` settings) to `model`.

    Installs the engine's step (`enable_replica_xla`, with `jit_compile` as the
    model was compiled) if the model has none yet; a model already under the
    engine keeps its layout (replicas, accumulation steps). A method already
    attached is replaced. Call it after `model.compile(...)`, on a built model,
    inside the strategy's scope when there is one.

    Args:
        model: a built, compiled `keras.Model`.
        method: a `noisy_keras.optim.sharpness.SAM` or `GradientNormPenalty`.

    Returns:
        `model`, patched in place.

    Raises:
        ValueError: `method` is not one of the two, or the model is not one the
            engine can drive (`enable_replica_xla` names why); nothing is changed.
    """
    if not isinstance(method, (SAM, GradientNormPenalty)):
        raise ValueError(
            "method must be a noisy_keras.optim.sharpness.SAM or GradientNormPenalty; "
            f"received method={method!r}."
        )
    if steps.replica_steps(model) is None:
        steps.enable_replica_xla(model, jit_compile=bool(getattr(model, "jit_compile", False)))
    object.__setattr__(model, METHOD_ATTRIBUTE, method)
    model.train_function = None  # the next fit traces the method's step
    return model


def enable_sam(
    model: keras.Model, *, rho: float = 0.05, adaptive: bool = False, eta: float = 0.01
) -> keras.Model:
    """Trains `model` with sharpness-aware minimization (Foret et al. 2021; Kwon et al. 2021).

    Each update applies grad L(w + e), e = rho g / |g| (adaptive: rho T_w^2 g /
    |T_w g|, T_w = |w| + eta), g the gradient of the replica's batch at w; the
    loss, metrics and BatchNormalization statistics are those of the pass at
    w. Costs a second forward and backward pass per step.

    Args:
        model: a built, compiled `keras.Model`; its optimizer (any, noise
            wrappers included) applies the SAM gradient.
        rho: the radius, >= 0 (0 trains as without SAM, bit for bit).
        adaptive: adaptive SAM.
        eta: T_w's offset, >= 0 (adaptive only).

    Returns:
        `model`, patched in place.

    Raises:
        ValueError: a bad argument (named), or a model the engine cannot drive.

    Example:
        >>> model.compile(optimizer=NoisyOptimizer(keras.optimizers.SGD(0.1)), loss="mse")
        >>> enable_sam(model, rho=0.05)
        >>> model.fit(x, y)  # noise is added to the SAM gradient
    """
    return enable_gradient_method(model, SAM(rho=rho, adaptive=adaptive, eta=eta))


def enable_gradient_norm_penalty(
    model: keras.Model,
    *,
    strength: float,
    gradient: str = "finite_difference",
    epsilon: float = 0.01,
) -> keras.Model:
    """Trains `model` on L + lambda |grad L|^2 (Smith et al. 2021; Geiping et al. 2022).

    Each update applies g + 2 lambda H g, by a finite difference along g of
    length epsilon (default, Geiping et al.) or by differentiating through the
    gradient ("double_backprop"); see `noisy_keras.optim.sharpness`.

    Args:
        model: a built, compiled `keras.Model`.
        strength: lambda >= 0 (0 trains as without the penalty, bit for bit).
        gradient: "finite_difference" or "double_backprop".
        epsilon: the finite difference's step length, > 0.

    Returns:
        `model`, patched in place.

    Raises:
        ValueError: a bad argument (named), or a model the engine cannot drive.
    """
    method = GradientNormPenalty(strength=strength, gradient=gradient, epsilon=epsilon)
    return enable_gradient_method(model, method)


def disable_gradient_method(model: keras.Model) -> keras.Model:
    """Removes the gradient method from `model` (the engine's step stays, plain)."""
    if getattr(model, METHOD_ATTRIBUTE, None) is not None:
        object.__setattr__(model, METHOD_ATTRIBUTE, None)
        model.train_function = None
    return model
