"""LARS: layer-wise adaptive rate scaling, a Keras 3 optimizer for very large batches.

References:
    Y. You, I. Gitman and B. Ginsburg, "Large Batch Training of Convolutional
    Networks", arXiv:1708.03888, 2017. The update follows the LARS optimizer of
    the TensorFlow Model Garden (`official/modeling/optimization/lars.py`).
"""

from __future__ import annotations

import re

import keras
from keras import ops

from noisy_keras._structures import dense
from noisy_keras._validation import check_number


def l2_norm(x):
    """||x||_2 = sqrt(sum_i x_i^2) over all entries of `x` (a scalar tensor)."""
    return ops.sqrt(ops.sum(ops.square(x)))


def trust_ratio(eeta, weight_norm, direction_norm):
    """LARS' local learning-rate factor: eeta * ||w|| / ||d|| if both norms are > 0, else 1.

    `d` is the direction the update scales: the decayed gradient g + beta * w with
    classic momentum, the momentum update otherwise (You et al., 2017, Eq. 6 and
    Algorithm 1). A zero weight or a zero direction gives 1, never a NaN.
    """
    both_positive = ops.logical_and(weight_norm > 0, direction_norm > 0)
    safe_norm = ops.where(both_positive, direction_norm, ops.ones_like(direction_norm))
    return ops.where(both_positive, eeta * weight_norm / safe_norm, ops.ones_like(weight_norm))


def lars_update(
    param,
    grad,
    velocity,
    learning_rate,
    *,
    momentum,
    eeta,
    weight_decay_rate,
    nesterov,
    classic_momentum,
    layer_adaptation,
):
    """One LARS step on one variable; returns (new_param, new_velocity).

    With g' = g + weight_decay_rate * w, m = momentum and lr = learning_rate:
        classic:  trust = trust_ratio(eeta, ||w||, ||g'||)
                  v <- m * v + lr * trust * g'
                  w <- w - v                (Nesterov: w <- w - (m * v + lr * trust * g'))
        other:    v <- m * v + g'
                  u = v                     (Nesterov: u = m * v + g')
                  w <- w - lr * trust_ratio(eeta, ||w||, ||u||) * u
    trust = 1 when `layer_adaptation` is False.
    """
    if weight_decay_rate:
        grad = grad + weight_decay_rate * param
    if classic_momentum:
        scaled_lr = learning_rate
        if layer_adaptation:
            scaled_lr = learning_rate * trust_ratio(eeta, l2_norm(param), l2_norm(grad))
        new_velocity = momentum * velocity + scaled_lr * grad
        update = momentum * new_velocity + scaled_lr * grad if nesterov else new_velocity
        return param - update, new_velocity
    new_velocity = momentum * velocity + grad
    update = momentum * new_velocity + grad if nesterov else new_velocity
    scaled_lr = learning_rate
    if layer_adaptation:
        scaled_lr = trust_ratio(eeta, l2_norm(param), l2_norm(update)) * learning_rate
    return param - scaled_lr * update, new_velocity


def matches_any(patterns, path: str) -> bool:
    """Whether `re.search(p, path)` finds any pattern p of `patterns` (None: no patterns)."""
    return any(re.search(p, path) is not None for p in patterns or ())


