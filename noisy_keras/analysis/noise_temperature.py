"""Does each noise kind restore the gradient noise it claims to? Measured at fixed weights.

Jaiswal & Taura (Section 3.3) write the mini-batch gradient as g_B ~ N(g, Sigma/B)
(Eq. 6), so a step of learning rate eta moves the weights by -eta g plus noise of
covariance eta^2 Sigma / B, and argue (Eq. 7) that a larger B therefore needs
noise added back. Eq. 7 counts the noise per step at a fixed eta; under the
linear scaling rule eta itself grows with B, and what sets SGD's exploration
over many steps is the noise temperature eta tr(Cov(update direction)) (Mandt
et al. 2017; Smith & Le 2018; `noisy_keras.noise.temperature`). This module measures
it for each noise kind and for the small batch b it is meant to emulate:

    produced = eta_B E|u - g|^2,    u = the update direction at batch B:
        none            u = g_B
        white           u = g_B + n,  n ~ N(0, alpha / (1 + t)^gamma I)
        matched         u = g_B + n,  n ~ N(0, tr_hat s^2 / (B d) I), tr_hat the
                        bias-corrected moving average of the two-halves estimate
                        (`covariance.two_group_trace_estimate`), as the engine
                        computes it on one device without accumulation
        multiplicative  u = (1/B) sum_i w_i g_i,  w_i ~ N(1, s^2)
    target   = eta_b E|g_b - g|^2,

with eta_B = m eta_b (m the learning-rate multiplier of the scaling rule) and
s^2 = max(0, (B/b)/m - 1) (`temperature.temperature_deficit`). Each expectation
is the mean over `num_draws` draws of the squared distance to the full-batch
gradient g (every u has mean g), with its standard error; the weights and the
white draws are the package's own (`example_weights`, `unit_noise`; draw j takes
row j of one block of each), and the matched size follows the engine's
estimator and moving average, so the measurement is of what the package adds. The closed forms, with
c(B) = `gradient_noise.variance_factor(B, N)` (1/B with replacement) and Sigma
normalized by 1/N (Eq. 5):

    none            c(B) tr(Sigma)
    white           c(B) tr(Sigma) + d alpha / (1 + t)^gamma
    matched         c(B) tr(Sigma) + s^2 / B * tr(Sigma) * q,
                    q = 1 with replacement, N / (N - 1) without
    multiplicative  c(B) tr(Sigma) + s^2 / B * (tr(Sigma) + |g|^2)
    target          c(b) tr(Sigma)

so with replacement and no scaling (m = 1, s^2 = B/b - 1) matched restores the
target exactly and multiplicative overshoots by (1/b - 1/B) |g|^2, the g g^T term
of Wu et al.'s covariance.

References:
    S. K. Jaiswal and K. Taura, "Overcoming Generalization Gap in Large
    Mini-Batch Training of Deep Neural Networks" (Section 3.3, Eq. 5-7).
    S. L. Smith and Q. V. Le, "A Bayesian Perspective on Generalization and
    Stochastic Gradient Descent", ICLR 2018.
    J. Wu, W. Hu, H. Xiong, J. Huan, V. Braverman and Z. Zhu, "On the Noisy
    Gradient Descent that Generalizes as SGD", ICML 2020.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from noisy_keras._validation import check_int, check_positive_int, check_positive_number
from noisy_keras.analysis import gradient_noise as gradient_noise_lib
from noisy_keras.noise import covariance, draw, multiplicative, schedules, temperature
from noisy_keras.noise import matched as matched_noise

NOISE_KINDS = ("none", "white", "matched", "multiplicative")

__all__ = ["NOISE_KINDS", "NoiseTemperature", "measure_noise_temperatures", "noise_temperatures"]


@dataclasses.dataclass(frozen=True)
class NoiseTemperature:
    """The noise of one kind's update direction against small-batch SGD's.

    Attributes:
        kind: one of `NOISE_KINDS`.
        trace: E|u - g|^2, measured (mean over the draws).
        standard_error: of `trace`.
        predicted: the closed form of E|u - g|^2 (module docstring).
        temperature: learning rate at B times `trace`.
        target: learning rate at b times E|g_b - g|^2, measured the same way.
        target_standard_error: of `target`.
        ratio: temperature / target (1: the kind restores the small batch's noise).
        ratio_standard_error: of `ratio`, from both standard errors (delta method).
    """

    kind: str
    trace: float
    standard_error: float
    predicted: float
    temperature: float
    target: float
    target_standard_error: float
    ratio: float
    ratio_standard_error: float


def _check_kinds(kinds) -> tuple:
    kinds = tuple(kinds)
    unknown = [k for k in kinds if k not in NOISE_KINDS]
    if unknown or not kinds:
        raise ValueError(
            f"kinds must be a non-empty sequence of {', '.join(NOISE_KINDS)}; received {kinds!r}."
        )
    return kinds


class _Ema:
    """The bias-corrected moving average of `MatchedNoiseOptimizer`, in float64."""

    def __init__(self, decay: float):
        self.decay, self.value, self.power = decay, 0.0, 1.0

    def observe(self, estimate: float) -> float:
        self.value = self.decay * self.value + (1 - self.decay) * estimate
        self.power *= self.decay
        return self.value / (1 - self.power)


def noise_temperatures(
    per_example_gradients,
    *,
    batch_size: int,
    small_batch_size: int,
    learning_rate: float,
    lr_multiplier: float = 1.0,
    kinds=NOISE_KINDS,
    alpha: float = schedules.PAPER_ALPHA,
    gamma: float = schedules.PAPER_GAMMA,
    step: int = 0,
    num_draws: int = 400,
    replace: bool = False,
    ema_decay: float = matched_noise.DEFAULT_EMA_DECAY,
    seed: int = 0,
) -> dict[str, NoiseTemperature]:
    """Produced / target noise temperature of each noise kind, from per-example gradients.

    Args:
        per_example_gradients: array (N, d) at fixed weights
            (`gradient_noise.per_example_gradients`).
        batch_size: B, the large batch, 2 <= B <= N without replacement.
        small_batch_size: b, the small batch to emulate, 1 <= b <= N.
        learning_rate: eta_b, the learning rate at b.
        lr_multiplier: m = eta_B / eta_b of the scaling rule
            (`temperature.lr_multiplier_for_rule`): 1 none, B/b linear.
        kinds: which of `NOISE_KINDS` to measure.
        alpha: the white noise's alpha.
        gamma: the white noise's gamma.
        step: the update t the white noise is measured at.
        num_draws: draws per kind (>= 2).
        replace: draw each batch's examples with replacement (default: without,
            as an epoch of shuffled batches does).
        ema_decay: the matched noise's moving-average decay.
        seed: seed of the batches, the weights and the noise draws.

    Returns:
        {kind: `NoiseTemperature`}.
    """
    gradients = np.asarray(per_example_gradients, dtype=np.float64)
    if gradients.ndim != 2 or gradients.shape[0] < 2 or gradients.shape[1] < 1:
        raise ValueError(
            "per_example_gradients must be a 2-D array (examples, parameters) with at least "
            f"two rows; received shape {gradients.shape}."
        )
    count, dim = gradients.shape
    batch_size = check_int("batch_size", batch_size, 2)
    small_batch_size = check_positive_int("small_batch_size", small_batch_size)
    num_draws = check_int("num_draws", num_draws, 2)
    learning_rate = check_positive_number("learning_rate", learning_rate)
    kinds = _check_kinds(kinds)
    population = None if replace else count
    for name, size in (("batch_size", batch_size), ("small_batch_size", small_batch_size)):
        if population is not None and size > population:
            raise ValueError(
                f"{name} must be at most the number of examples ({count}) without "
                f"replacement; received {name}={size}."
            )
    deficit = temperature.temperature_deficit(batch_size, small_batch_size, lr_multiplier)
    mean = gradients.mean(axis=0)
    trace = float(np.sum((gradients - mean) ** 2) / count)
    rng = np.random.default_rng(seed)
    batches = [rng.choice(count, batch_size, replace=replace) for _ in range(num_draws)]

    # One draw of everything each kind needs, row j for draw j (a function of the seed only).
    units = draw.unit_noise([(num_draws, dim)], seed, 0)[0].numpy().astype(np.float64)
    weights = multiplicative.example_weights(
        num_draws * batch_size, seed=seed, step=0, variance=deficit
    )
    weights = weights.numpy().astype(np.float64).reshape(num_draws, batch_size)

    def unit(j):
        return units[j]

    def distance(u):
        return float(np.sum((u - mean) ** 2))

    def none(j):
        return distance(gradients[batches[j]].mean(axis=0))

    white_std = float(schedules.noise_stddev(step, alpha, gamma))

    def white(j):
        return distance(gradients[batches[j]].mean(axis=0) + white_std * unit(j))

    ema = _Ema(ema_decay)
    half = batch_size // 2

    def matched(j):
        rows = gradients[batches[j]]
        estimate = covariance.two_group_trace_estimate(
            rows[:half].mean(axis=0), rows[half:].mean(axis=0), half, batch_size - half
        )
        sigma = math.sqrt(ema.observe(float(estimate)) * deficit / (batch_size * dim))
        return distance(rows.mean(axis=0) + sigma * unit(j))

    def weighted(j):
        return distance(weights[j] @ gradients[batches[j]] / batch_size)

    draws = {"none": none, "white": white, "matched": matched, "multiplicative": weighted}
    factor = gradient_noise_lib.variance_factor(batch_size, population)
    finite = 1.0 if population is None else count / (count - 1)
    predicted = {
        "none": factor * trace,
        "white": factor * trace + dim * white_std**2,
        "matched": factor * trace + deficit / batch_size * trace * finite,
        "multiplicative": factor * trace + deficit / batch_size * (trace + float(mean @ mean)),
    }
    small = [rng.choice(count, small_batch_size, replace=replace) for _ in range(num_draws)]
    target_values = np.array([distance(gradients[s].mean(axis=0)) for s in small])
    target = learning_rate * target_values.mean()
    target_se = learning_rate * target_values.std(ddof=1) / math.sqrt(num_draws)
    results = {}
    for kind in kinds:
        values = np.array([draws[kind](j) for j in range(num_draws)])
        measured = float(values.mean())
        error = float(values.std(ddof=1) / math.sqrt(num_draws))
        produced = learning_rate * lr_multiplier * measured
        ratio = produced / target
        ratio_error = ratio * math.hypot(error / measured, target_se / target)
        results[kind] = NoiseTemperature(
            kind=kind,
            trace=measured,
            standard_error=error,
            predicted=predicted[kind],
            temperature=produced,
            target=float(target),
            target_standard_error=float(target_se),
            ratio=ratio,
            ratio_standard_error=ratio_error,
        )
    return results


def measure_noise_temperatures(model, x, y, *, loss=None, **kwargs) -> dict[str, NoiseTemperature]:
    """`noise_temperatures` of a model on (x, y) at its current weights.

    Per-example gradients are computed in inference mode
    (`gradient_noise.per_example_gradients`); they take N x d x 8 bytes, so pass
    a subset of the training set for large models.

    Args:
        model: a built Keras model; not modified.
        x: training inputs, N examples.
        y: training labels.
        loss: as in `per_example_gradients`.
        **kwargs: the keyword arguments of `noise_temperatures`.
    """
    gradients = gradient_noise_lib.per_example_gradients(model, x, y, loss=loss)
    return noise_temperatures(gradients, **kwargs)
