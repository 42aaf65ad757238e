"""Gradient clipping under a noise wrapper: the global batch's data gradient, before the noise.

Where clipping lives, and why. Keras' optimizers clip inside `apply`, before
their SUM all-reduce: under R replicas each replica would clip its own share of
the gradient, and a wrapper adding noise before the inner optimizer would have
the noise clipped with it. Both break the package's invariant (DESIGN.md,
invariant 6): clipping bounds the data gradient of the global batch, the noise
is added after it and never clipped, and 1 and R replicas give the same update.
The only place that sees the gradient after the replicas agree and before the
noise is the wrapper's own `apply`, so the wrapper takes the clipping settings
over from the optimizer it wraps (`clipping_settings`, then
`disable_clipping`) and calls
`clip_global_batch` there. The engine does not clip: a wrapped optimizer in
Keras' own `model.fit` must clip the same way.

`clip_global_batch` SUM-all-reduces the replicas' gradients (one extra
all-reduce per update, only when clipping is set), clips with Keras' own rule
(`_keras_internals.clip_gradients`), and returns clip(g) / R, which the inner
optimizer's SUM all-reduce turns back into clip(g): exact when R is a power of
two, otherwise up to the float rounding of / R.
"""

from __future__ import annotations

import tensorflow as tf

from noisy_keras import _keras_internals as internals
from noisy_keras._structures import dense, replica_in_sync

CLIPPING_ARGUMENTS = ("clipnorm", "global_clipnorm", "clipvalue")
"""The inner optimizer's clipping settings, which the wrapper takes over."""

__all__ = [
    "CLIPPING_ARGUMENTS",
    "clip_global_batch",
    "clipping_settings",
    "disable_clipping",
    "noise_targets",
]


def noise_targets(grads, trainable_variables) -> list[int]:
    """Positions of the gradients the wrapper clips and adds noise to.

    A None gradient is skipped, and so is a variable Keras overwrites with its
    "gradient" (`overwrite_with_gradient`, e.g. float8 scaling statistics).
    """
    return [
        i
        for i, (g, v) in enumerate(zip(grads, trainable_variables))
        if g is not None and not getattr(v, "overwrite_with_gradient", False)
    ]


def clipping_settings(optimizer, wrapper_name: str) -> dict:
    """`optimizer`'s clipping settings, {"clipnorm": ..., ...}, checked for a wrapper to take over.

    Raises:
        ValueError: clipping together with the optimizer's `loss_scale_factor`
            (the wrapper would clip scaled gradients).
    """
    clipping = {arg: getattr(optimizer, arg) for arg in CLIPPING_ARGUMENTS}
    chosen = {arg: value for arg, value in clipping.items() if value is not None}
    if chosen and getattr(optimizer, "loss_scale_factor", None) is not None:
        arg, value = next(iter(chosen.items()))
        raise ValueError(
            f"`optimizer` has {arg}={value!r} and loss_scale_factor="
            f"{optimizer.loss_scale_factor!r}; {wrapper_name} clips the global-batch gradient "
            "before the wrapped optimizer unscales it, so it would clip scaled gradients. "
            f"Allowed: {arg} without loss_scale_factor (for mixed precision use the "
            "'mixed_float16' dtype policy, whose LossScaleOptimizer unscales before "
            f"{wrapper_name}), or loss_scale_factor without clipping."
        )
    return clipping


def disable_clipping(optimizer) -> None:
    """Sets the wrapped optimizer's clipping settings to None: the wrapper clips instead.

    The wrapper keeps the settings in its own config; its `from_config` puts
    them back on the rebuilt inner optimizer before taking them over again.
    """
    for arg in CLIPPING_ARGUMENTS:
        setattr(optimizer, arg, None)


def clip_global_batch(wrapper, grads, trainable_variables) -> list:
    """clip(g) / R on each of R replicas, g the global batch's gradient, by `wrapper`'s settings."""
    targets = noise_targets(grads, trainable_variables)
    if not targets:
        return grads
    parts = [dense(grads[i]) for i in targets]
    replicas = replica_in_sync()[1]
    if replicas > 1:
        parts = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, parts)
    parts = internals.clip_gradients(wrapper, parts)
    if replicas > 1:
        parts = [p / tf.cast(replicas, p.dtype) for p in parts]
    clipped = list(grads)
    for i, p in zip(targets, parts, strict=True):
        clipped[i] = p
    return clipped