@keras.saving.register_keras_serializable(package="noisy_keras")
class LARS(keras.optimizers.Optimizer):
    """Layer-wise Adaptive Rate Scaling (You, Gitman and Ginsburg, 2017).

    Each variable w gets its own learning rate, proportional to ||w|| over the
    norm of its update, so layers with small weights and large gradients do not
    diverge at the large learning rates that batches of 8k-32k need. With
    g' = g + weight_decay_rate * w and m = momentum (classic momentum, the default):

        trust = eeta * ||w|| / ||g'||   if ||w|| > 0 and ||g'|| > 0, else 1
        v <- m * v + lr * trust * g'
        w <- w - v                      (nesterov: w <- w - (m * v + lr * trust * g'))

    With `classic_momentum=False` the learning rate and trust ratio are applied
    after the momentum: v <- m * v + g'; u = v (nesterov: u = m * v + g');
    w <- w - lr * eeta * ||w|| / ||u|| * u, with the same "else 1" rule.
    As in the TensorFlow Model Garden's LARS (whose arguments and update this
    matches), the trust ratio uses ||g + beta * w||, where the paper's Algorithm 1
    writes ||g|| + beta * ||w||. The Model Garden has no `epsilon` argument, nor
    does this class. Under `NoisyOptimizer` the noise is added to g, before all this.

    Variable matching: every pattern is searched (`re.search`) in the variable's
    `path`, e.g. "dense/kernel" in a functional model, "sequential/dense/bias" in
    a Sequential one, "block/conv_bn/gamma" inside a nested model; the path ends
    with the variable's name (`name` alone is only "kernel", "gamma"), so
    a pattern for the name ("bias", "gamma", "beta") matches too, whatever the
    layer is called, and a layer name ("batch_normalization") matches all of its
    variables, as the Model Garden's match on TF1-style scoped names did. Only
    trainable variables are updated (a BatchNormalization's moving statistics never
    reach an optimizer). The decisions are made once, in `build`, for XLA.

    Args:
        learning_rate: float, `LearningRateSchedule` or callable.
        momentum: float in [0, 1].
        weight_decay_rate: L2 coefficient beta >= 0 added to the gradient before
            the trust ratio (Keras' decoupled `weight_decay` is refused: use this).
        eeta: LARS coefficient > 0 (eta in the paper; 0.001 there).
        nesterov: bool, Nesterov momentum.
        classic_momentum: bool, learning rate inside the momentum (True) or after it.
        exclude_from_weight_decay: list of regular expressions; matching variables
            get no weight decay.
        exclude_from_layer_adaptation: list of regular expressions; matching
            variables get trust 1. None (default) means the same list as
            `exclude_from_weight_decay`; [] adapts every variable (the Model Garden
            treats [] like None).
        **kwargs: Keras' base optimizer arguments (name, clipnorm, clipvalue,
            global_clipnorm, use_ema, ema_momentum, ema_overwrite_frequency,
            loss_scale_factor, gradient_accumulation_steps).

    Example:
        >>> optimizer = LARS(learning_rate=3.2, momentum=0.9, weight_decay_rate=1e-4,
        ...                  exclude_from_weight_decay=["bias", "gamma", "beta"])
        >>> model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    """

    def __init__(
        self,
        learning_rate=0.01,
        momentum=0.9,
        weight_decay_rate=0.0,
        eeta=0.001,
        nesterov=False,
        classic_momentum=True,
        exclude_from_weight_decay=None,
        exclude_from_layer_adaptation=None,
        name="LARS",
        **kwargs,
    ):
        weight_decay = kwargs.pop("weight_decay", None)
        if weight_decay is not None:
            raise ValueError(
                f"LARS does not take `weight_decay` (received weight_decay={weight_decay!r}); "
                "use weight_decay_rate=..., which LARS adds to the gradient before the "
                "trust ratio."
            )
        momentum = _check_number("momentum", momentum, "in [0, 1]", lambda x: 0 <= x <= 1)
        eeta = _check_number("eeta", eeta, "> 0", lambda x: x > 0)
        weight_decay_rate = _check_number(
            "weight_decay_rate", weight_decay_rate, ">= 0", lambda x: x >= 0
        )
        _check_bool("nesterov", nesterov)
        _check_bool("classic_momentum", classic_momentum)
        decay_patterns = _check_patterns("exclude_from_weight_decay", exclude_from_weight_decay)
        adaptation_patterns = _check_patterns(
            "exclude_from_layer_adaptation", exclude_from_layer_adaptation
        )
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.momentum = momentum
        self.eeta = eeta
        self.weight_decay_rate = weight_decay_rate
        self.nesterov = nesterov
        self.classic_momentum = classic_momentum
        # Stored under other names: Keras' base class has an `exclude_from_weight_decay` method.
        self.weight_decay_exclusions = decay_patterns
        self.layer_adaptation_exclusions = adaptation_patterns

    def exclude_from_weight_decay(self, var_list=None, var_names=None):
        """Refused: Keras' method configures `weight_decay`, which LARS does not use."""
        raise ValueError(
            "LARS takes its weight-decay exclusions as the constructor argument "
            "exclude_from_weight_decay=[patterns]; the Keras method "
            f"exclude_from_weight_decay(var_list={var_list!r}, var_names={var_names!r}) "
            "would configure Keras' `weight_decay`, which LARS refuses."
        )

    def build(self, variables):
        """Creates one momentum slot per variable and decides, by path, decay and adaptation."""
        if self.built:
            return
        super().build(variables)
        adaptation_patterns = self.layer_adaptation_exclusions
        if adaptation_patterns is None:
            adaptation_patterns = self.weight_decay_exclusions
        paths = [getattr(v, "path", None) or v.name for v in variables]
        self._decays = tuple(
            bool(self.weight_decay_rate) and not matches_any(self.weight_decay_exclusions, p)
            for p in paths
        )
        self._adapts = tuple(not matches_any(adaptation_patterns, p) for p in paths)
        self.momentums = self.add_optimizer_variables(variables, "momentum")

    def update_step(self, gradient, variable, learning_rate):
        """Applies `lars_update` to `variable` and its momentum slot."""
        index = self._get_variable_index(variable)
        gradient = dense(gradient)  # the norm needs every row
        velocity = self.momentums[index]
        new_param, new_velocity = lars_update(
            variable,
            ops.cast(gradient, variable.dtype),
            velocity,
            ops.cast(learning_rate, variable.dtype),
            momentum=self.momentum,
            eeta=self.eeta,
            weight_decay_rate=self.weight_decay_rate if self._decays[index] else 0.0,
            nesterov=self.nesterov,
            classic_momentum=self.classic_momentum,
            layer_adaptation=self._adapts[index],
        )
        self.assign(variable, new_param)
        self.assign(velocity, new_velocity)

    def get_config(self):
        config = super().get_config()
        config.pop("weight_decay")
        config.update(
            {
                "momentum": self.momentum,
                "weight_decay_rate": self.weight_decay_rate,
                "eeta": self.eeta,
                "nesterov": self.nesterov,
                "classic_momentum": self.classic_momentum,
                "exclude_from_weight_decay": self.weight_decay_exclusions,
                "exclude_from_layer_adaptation": self.layer_adaptation_exclusions,
            }
        )
        return config


def _check_number(name, value, allowed, is_allowed):
    """Returns float(value) if it is a finite real number (not a bool) with is_allowed(value)."""
    return check_number(name, value, f"a finite number {allowed}", is_allowed, label=f"`{name}`")


def _check_bool(name, value):
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False; received {name}={value!r}.")


def _check_patterns(name, patterns):
    """Returns `patterns` as a list of strings that compile as regular expressions, or None."""
    if patterns is None:
        return None
    if isinstance(patterns, str) or not isinstance(patterns, (list, tuple)):
        raise ValueError(
            f"`{name}` must be None or a list of regular-expression strings, e.g. "
            f"['bias', 'gamma', 'beta']; received {name}={patterns!r}."
        )
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise ValueError(
                f"`{name}` must hold strings only; received {name}={patterns!r} with "
                f"{pattern!r} of type {type(pattern).__name__}."
            )
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(
                f"`{name}` holds {pattern!r}, which is not a regular expression ({error}); "
                f"received {name}={patterns!r}."
            ) from None
    return list(patterns)
