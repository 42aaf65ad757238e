"""Sharpness-aware minimization and the gradient-norm penalty, as pure functions of gradients.

Both methods change which gradient an update applies, not how it is applied:
each needs a second gradient of the same batch at other weights, which only a
training step can compute (`noisy_keras.engine.methods` runs them). This module
holds their settings and their math on lists of tensors.

SAM (Foret et al. 2021) minimizes max_{|e| <= rho} L(w + e). To first order the
inner maximum is at

    e(w) = rho g / |g|,                       g = grad L(w),

and the update applies g_SAM = grad L(w + e(w)), the gradient at the perturbed
weights with e held fixed. Adaptive SAM (Kwon et al. 2021) measures the
neighbourhood relative to each weight's size, T_w = diag(|w| + eta):

    e(w) = rho T_w^2 g / |T_w g|,

so a layer whose weights are all scaled by c sees the same relative
perturbation; Kwon et al. use rho about 10x SAM's (0.5 to 2 on CIFAR).

The gradient-norm penalty (Barrett & Dherin 2021, Smith et al. 2021: SGD with
learning rate eta follows, to second order, the gradient flow of
L + (eta / 4) |grad L|^2; Geiping et al. 2022 add the term explicitly to train
full-batch without a gap) trains on L + lambda |grad L|^2, whose gradient is

    g + 2 lambda H g,                         H = the Hessian of L at w.

`double_backprop` differentiates through the gradient (exact; a second-order
graph, about twice the memory of a step). `finite_difference` uses, as Geiping
et al. do, H g ~ (grad L(w + h g) - g) / h with the step length |h g| = epsilon
(h = epsilon / |g|): two first-order passes, the cost of a SAM step, exact for a
quadratic loss. It is the default: it costs what SAM costs, compiles with XLA
for any model whose gradient does, and Geiping et al. found it as good as the
exact gradient.

Units. A training step computes c * grad L with c = loss scale / R (mixed
precision's loss scale; Keras divides each of R replicas' losses by R). SAM's
perturbations are invariant to c. The penalty's functions take c as
`gradient_scale` and return c (g + 2 lambda H g), what the step then sums over
replicas.

References:
    P. Foret, A. Kleiner, H. Mobahi and B. Neyshabur, "Sharpness-Aware
    Minimization for Efficiently Improving Generalization", ICLR 2021,
    https://arxiv.org/abs/2010.01412.
    J. Kwon, J. Kim, H. Park and I. K. Choi, "ASAM: Adaptive Sharpness-Aware
    Minimization for Scale-Invariant Learning of Deep Neural Networks",
    ICML 2021, https://arxiv.org/abs/2102.11600.
    D. G. T. Barrett and B. Dherin, "Implicit Gradient Regularization", ICLR 2021.
    S. L. Smith, B. Dherin, D. G. T. Barrett and S. De, "On the Origin of
    Implicit Regularization in Stochastic Gradient Descent", ICLR 2021.
    J. Geiping, M. Goldblum, P. E. Pope, M. Moeller and T. Goldstein,
    "Stochastic Training is Not Necessary for Generalization", ICLR 2022,
    https://arxiv.org/abs/2109.14119.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from noisy_keras._validation import check_number
from noisy_keras.optim.registry import DEFAULT_SAM_RHO, PENALTY_GRADIENTS

__all__ = [
    "GRADIENT_METHODS",
    "GradientNormPenalty",
    "PENALTY_GRADIENTS",
    "SAM",
    "finite_difference_penalty_gradients",
    "global_norm",
    "sam_perturbation",
]


@dataclasses.dataclass(frozen=True)
class SAM:
    """Sharpness-aware minimization: apply grad L(w + e(w)), e = rho g / |g| (module doc).

    The perturbation is computed from each replica's own batch (Foret et al.'s
    m-sharpness with m = B / (k R) examples: B per update, R replicas, k
    accumulation steps), as on the paper's accelerators: no communication
    beyond the step's own all-reduce, and each replica's g_SAM is summed as
    its plain gradient would be. With one replica and no accumulation m is
    the whole batch; 1 and 2 replicas therefore differ, by design.

    Attributes:
        rho: the neighbourhood's radius, >= 0 (0.05 in Foret et al.; 0 is
            plain training, bit for bit: no second pass).
        adaptive: Kwon et al.'s adaptive SAM, e = rho T_w^2 g / |T_w g|.
        eta: the offset of T_w = |w| + eta (adaptive only; 0.01 as Kwon et al.),
            so weights at 0 are perturbed too.
    """

    rho: float = DEFAULT_SAM_RHO
    adaptive: bool = False
    eta: float = 0.01

    def __post_init__(self):
        rho = check_number("rho", self.rho, "a finite number >= 0", lambda v: v >= 0)
        if not isinstance(self.adaptive, bool):
            raise ValueError(
                f"adaptive must be True or False; received adaptive={self.adaptive!r}."
            )
        eta = check_number("eta", self.eta, "a finite number >= 0", lambda v: v >= 0)
        object.__setattr__(self, "rho", rho)
        object.__setattr__(self, "eta", eta)

    @property
    def active(self) -> bool:
        """Whether the method changes the gradient (rho > 0)."""
        return self.rho > 0


@dataclasses.dataclass(frozen=True)
class GradientNormPenalty:
    """Train on L + lambda |grad L|^2: apply g + 2 lambda H g (module doc).

    Like `SAM`, taken on each replica's own batch: the penalty is the mean over
    replicas (and accumulation steps) of lambda |grad L_r|^2, L_r the mean loss
    of replica r's B / (k R) examples.

    Attributes:
        strength: lambda >= 0 (Smith et al.'s implicit term is lr / 4; 0 is
            plain training, bit for bit).
        gradient: "finite_difference" (default) or "double_backprop".
        epsilon: the finite difference's step length |h g| > 0 in weight space
            (0.01 as Geiping et al.); unused by "double_backprop".
    """

    strength: float
    gradient: str = "finite_difference"
    epsilon: float = 0.01

    def __post_init__(self):
        strength = check_number("strength", self.strength, "a finite number >= 0", lambda v: v >= 0)
        if self.gradient not in PENALTY_GRADIENTS:
            raise ValueError(
                f"gradient must be one of {', '.join(PENALTY_GRADIENTS)}; "
                f"received gradient={self.gradient!r}."
            )
        epsilon = check_number("epsilon", self.epsilon, "a finite number > 0", lambda v: v > 0)
        object.__setattr__(self, "strength", strength)
        object.__setattr__(self, "epsilon", epsilon)

    @property
    def active(self) -> bool:
        """Whether the method changes the gradient (lambda > 0)."""
        return self.strength > 0


GRADIENT_METHODS = {"sam": SAM, "gradient_norm_penalty": GradientNormPenalty}
"""The gradient methods by name (the main job's `--method`)."""


def global_norm(tensors) -> tf.Tensor:
    """sqrt(sum of squares) over a list of tensors (None skipped), in float32."""
    squares = [tf.reduce_sum(tf.square(tf.cast(t, tf.float32))) for t in tensors if t is not None]
    return tf.sqrt(tf.add_n(squares)) if squares else tf.zeros([], tf.float32)


def _safe_inverse(norm):
    """1 / norm, and 0 where the norm is 0 (a zero gradient moves nothing)."""
    return tf.math.divide_no_nan(tf.ones_like(norm), norm)


def sam_perturbation(gradients, weights, *, rho: float, adaptive: bool = False, eta: float = 0.01):
    """e = rho g / |g|, or rho T_w^2 g / |T_w g| with T_w = |w| + eta when adaptive.

    The norm is taken over all the gradients together; a zero gradient gives
    e = 0. Invariant to the gradients' scale (loss scale, 1 / R). With
    rho = epsilon and no adaptation it is also the finite difference's step
    h g = epsilon g / |g| of `GradientNormPenalty`.

    Args:
        gradients: g, a list of tensors (None for a variable without one).
        weights: w, the weights' values, the same length and shapes.
        rho: the radius.
        adaptive: Kwon et al.'s variant.
        eta: T_w's offset (adaptive only).

    Returns:
        A list of e's parts in the weights' dtypes (None where g is None).
    """
    if adaptive:
        scales = [
            None if g is None else tf.abs(tf.cast(w, tf.float32)) + eta
            for g, w in zip(gradients, weights, strict=True)
        ]
        scaled = [
            None if g is None else s * tf.cast(g, tf.float32)
            for g, s in zip(gradients, scales, strict=True)
        ]
        factor = rho * _safe_inverse(global_norm(scaled))
        parts = [None if t is None else s * t for t, s in zip(scaled, scales, strict=True)]
    else:
        factor = rho * _safe_inverse(global_norm(gradients))
        parts = [None if g is None else tf.cast(g, tf.float32) for g in gradients]
    return [
        None if p is None else tf.cast(factor * p, w.dtype)
        for p, w in zip(parts, weights, strict=True)
    ]


def finite_difference_penalty_gradients(
    gradients, shifted_gradients, *, strength: float, epsilon: float, gradient_scale
):
    """c (g + 2 lambda H g) with H g ~ (grad L(w + h g) - g) / h, h = epsilon / |g|.

    In the step's units (`gradients` = c g, `shifted_gradients` = c grad L(w + h g)):
    2 lambda c H g = 2 lambda (shifted - gradients) |gradients| / (c epsilon).

    Args:
        gradients: c g at w.
        shifted_gradients: c grad L(w + h g), the same structure.
        strength: lambda.
        epsilon: the step length |h g|.
        gradient_scale: c, the loss scale divided by the replicas (scalar).

    Returns:
        The list c (g + 2 lambda H g) in the gradients' dtypes.
    """
    c = tf.cast(gradient_scale, tf.float32)
    factor = 2.0 * strength * global_norm(gradients) / (c * epsilon)
    return [
        None
        if g is None
        else tf.cast(
            tf.cast(g, tf.float32) + factor * (tf.cast(s, tf.float32) - tf.cast(g, tf.float32)),
            g.dtype,
        )
        for g, s in zip(gradients, shifted_gradients, strict=True)
    ]
