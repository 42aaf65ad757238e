"""Covariance-matched white noise: isotropic noise as large as the noise the batch lacks.

Jaiswal & Taura (Section 3.3, Eq. 6) write g_B ~ N(g, Sigma / B). A large batch
B at m times the small batch's learning rate lacks gradient noise of covariance
s^2 Sigma / B, s^2 = max(0, (B/b)/m - 1) (`noisy_keras.noise.temperature`). This kind
gives back its total size, not its shape: white noise n_t ~ N(0, sigma_t^2 I)
over the d trainable parameters with the same trace,

    d sigma_t^2 = s^2 tr(Sigma_t) / B,   sigma_t^2 = (tr(Sigma_t) / d) * s^2 / B,

(at no scaling, tr(Sigma_t) / d * (1/b - 1/B)), where tr(Sigma_t) is measured
during training instead of following the paper's fixed schedule
alpha / (1 + t)^gamma.

tr(Sigma) is estimated from the gradients of groups of examples
(`noisy_keras.noise.covariance`).

The optimizer keeps an exponential moving average of the estimates, observed
once per update, with Adam's bias correction (Kingma & Ba 2015): after k
observations x_1..x_k,

    ema_k = decay ema_{k-1} + (1 - decay) x_k,  ema_0 = 0,
    tr_hat = ema_k / (1 - decay^k),

and no observation yet means tr_hat = 0: no noise.

References:
    S. K. Jaiswal and K. Taura, "Overcoming Generalization Gap in Large
    Mini-Batch Training of Deep Neural Networks" (Section 3.3, Eq. 5-7).
    J. Wu, W. Hu, H. Xiong, J. Huan, V. Braverman and Z. Zhu, "On the Noisy
    Gradient Descent that Generalizes as SGD", ICML 2020,
    https://arxiv.org/abs/1906.07405.
    S. McCandlish et al., "An Empirical Model of Large-Batch Training", 2018,
    https://arxiv.org/abs/1812.06162 (Appendix A: the trace from gradients of
    two batch sizes).
    D. P. Kingma and J. Ba, "Adam: A Method for Stochastic Optimization", ICLR
    2015 (Section 3: the bias correction).
"""

from __future__ import annotations

import math
import numbers

import keras
import numpy as np
import tensorflow as tf

from noisy_keras._validation import check_int, check_number
from noisy_keras.noise import temperature
from noisy_keras.noise.optimizer import GradientNoiseWrapper

DEFAULT_EMA_DECAY = 0.99

__all__ = [
    "DEFAULT_EMA_DECAY",
    "MatchedNoiseOptimizer",
    "matched_noise_variance",
]


def matched_noise_variance(covariance_trace, *, num_parameters: int, batch_size: int, deficit):
    """sigma^2 = (tr(Sigma) / d) * s^2 / B: per-coordinate variance of the matched white noise.

    Args:
        covariance_trace: tr(Sigma), per-example gradient covariance trace (number
            or tensor).
        num_parameters: d, the number of parameters the noise is added to.
        batch_size: B, examples per update.
        deficit: s^2 (`temperature.temperature_deficit`).

    Returns:
        sigma^2, of the kind of `covariance_trace`.
    """
    num_parameters = check_int("num_parameters", num_parameters, 1)
    batch_size = check_int("batch_size", batch_size, 1)
    return covariance_trace / num_parameters * deficit / batch_size


def _check_ema_decay(ema_decay) -> float:
    return check_number(
        "ema_decay", ema_decay, "a number in [0, 1) (0: no averaging)", lambda v: 0 <= v < 1
    )


