"""Gradient noise: per-example gradients, their covariance, the 1/B law, the noise scale.

Jaiswal & Taura (Section 3.3) write the per-example gradients g_i, their mean
over the N training examples g = (1/N) sum_i g_i (Eq. 3), the mini-batch gradient
g_B = (1/B) sum_{i in batch} g_i (Eq. 4) and the covariance (Eq. 5)

    Sigma = (1/N) sum_i (g_i - g)(g_i - g)^T,

so that g_B ~ N(g, Sigma / B) for large B (Eq. 6): the gradient noise shrinks as
1/sqrt(B), which motivates adding noise back when B grows.

Finite population. For a batch of B distinct examples drawn *without replacement*
from the N training examples (as an epoch of shuffled mini-batches does), the
exact variance is

    E|g_B - g|^2 = tr(Sigma) / B * (N - B) / (N - 1),

with Sigma normalized by 1/N as in Eq. 5; drawn *with replacement* it is
tr(Sigma) / B. Eq. 6 is the large-N limit of both. `minibatch_gradient_variance`
samples either way (without replacement by default) and reports the matching
prediction; `covariance_trace(..., unbiased=True)` gives the 1/(N - 1) variant,
the unbiased estimate of the covariance of the distribution the data came from.

Simple noise scale. McCandlish et al. (2018, Appendix A) define
B_simple = tr(Sigma) / |G|^2 and estimate it without per-example gradients from
squared norms of mini-batch gradients at two batch sizes B_small < B_big, using
E|G_B|^2 = |G|^2 + c(B) tr(Sigma) with c(B) = 1/B:

    |G|^2  ~ (c_small |G_big|^2 - c_big |G_small|^2) / (c_small - c_big),
    S      ~ (|G_small|^2 - |G_big|^2) / (c_small - c_big),

averaging |G|^2 and S separately over repeats before dividing (the ratio of two
unbiased means; a mean of ratios would be biased). With c(B) = 1/B these are
McCandlish et al.'s formulas. Given a finite population of N examples sampled
without replacement, c(B) = (N - B) / (B (N - 1)) makes the same two estimates
exactly unbiased for the training set's |g|^2 and tr(Sigma).

Per-example gradients are computed in inference mode (BatchNormalization uses
its moving statistics, so examples do not interact; Dropout is off).

References:
    S. K. Jaiswal and K. Taura, "Overcoming Generalization Gap in Large
    Mini-Batch Training of Deep Neural Networks" (Section 3.3, Eq. 3-7).
    S. McCandlish, J. Kaplan, D. Amodei and the OpenAI Dota Team, "An Empirical
    Model of Large-Batch Training", 2018, https://arxiv.org/abs/1812.06162
    (Section 2.2 and Appendix A).
    W. G. Cochran, "Sampling Techniques", 3rd ed., Wiley, 1977 (Theorem 2.2, the
    finite population correction).
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from noisy_keras._validation import check_int, check_positive_int
from noisy_keras.analysis import _common


def _check_gradients(per_example_gradients, name: str = "per_example_gradients") -> np.ndarray:
    gradients = np.asarray(per_example_gradients, dtype=np.float64)
    if gradients.ndim != 2 or gradients.shape[0] < 1 or gradients.shape[1] < 1:
        raise ValueError(
            f"{name} must be a 2-D array (examples, parameters) with at least one row; "
            f"received shape {gradients.shape}."
        )
    return gradients


def per_example_gradients(model: keras.Model, x, y, *, loss=None, batch_size: int = 64):
    """The gradient of each example's loss w.r.t. the trainable weights, flattened.

    Vectorized: the Jacobian of the vector of per-example losses, chunk by chunk
    (`tf.GradientTape.jacobian`, which vectorizes with pfor).

    Args:
        model: a built Keras model, called in inference mode.
        x: inputs with N examples (an array or a structure of arrays).
        y: labels of the N examples.
        loss: a `keras.losses.Loss` or per-example loss function; default
            `SparseCategoricalCrossentropy(from_logits=True)`.
        batch_size: examples per vectorized chunk (memory grows with it).

    Returns:
        A float64 array of shape (N, n), n = number of trainable parameters in the
        order of `model.trainable_variables`. Its mean over rows is the full-batch
        gradient g (Eq. 3).
    """
    if not isinstance(model, keras.Model):
        raise ValueError(f"model must be a keras.Model; received {type(model).__name__}.")
    loss = _common.resolve_loss(loss)
    variables = list(model.trainable_variables)
    if not variables:
        raise ValueError("model has no trainable weights.")

    @tf.function(reduce_retracing=True)
    def chunk_gradients(x_chunk, y_chunk):
        with tf.GradientTape() as tape:
            losses = _common.per_example_loss(loss, y_chunk, model(x_chunk, training=False))
        jacobians = tape.jacobian(
            losses, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO
        )
        rows = tf.shape(losses)[0]
        return tf.concat(
            [tf.reshape(tf.cast(j, tf.float64), [rows, -1]) for j in jacobians], axis=1
        )

    chunks = [
        chunk_gradients(x_chunk, y_chunk).numpy()
        for x_chunk, y_chunk in _common.iterate_batches((x, y), batch_size, "x, y")
    ]
    return np.concatenate(chunks, axis=0)


def covariance_trace(per_example_gradients, *, unbiased: bool = False) -> float:
    """tr(Sigma) for the per-example gradient covariance (Eq. 5).

    Args:
        per_example_gradients: array (N, n).
        unbiased: False (default) divides by N as Eq. 5 is written; True divides
            by N - 1 (needs N >= 2).

    Returns:
        (1 / N) sum_i |g_i - g|^2, or the same with 1 / (N - 1).
    """
    gradients = _check_gradients(per_example_gradients)
    n = gradients.shape[0]
    if unbiased and n < 2:
        raise ValueError(f"unbiased=True needs at least 2 examples; received {n}.")
    squares = np.sum((gradients - gradients.mean(axis=0)) ** 2)
    return float(squares / (n - 1 if unbiased else n))


def exact_simple_noise_scale(per_example_gradients) -> float:
    """B_simple = tr(Sigma) / |g|^2 from per-example gradients (Sigma with 1/N, Eq. 5)."""
    gradients = _check_gradients(per_example_gradients)
    mean = gradients.mean(axis=0)
    return covariance_trace(gradients) / float(mean @ mean)


def variance_factor(batch_size: int, population_size: int | None = None) -> float:
    """c(B) in E|g_B - g|^2 = c(B) tr(Sigma), Sigma normalized by 1/N.

    Args:
        batch_size: B >= 1.
        population_size: N for sampling without replacement from N examples, giving
            c(B) = (N - B) / (B (N - 1)); None for sampling with replacement (or an
            infinite population), giving c(B) = 1 / B.

    Returns:
        c(B) as a float.
    """
    batch_size = check_positive_int("batch_size", batch_size)
    if population_size is None:
        return 1.0 / batch_size
    population_size = check_positive_int("population_size", population_size)
    if batch_size > population_size:
        raise ValueError(
            f"batch_size must be at most population_size={population_size} when sampling "
            f"without replacement; received {batch_size}."
        )
    if population_size == 1:
        return 0.0
    return (population_size - batch_size) / (batch_size * (population_size - 1))


@dataclasses.dataclass(frozen=True)
class MinibatchVariance:
    """Measured and predicted E|g_B - g|^2 per batch size.

    Attributes:
        batch_sizes: the batch sizes B, shape (K,).
        variance: mean of |g_B - g|^2 over the sampled batches, shape (K,).
        standard_error: its standard error, shape (K,).
        predicted: c(B) tr(Sigma) (see `variance_factor`), shape (K,).
        num_batches: batches sampled per batch size.
        replace: whether examples were drawn with replacement.
    """

    batch_sizes: np.ndarray
    variance: np.ndarray
    standard_error: np.ndarray
    predicted: np.ndarray
    num_batches: int
    replace: bool


def minibatch_gradient_variance(
    per_example_gradients,
    batch_sizes,
    *,
    num_batches: int = 200,
    replace: bool = False,
    seed: int = 0,
) -> MinibatchVariance:
    """E|g_B - g|^2 as a function of B, measured by sampling and predicted (Eq. 6).

    Args:
        per_example_gradients: array (N, n).
        batch_sizes: batch sizes to measure, each in [1, N] without replacement.
        num_batches: batches sampled per batch size (>= 2).
        replace: draw each batch's examples with replacement (prediction
            tr(Sigma) / B) or without (default; prediction tr(Sigma) (N - B) /
            (B (N - 1))).
        seed: the seed.

    Returns:
        A `MinibatchVariance`.
    """
    gradients = _check_gradients(per_example_gradients)
    num_batches = check_int("num_batches", num_batches, 2)
    sizes = np.atleast_1d(np.asarray(batch_sizes))
    if sizes.ndim != 1 or sizes.size == 0 or not np.issubdtype(sizes.dtype, np.integer):
        raise ValueError(
            f"batch_sizes must be a 1-D sequence of integers; received {batch_sizes!r}."
        )
    n = gradients.shape[0]
    population = None if replace else n
    trace = covariance_trace(gradients)
    mean = gradients.mean(axis=0)
    rng = np.random.default_rng(seed)
    variance, error, predicted = [], [], []
    for size in sizes:
        factor = variance_factor(int(size), population)
        squares = np.empty(num_batches)
        for b in range(num_batches):
            batch = rng.choice(n, size=int(size), replace=replace)
            deviation = gradients[batch].mean(axis=0) - mean
            squares[b] = deviation @ deviation
        variance.append(squares.mean())
        error.append(squares.std(ddof=1) / np.sqrt(num_batches))
        predicted.append(factor * trace)
    return MinibatchVariance(
        batch_sizes=sizes.astype(np.int64),
        variance=np.asarray(variance),
        standard_error=np.asarray(error),
        predicted=np.asarray(predicted),
        num_batches=num_batches,
        replace=replace,
    )


@dataclasses.dataclass(frozen=True)
class NoiseScaleEstimate:
    """McCandlish et al.'s two-batch-size estimate of the simple noise scale.

    Attributes:
        noise_scale: B_simple = covariance_trace / gradient_sq_norm.
        gradient_sq_norm: the estimate of |G|^2, averaged over repeats.
        covariance_trace: the estimate of tr(Sigma), averaged over repeats.
        small_batch_size, big_batch_size: the two batch sizes.
        small_sq_norms, big_sq_norms: the measured |G_B|^2, one per repeat.
        population_size: N if the finite-population factor was used, else None.
    """

    noise_scale: float
    gradient_sq_norm: float
    covariance_trace: float
    small_batch_size: int
    big_batch_size: int
    small_sq_norms: np.ndarray
    big_sq_norms: np.ndarray
    population_size: int | None


def simple_noise_scale_from_norms(
    small_sq_norms,
    big_sq_norms,
    small_batch_size: int,
    big_batch_size: int,
    *,
    population_size: int | None = None,
) -> NoiseScaleEstimate:
    """B_simple from squared gradient norms measured at two batch sizes (McCandlish, App. A).

    Args:
        small_sq_norms: |G_B_small|^2 for each repeat (e.g. per-replica gradients).
        big_sq_norms: |G_B_big|^2 for each repeat (e.g. the all-reduced gradient).
        small_batch_size: B_small < B_big.
        big_batch_size: B_big.
        population_size: N when batches were drawn without replacement from N
            examples (applies the finite-population factor); None (default) for
            McCandlish et al.'s infinite-population formulas.

    Returns:
        A `NoiseScaleEstimate`; the two estimates are averaged separately over the
        repeats and then divided.
    """
    small = np.atleast_1d(np.asarray(small_sq_norms, dtype=np.float64))
    big = np.atleast_1d(np.asarray(big_sq_norms, dtype=np.float64))
    if small.ndim != 1 or small.size == 0 or small.shape != big.shape:
        raise ValueError(
            "small_sq_norms and big_sq_norms must be non-empty 1-D sequences of the same "
            f"length; received shapes {small.shape} and {big.shape}."
        )
    small_batch_size = check_positive_int("small_batch_size", small_batch_size)
    big_batch_size = check_positive_int("big_batch_size", big_batch_size)
    if small_batch_size >= big_batch_size:
        raise ValueError(
            "small_batch_size must be smaller than big_batch_size; received "
            f"small_batch_size={small_batch_size}, big_batch_size={big_batch_size}."
        )
    c_small = variance_factor(small_batch_size, population_size)
    c_big = variance_factor(big_batch_size, population_size)
    gradient_sq_norm = float(np.mean((c_small * big - c_big * small) / (c_small - c_big)))
    trace = float(np.mean((small - big) / (c_small - c_big)))
    return NoiseScaleEstimate(
        noise_scale=trace / gradient_sq_norm,
        gradient_sq_norm=gradient_sq_norm,
        covariance_trace=trace,
        small_batch_size=small_batch_size,
        big_batch_size=big_batch_size,
        small_sq_norms=small,
        big_sq_norms=big,
        population_size=population_size,
    )


def simple_noise_scale(
    model: keras.Model,
    x,
    y,
    *,
    small_batch_size: int,
    big_batch_size: int,
    num_repeats: int = 50,
    seed: int = 0,
    loss=None,
) -> NoiseScaleEstimate:
    """B_simple of a model on a training set, from mini-batch gradient norms.

    Each repeat draws B_big distinct examples (without replacement), and the first
    B_small of them form the small batch, so both are uniform random subsets; the
    mean-loss gradients of both batches give |G_small|^2 and |G_big|^2, and
    `simple_noise_scale_from_norms` with `population_size=N` turns them into
    unbiased estimates of the training set's |g|^2 and tr(Sigma) (Eq. 3, 5).

    Args:
        model: a built Keras model, called in inference mode; not modified.
        x: training inputs, N examples.
        y: training labels.
        small_batch_size: B_small, 1 <= B_small < B_big.
        big_batch_size: B_big <= N.
        num_repeats: number of batch pairs.
        seed: the seed.
        loss: a `keras.losses.Loss` or per-example loss function; default
            `SparseCategoricalCrossentropy(from_logits=True)`.

    Returns:
        A `NoiseScaleEstimate`.
    """
    if not isinstance(model, keras.Model):
        raise ValueError(f"model must be a keras.Model; received {type(model).__name__}.")
    n = _common.check_arrays(x, y, "x, y")
    num_repeats = check_positive_int("num_repeats", num_repeats)
    small_batch_size = check_positive_int("small_batch_size", small_batch_size)
    big_batch_size = check_positive_int("big_batch_size", big_batch_size)
    if small_batch_size >= big_batch_size:
        raise ValueError(
            "small_batch_size must be smaller than big_batch_size; received "
            f"small_batch_size={small_batch_size}, big_batch_size={big_batch_size}."
        )
    if big_batch_size > n:
        raise ValueError(
            f"big_batch_size must be at most the number of examples ({n}); "
            f"received {big_batch_size}."
        )
    loss = _common.resolve_loss(loss)
    variables = list(model.trainable_variables)

    value_and_gradient = _common.mean_loss_and_flat_gradient(model, variables, loss)

    def squared_gradient_norm(x_batch, y_batch):
        _, flat = value_and_gradient(x_batch, y_batch)
        return tf.reduce_sum(flat * flat)

    rng = np.random.default_rng(seed)
    small, big = np.empty(num_repeats), np.empty(num_repeats)
    for r in range(num_repeats):
        indices = rng.choice(n, size=big_batch_size, replace=False)
        small_batch = indices[:small_batch_size]
        small[r] = float(
            squared_gradient_norm(_common.take(x, small_batch), _common.take(y, small_batch))
        )
        big[r] = float(squared_gradient_norm(_common.take(x, indices), _common.take(y, indices)))
    return simple_noise_scale_from_norms(
        small, big, small_batch_size, big_batch_size, population_size=n
    )
