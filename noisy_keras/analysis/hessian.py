"""Sharpness as the Hessian spectrum of the training loss: top eigenvalues and trace.

Jastrzebski et al. (2018) measure the flatness of a minimum by the largest
eigenvalue of the Hessian H of the training loss L(theta) (Jaiswal & Taura,
Section 2.4, Fig. 3). H is never formed: Hessian-vector products

    H v = d/dtheta <grad L(theta), v>

are computed by double backward (reverse-over-reverse) differentiation, batch by
batch, and averaged with weights n_b / N so that batches of unequal size give the
Hessian of the mean loss over the whole dataset. The model runs in inference mode
(BatchNormalization uses its moving statistics, Dropout is off), and the loss is
the data loss without regularization penalties.

The eigenvalues and the trace come from `noisy_keras.analysis.spectral`, which
needs only the products: Lanczos (the default) or shifted power iteration for
the top eigenvalues, Hutchinson's estimator for the trace.

References:
    S. Jastrzebski, Z. Kenton, D. Arpit, N. Ballas, A. Fischer, Y. Bengio and
    A. Storkey, "Three Factors Influencing Minima in SGD", 2018,
    https://arxiv.org/abs/1711.04623.
    B. A. Pearlmutter, "Fast Exact Multiplication by the Hessian", Neural
    Computation 6(1), 1994.
    C. Lanczos, "An iteration method for the solution of the eigenvalue problem
    of linear differential and integral operators", J. Res. NBS 45, 1950.
    M. F. Hutchinson, "A stochastic estimator of the trace of the influence
    matrix for Laplacian smoothing splines", 1990.
    Z. Yao, A. Gholami, K. Keutzer and M. Mahoney, "PyHessian: Neural Networks
    Through the Lens of the Hessian", 2020, https://arxiv.org/abs/1912.07145.
    S. K. Jaiswal and K. Taura, "Overcoming Generalization Gap in Large
    Mini-Batch Training of Deep Neural Networks" (Section 2.4, Fig. 3).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from noisy_keras._validation import check_positive_int
from noisy_keras.analysis import _common
from noisy_keras.analysis.spectral import (
    EigenResult,
    TraceEstimate,
    check_method,
    hutchinson_trace,
    lanczos,
    top_eigenvalue_power,
)


class HessianOperator:
    """v -> H v for the Hessian H of a model's mean training loss w.r.t. its trainable weights.

    Each call is one pass over `data`: per batch, a double-backward product of the
    batch-mean loss, weighted by the batch size, so that the result is the product
    with the Hessian of the mean loss over all examples. The model is called in
    inference mode and is not modified.

    Args:
        model: a built Keras model.
        data: `(x, y)` arrays or a batched `tf.data.Dataset` of `(x, y)`; for a
            fixed batch pass `(x[:b], y[:b])` with `batch_size=b`. A dataset must
            give the same examples on every pass (no random augmentation).
        loss: a `keras.losses.Loss` or per-example loss function; default
            `SparseCategoricalCrossentropy(from_logits=True)`.
        batch_size: batch size for arrays.

    Attributes:
        dim: number of trainable parameters (the flattened order of
            `model.trainable_variables`).
        num_products: Hessian-vector products computed so far.
    """

    def __init__(self, model: keras.Model, data, *, loss=None, batch_size: int = 256):
        if not isinstance(model, keras.Model):
            raise ValueError(f"model must be a keras.Model; received {type(model).__name__}.")
        self.model = model
        self.data = data
        self.loss = _common.resolve_loss(loss)
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.variables = list(model.trainable_variables)
        self.dim = _common.num_parameters(self.variables)
        if self.dim == 0:
            raise ValueError("model has no trainable weights; the Hessian is empty.")
        self.num_products = 0
        self._batch_product = tf.function(self._batch_product_eager, reduce_retracing=True)

    def _batch_product_eager(self, x, y, vector):
        zero = tf.UnconnectedGradients.ZERO
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                value = _common.mean_loss(self.loss, y, self.model(x, training=False))
            gradients = inner.gradient(value, self.variables, unconnected_gradients=zero)
            projection = tf.add_n(
                [tf.reduce_sum(g * v) for g, v in zip(gradients, vector, strict=True)]
            )
        return _common.flatten_tensors(
            outer.gradient(projection, self.variables, unconnected_gradients=zero)
        )

    def __call__(self, vector) -> np.ndarray:
        """H @ vector for a flat float64 vector of shape (dim,)."""
        vector = _common.check_vector(vector, self.dim, "vector")
        pieces = _common.split_flat(vector, self.variables)
        total, count = np.zeros(self.dim), 0
        for x, y in _common.iterate_batches(self.data, self.batch_size, "data"):
            n = _common.batch_length(y)
            total += n * self._batch_product(x, y, pieces).numpy()
            count += n
        if count == 0:
            raise ValueError("data holds no examples.")
        self.num_products += 1
        return total / count


def hessian_vector_product(model, data, vector, *, loss=None, batch_size: int = 256):
    """H v for the Hessian of the mean training loss; see `HessianOperator`.

    Args:
        model: as in `HessianOperator`.
        data: as in `HessianOperator`.
        loss: as in `HessianOperator`.
        batch_size: as in `HessianOperator`.
        vector: flat array of shape (number of trainable parameters,), in the order
            of `model.trainable_variables`.

    Returns:
        The float64 product, same shape as `vector`.
    """
    return HessianOperator(model, data, loss=loss, batch_size=batch_size)(vector)


def hessian_eigenvalues(
    model,
    data,
    k: int = 1,
    *,
    loss=None,
    method: str = "lanczos",
    max_iterations: int = 100,
    tolerance: float = 1e-3,
    seed: int = 0,
    batch_size: int = 256,
) -> EigenResult:
    """The k largest eigenvalues of the training-loss Hessian (sharpness for k = 1).

    Args:
        model: as in `HessianOperator`.
        data: as in `HessianOperator`.
        loss: as in `HessianOperator`.
        batch_size: as in `HessianOperator`.
        k: number of eigenvalues; ``method="power"`` supports only k = 1.
        method: ``"lanczos"`` (default; largest algebraic) or ``"power"``
            (shifted power iteration, `top_eigenvalue_power`).
        max_iterations: cap on Hessian-vector products (per pass, for power).
        tolerance: relative residual tolerance.
        seed: seed of the start vector.

    Returns:
        An `EigenResult`; `.eigenvalue` is the sharpness max_j lambda_j.

    References:
        Jastrzebski et al. 2018; Jaiswal & Taura, Fig. 3.
    """
    check_method(method)
    k = check_positive_int("k", k)
    if method == "power" and k != 1:
        raise ValueError(f'method="power" finds one eigenvalue; received k={k}. Use "lanczos".')
    operator = HessianOperator(model, data, loss=loss, batch_size=batch_size)
    if method == "power":
        return top_eigenvalue_power(
            operator, operator.dim, max_iterations=max_iterations, tolerance=tolerance, seed=seed
        )
    return lanczos(
        operator, operator.dim, k, max_iterations=max_iterations, tolerance=tolerance, seed=seed
    )


def hessian_trace(
    model, data, *, num_samples: int = 100, seed: int = 0, loss=None, batch_size: int = 256
) -> TraceEstimate:
    """Hutchinson's estimate of the trace of the training-loss Hessian.

    Args:
        model: as in `HessianOperator`.
        data: as in `HessianOperator`.
        loss: as in `HessianOperator`.
        batch_size: as in `HessianOperator`.
        num_samples: number of Rademacher vectors (one Hessian-vector product each).
        seed: the seed.

    Returns:
        A `TraceEstimate`.
    """
    operator = HessianOperator(model, data, loss=loss, batch_size=batch_size)
    return hutchinson_trace(operator, operator.dim, num_samples=num_samples, seed=seed)
