"""The noise a large batch lacks, given the learning-rate rule: the temperature deficit.

Jaiswal & Taura (Section 3.3, Eq. 6-7) write the mini-batch gradient as
g_B = g + eps / sqrt(B), eps ~ N(0, Sigma), so one SGD step with learning rate
eta moves the weights by -eta g plus noise of covariance eta^2 Sigma / B. Over
the many steps it takes to cross a region of the loss, what sets SGD's
exploration is the noise temperature

    T = eta * Sigma / B

(Mandt, Hoffman & Blei 2017; Smith & Le 2018; Jastrzebski et al. 2018): the
stationary spread of SGD around a minimum grows with eta / B. The target is
small-batch SGD, learning rate eta_b at batch b, with T_b = eta_b Sigma / b. A
large batch B trained at eta_B = m eta_b (m the learning-rate multiplier of the
scaling rule) whose gradient carries extra noise of covariance s^2 Sigma / B,
i.e. (1 + s^2) Sigma / B in all, has

    T_B = m eta_b (1 + s^2) Sigma / B.

T_B = T_b exactly when 1 + s^2 = (B / b) / m, so the added noise must have
variance factor

    s^2 = max(0, (B / b) / m - 1)                        (temperature deficit)

relative to the large batch's own Sigma / B:

    no scaling, m = 1:          s^2 = B/b - 1  (extra covariance Sigma (1/b - 1/B),
                                                Wu et al. 2020's choice)
    square root, m = sqrt(B/b): s^2 = sqrt(B/b) - 1
    linear, m = B/b:            s^2 = 0        (T is already the small batch's)

The paper's Eq. 7 counts the noise per step at a fixed eta (eta_t / sqrt(B)),
which shrinks as B grows; under its own linear rule eta grows with B, and per
unit of learning rate nothing is missing (Goyal et al. 2017; Smith & Le 2018).
Noise added on top of linear scaling overheats: on mnist1d with a 1-D CNN and
per-example weights of variance B/b - 1 on top of linear scaling, B=512 fell to
35-43% accuracy and B=1024 to chance. A negative deficit (B < b, or m > B/b)
would ask to remove noise, which added noise cannot do: it is clamped to 0.

References:
    S. K. Jaiswal and K. Taura, "Overcoming Generalization Gap in Large
    Mini-Batch Training of Deep Neural Networks" (Section 3.3, Eq. 6-7).
    S. L. Smith and Q. V. Le, "A Bayesian Perspective on Generalization and
    Stochastic Gradient Descent", ICLR 2018, https://arxiv.org/abs/1710.06451.
    J. Wu, W. Hu, H. Xiong, J. Huan, V. Braverman and Z. Zhu, "On the Noisy
    Gradient Descent that Generalizes as SGD", ICML 2020,
    https://arxiv.org/abs/1906.07405.
    P. Goyal et al., "Accurate, Large Minibatch SGD: Training ImageNet in 1
    Hour", 2017, https://arxiv.org/abs/1706.02677.
"""

from __future__ import annotations

from noisy_keras._validation import check_int, check_number
from noisy_keras.optim import lr as lr_lib

# Relative rounding below which (B / b) / m is taken as exactly 1 (a multiplier
# computed as scale_learning_rate(lr, B, b) / lr may be off by an ulp).
_ROUNDING = 1e-12

__all__ = ["lr_multiplier_for_rule", "temperature_deficit"]


def _check_lr_multiplier(lr_multiplier) -> float:
    return check_number(
        "lr_multiplier",
        lr_multiplier,
        "a finite number > 0 (1 for no scaling, sqrt(B/b), B/b for linear)",
        lambda v: v > 0,
    )


def temperature_deficit(batch_size: int, small_batch_size: int, lr_multiplier=1.0) -> float:
    """s^2 = max(0, (B / b) / m - 1): the extra gradient variance, in units of Sigma / B.

    Noise of covariance s^2 Sigma / B added to the batch-B gradient, trained at
    m times the small batch's learning rate, gives the noise temperature
    eta Sigma / B of SGD at batch b (derivation in the module docstring). Values
    within 1e-12 of 0 (float rounding of m) are returned as exactly 0.

    Args:
        batch_size: B, examples per parameter update, an integer >= 1.
        small_batch_size: b, the batch whose temperature is the target, an integer >= 1.
        lr_multiplier: m = eta_B / eta_b, a finite number > 0: 1 (no scaling),
            sqrt(B/b) (square-root rule), B/b (linear rule); see
            `lr_multiplier_for_rule`.

    Returns:
        s^2 as a Python float >= 0.

    Example:
        >>> temperature_deficit(512, 32), temperature_deficit(512, 32, 4.0)
        (15.0, 3.0)
        >>> temperature_deficit(512, 32, lr_multiplier_for_rule("linear", 512, 32))
        0.0
    """
    batch_size = check_int("batch_size", batch_size, 1)
    small_batch_size = check_int("small_batch_size", small_batch_size, 1)
    lr_multiplier = _check_lr_multiplier(lr_multiplier)
    ratio = (batch_size / small_batch_size) / lr_multiplier
    if ratio - 1.0 <= _ROUNDING:
        return 0.0
    return ratio - 1.0


def lr_multiplier_for_rule(rule: str, batch_size: int, small_batch_size: int) -> float:
    """m = eta_B / eta_b of a scaling rule: "none" 1, "sqrt" sqrt(B/b), "linear" B/b.

    The same rules as `noisy_keras.optim.lr.scale_learning_rate` (Goyal et al. 2017;
    Hoffer et al. 2017), which this calls with a base learning rate of 1.

    Args:
        rule: one of `noisy_keras.optim.lr.SCALING_RULES`.
        batch_size: B, an integer >= 1.
        small_batch_size: b, the batch size the base learning rate was tuned for.

    Returns:
        m as a Python float.
    """
    return lr_lib.scale_learning_rate(1.0, batch_size, small_batch_size, rule)
