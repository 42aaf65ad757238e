"""The annealed noise schedule, sigma_t^2 = alpha / (1 + t)^gamma, and its parameters' checks.

Jaiswal & Taura add white noise to every mini-batch gradient before the update,

    g~_t = g_t + n_t,   n_t ~ N(0, sigma_t^2 I),   sigma_t^2 = alpha / (1 + t)^gamma,

with alpha = 1e-5 and gamma = 0.55 in their experiments, and t the number of
parameter updates already applied (0 for the first). The schedule is the one of
Neelakantan et al. (2015), "Adding Gradient Noise Improves Learning for Very Deep
Networks", whose eta is the paper's alpha. The draw itself is `noise.draw`.

References:
    S. K. Jaiswal and K. Taura, "Overcoming Generalization Gap in Large
    Mini-Batch Training of Deep Neural Networks" (Section 3.1).
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from noisy_keras.noise.registry import PAPER_ALPHA, PAPER_GAMMA, SEED_MAX

__all__ = [
    "PAPER_ALPHA",
    "PAPER_GAMMA",
    "SEED_MAX",
    "noise_variance",
    "noise_stddev",
    "validate_noise_parameters",
]


def validate_noise_parameters(alpha, gamma, seed=None) -> None:
    """Raises ValueError unless alpha, gamma and seed are usable.

    Args:
        alpha: noise variance at t = 0; a finite float >= 0 (0 turns noise off).
        gamma: decay exponent; a finite float >= 0.
        seed: None or an integer in [0, 2**31 - 1].
    """
    for arg_name, value in (("alpha", alpha), ("gamma", gamma)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
            raise ValueError(f"`{arg_name}` must be a finite float >= 0; received {value!r}.")
        if not math.isfinite(float(value)) or float(value) < 0:
            raise ValueError(f"`{arg_name}` must be a finite float >= 0; received {value!r}.")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ValueError(
                f"`seed` must be None or an integer in [0, {SEED_MAX}]; received {seed!r}."
            )
        if not 0 <= int(seed) <= SEED_MAX:
            raise ValueError(
                f"`seed` must be None or an integer in [0, {SEED_MAX}]; received {seed!r}."
            )


def noise_variance(step, alpha=PAPER_ALPHA, gamma=PAPER_GAMMA):
    """Variance of the added noise per coordinate at update `step`.

    sigma_t^2 = alpha / (1 + t)^gamma   (Jaiswal & Taura, Section 3.1).

    Args:
        step: t, the number of updates already applied (0 for the first); a
            Python number, NumPy array or tensor.
        alpha: variance at t = 0.
        gamma: decay exponent.

    Returns:
        sigma_t^2, of the same kind as `step` (float tensor for a tensor).

    Example:
        >>> float(noise_variance(0)), round(float(noise_variance(99)), 10)
        (1e-05, 7.943e-07)
    """
    if tf.is_tensor(step):
        t = tf.cast(step, tf.float64)
        return tf.cast(alpha / tf.pow(1.0 + t, gamma), tf.float32)
    return alpha / np.power(1.0 + np.asarray(step, dtype=np.float64), gamma)


def noise_stddev(step, alpha=PAPER_ALPHA, gamma=PAPER_GAMMA):
    """Standard deviation sigma_t = sqrt(alpha / (1 + t)^gamma) of the added noise.

    The draw is scaled by the standard deviation, never by the variance (a bug
    optax once shipped).

    Args:
        step: t, updates already applied; number, array or tensor.
        alpha: variance at t = 0.
        gamma: decay exponent.

    Returns:
        sigma_t, of the same kind as `step`.
    """
    if tf.is_tensor(step):
        t = tf.cast(step, tf.float64)
        return tf.cast(tf.sqrt(alpha / tf.pow(1.0 + t, gamma)), tf.float32)
    return np.sqrt(noise_variance(step, alpha, gamma))