@keras.saving.register_keras_serializable(package="noisy_keras")
class MatchedNoiseOptimizer(GradientNoiseWrapper):
    """White noise with the trace of the gradient noise a large batch lacks.

    At update t every gradient coordinate gets n_t ~ N(0, sigma_t^2),

        sigma_t^2 = (tr_hat_t / d) * s^2 / B,   s^2 = max(0, (B/b)/m - 1),

    with tr_hat_t the bias-corrected moving average of the estimates of
    tr(Sigma) given to `observe_covariance_trace` (0 before the first: no noise),
    d the number of parameters the noise reaches, B the batch of an update, b the
    small batch whose noise temperature is the target and m the learning rate's
    multiplier at B (see `noisy_keras.noise.matched` and `temperature`). All
    else is the noise wrapper's (`noisy_keras.noise.optimizer.GradientNoiseWrapper`,
    as for `NoisyOptimizer`): the draw is `unit_noise(shapes, seed, t) *
    sigma_t`, each replica adds it divided by R before the SUM all-reduce, once
    per update; clipping is taken over the same way. With s^2 = 0 nothing is
    added and updates are bit-identical to the inner optimizer's.

    The estimate comes from the training loop, which alone sees the gradients
    of several groups of examples: call `observe_covariance_trace(estimate)`
    once per update before `apply`, with the same value on every replica (e.g.
    each replica's `covariance_trace_estimate`, all-reduced to their mean).
    Keras' own `model.fit` does not, so `apply` refuses to add noise if it was
    never called. All its state is saved and restored with the optimizer: the
    moving average lives in two optimizer variables (`covariance_trace_ema`
    and `ema_decay_power`), the settings in its config. The "observed" flag is
    not state: it records, while a training step is being built, that the loop
    feeds estimates, and a restored optimizer sets it again at the first
    `observe_covariance_trace` of its loop.

    Args:
        optimizer: the Keras optimizer to wrap (see `NoisyOptimizer`).
        batch_size: B, examples per parameter update, an integer >= 1.
        small_batch_size: b, an integer >= 1.
        lr_multiplier: m = eta_B / eta_b, a finite number > 0 (1: no scaling).
        seed: integer in [0, 2**31 - 1]; None draws one, stored in the config.
        ema_decay: decay of the moving average of the trace estimates, in [0, 1).
        name: optimizer name.

    Example:
        >>> optimizer = MatchedNoiseOptimizer(
        ...     keras.optimizers.SGD(0.01, momentum=0.9), batch_size=512, small_batch_size=32,
        ...     seed=1)
        >>> optimizer.deficit
        15.0
    """

    _ARGUMENT_NAMES = (
        "optimizer",
        "batch_size",
        "small_batch_size",
        "lr_multiplier",
        "seed",
        "ema_decay",
        "name",
    )

    def __init__(
        self,
        optimizer,
        *,
        batch_size,
        small_batch_size,
        lr_multiplier=1.0,
        seed=None,
        ema_decay=DEFAULT_EMA_DECAY,
        name=None,
        **kwargs,
    ):
        schedule_arguments = sorted({"alpha", "gamma"} & set(kwargs))
        if schedule_arguments:
            raise ValueError(
                f"MatchedNoiseOptimizer got unexpected argument(s) {schedule_arguments}; its "
                "noise size comes from batch_size, small_batch_size and lr_multiplier. "
                f"Allowed: {', '.join(self._ARGUMENT_NAMES)}."
            )
        deficit = temperature.temperature_deficit(batch_size, small_batch_size, lr_multiplier)
        ema_decay = _check_ema_decay(ema_decay)
        super().__init__(optimizer, seed=seed, name=name, **kwargs)
        self.batch_size = int(batch_size)
        self.small_batch_size = int(small_batch_size)
        self.lr_multiplier = float(lr_multiplier)
        self.ema_decay = ema_decay
        self.deficit = deficit
        # float32 constants of the moving average, as the tests recompute them.
        self._decay = np.float32(ema_decay)
        self._one_minus_decay = np.float32(1.0 - ema_decay)
        self._num_parameters = None
        self._variance_per_trace = None
        self._observed = False

    # ---- State --------------------------------------------------------------------

    def build(self, var_list):
        super().build(var_list)
        self._num_parameters = sum(
            int(np.prod(v.shape))
            for v in var_list
            if not getattr(v, "overwrite_with_gradient", False)
        )
        if self._num_parameters == 0 and self.adds_noise:
            raise ValueError(
                "MatchedNoiseOptimizer got no parameters to add noise to (d = 0); it needs "
                "trainable variables."
            )
        # sigma_t^2 = tr_hat * s^2 / (B d): one float32 factor.
        self._variance_per_trace = np.float32(
            self.deficit / (self.batch_size * max(self._num_parameters, 1))
        )
        self._trace_ema = self.add_variable(
            (), "zeros", "float32", aggregation="only_first_replica", name="covariance_trace_ema"
        )
        self._decay_power = self.add_variable(
            (), "ones", "float32", aggregation="only_first_replica", name="ema_decay_power"
        )

    def _check_built(self, what: str) -> None:
        if not self.built:
            raise ValueError(
                f"MatchedNoiseOptimizer.{what} needs the optimizer built; call "
                "optimizer.build(model.trainable_variables) first."
            )

    @property
    def num_parameters(self) -> int:
        """d, the number of parameters the noise reaches (known once built)."""
        self._check_built("num_parameters")
        return self._num_parameters

    def observe_covariance_trace(self, estimate) -> None:
        """Folds one estimate of tr(Sigma) into the moving average; call once per update.

        ema <- decay * ema + (1 - decay) * estimate and decay_power <- decay_power *
        decay, in float32. An estimate that is not finite or is negative (a step
        whose gradients overflowed) leaves both unchanged, as such a step is
        skipped.

        Args:
            estimate: a scalar (number or tensor), the same on every replica, e.g.
                `covariance_trace_estimate` all-reduced to the replicas' mean.
        """
        self._check_built("observe_covariance_trace")
        if isinstance(estimate, numbers.Real) and not (math.isfinite(estimate) and estimate >= 0):
            raise ValueError(
                f"estimate must be a finite number >= 0; received estimate={estimate!r}."
            )
        estimate = tf.cast(tf.convert_to_tensor(estimate), tf.float32)
        if estimate.shape.rank not in (None, 0):
            raise ValueError(f"estimate must be a scalar; received shape {estimate.shape}.")
        self._observed = True
        usable = tf.logical_and(tf.math.is_finite(estimate), estimate >= 0.0)
        decay = tf.constant(self._decay, tf.float32)
        one_minus_decay = tf.constant(self._one_minus_decay, tf.float32)
        ema = tf.convert_to_tensor(self._trace_ema)
        power = tf.convert_to_tensor(self._decay_power)
        self._trace_ema.assign(tf.where(usable, decay * ema + one_minus_decay * estimate, ema))
        self._decay_power.assign(tf.where(usable, power * decay, power))

    @property
    def covariance_trace(self):
        """tr_hat, the bias-corrected moving average of the estimates (0 before any)."""
        self._check_built("covariance_trace")
        ema = tf.convert_to_tensor(self._trace_ema)
        return tf.math.divide_no_nan(ema, 1.0 - tf.convert_to_tensor(self._decay_power))

    # ---- The noise size -------------------------------------------------------------

    @property
    def adds_noise(self) -> bool:
        return self.deficit > 0

    def _noise_stddev_at(self, step):
        """sigma_t = sqrt(tr_hat * s^2 / (B d)); the same for every step until the next estimate."""
        del step  # the size follows the observed trace, not a schedule
        factor = tf.constant(self._variance_per_trace, tf.float32)
        return tf.sqrt(tf.maximum(self.covariance_trace, 0.0) * factor)

    def apply(self, grads, trainable_variables=None):
        if self.adds_noise and not self._observed:
            raise ValueError(
                "MatchedNoiseOptimizer sets its noise from tr(Sigma) measured during training, "
                "but observe_covariance_trace(estimate) was never called; call it once per "
                "update before apply (noisy_keras' training engine does; Keras' model.fit "
                "does not, and would train without noise)."
            )
        super().apply(grads, trainable_variables)

    def _kind_config(self) -> dict:
        return {
            "batch_size": self.batch_size,
            "small_batch_size": self.small_batch_size,
            "lr_multiplier": self.lr_multiplier,
            "ema_decay": self.ema_decay,
        }
