"""Keskar et al.'s epsilon-sharpness: the largest loss increase in a small box.

Metric 2.1 of Keskar et al. (2017). For a loss f at parameters x in R^n and a
matrix A in R^{n x p} whose columns span a random p-dimensional subspace, let

    C_eps = { y in R^p : |y_i| <= eps * (|(A^+ x)_i| + 1) },   A^+ the pseudo-inverse,

    phi_{x,f}(eps, A) = 100 * (max_{y in C_eps} f(x + A y) - f(x)) / (1 + f(x)).

With A = I_n (``subspace_dim=None``) the box is |y_i| <= eps * (|x_i| + 1) in the
full parameter space. The maximization is approximate: a few iterations of
L-BFGS-B (Keskar et al. use p = 100, eps in {1e-3, 5e-4}; maxiter 10 here). The
reported maximum is the largest loss evaluated, and at least f(x) since y = 0 lies
in the box, so the metric is never negative.

Choices made here (the paper leaves them open):

* A has independent standard normal entries, drawn from `seed`.
* L-BFGS-B starts from a point drawn uniformly from the box (``start="random"``,
  the default, seeded): at a trained minimum the gradient is close to zero and a
  start at y = 0 can stop at once with nothing found. ``start="zero"`` starts at
  y = 0.
* f is the mean data loss over `data`, in inference mode, without regularization.

Cost: A takes n * p * 8 bytes (n = number of trainable parameters), and A^+ x is
found by least squares.

References:
    N. S. Keskar, D. Mudigere, J. Nocedal, M. Smelyanskiy and P. T. P. Tang,
    "On Large-Batch Training for Deep Learning: Generalization Gap and Sharp
    Minima", ICLR 2017, https://arxiv.org/abs/1609.04836 (Section 2.2.2,
    Metric 2.1, Tables 3 and 4).
    R. H. Byrd, P. Lu, J. Nocedal and C. Zhu, "A Limited Memory Algorithm for
    Bound Constrained Optimization", SIAM J. Sci. Comput. 16(5), 1995.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import keras
import numpy as np
import scipy.optimize

from noisy_keras._validation import check_positive_int, check_positive_number
from noisy_keras.analysis import _common

STARTS = ("random", "zero")


@dataclasses.dataclass(frozen=True)
class SharpnessResult:
    """Keskar et al.'s epsilon-sharpness and what went into it.

    Attributes:
        sharpness: 100 * (max_loss - loss) / (1 + loss).
        loss: f(x), the loss at the given parameters.
        max_loss: the largest loss found in the box (>= loss).
        epsilon: the box size.
        subspace_dim: p, or None for the full parameter space.
        iterations: L-BFGS-B iterations run.
        evaluations: loss-and-gradient evaluations, f(x) included.
    """

    sharpness: float
    loss: float
    max_loss: float
    epsilon: float
    subspace_dim: int | None
    iterations: int
    evaluations: int


def random_subspace(dim: int, subspace_dim: int, *, seed=0) -> np.ndarray:
    """A (dim, subspace_dim) matrix of independent standard normal entries.

    `seed` is anything `np.random.default_rng` accepts (an int, a SeedSequence).
    """
    dim = check_positive_int("dim", dim)
    subspace_dim = check_positive_int("subspace_dim", subspace_dim)
    return np.random.default_rng(seed).standard_normal((dim, subspace_dim))


def sharpness_of_function(
    value_and_gradient: Callable[[np.ndarray], tuple[float, np.ndarray]],
    x,
    *,
    epsilon: float = 1e-3,
    projection=None,
    max_iterations: int = 10,
    start: str = "random",
    seed: int = 0,
) -> SharpnessResult:
    """Epsilon-sharpness (Keskar et al.'s Metric 2.1) of a differentiable function.

    Args:
        value_and_gradient: theta -> (f(theta), grad f(theta)) on float64 vectors.
        x: the point, shape (n,).
        epsilon: box size, > 0.
        projection: A, shape (n, p), or None for the full space (A = I_n).
        max_iterations: L-BFGS-B iteration cap.
        start: ``"random"`` (uniform in the box, seeded) or ``"zero"``.
        seed: seed of the random start (anything `np.random.default_rng` accepts).

    Returns:
        A `SharpnessResult`.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"x must be a non-empty 1-D vector; received shape {x.shape}.")
    epsilon = check_positive_number("epsilon", epsilon)
    max_iterations = check_positive_int("max_iterations", max_iterations)
    if start not in STARTS:
        raise ValueError(f"start must be one of {STARTS}; received {start!r}.")
    if projection is None:
        coordinates = x
        to_parameters = lambda y: y
        to_subspace = lambda g: g
    else:
        projection = np.asarray(projection, dtype=np.float64)
        if projection.ndim != 2 or projection.shape[0] != x.size or projection.shape[1] < 1:
            raise ValueError(
                f"projection must have shape ({x.size}, p) with p >= 1; "
                f"received shape {projection.shape}."
            )
        coordinates = np.linalg.lstsq(projection, x, rcond=None)[0]  # A^+ x
        to_parameters = lambda y: projection @ y
        to_subspace = lambda g: projection.T @ g
    half_width = epsilon * (np.abs(coordinates) + 1.0)

    base_value, _ = value_and_gradient(x)
    base_value = float(base_value)
    record = {"max": base_value, "evaluations": 1}

    def negative_objective(y):
        value, gradient = value_and_gradient(x + to_parameters(y))
        value = float(value)
        record["evaluations"] += 1
        record["max"] = max(record["max"], value)
        return -value, -to_subspace(np.asarray(gradient, dtype=np.float64))

    if start == "random":
        y0 = np.random.default_rng(seed).uniform(-half_width, half_width)
    else:
        y0 = np.zeros_like(half_width)
    result = scipy.optimize.minimize(
        negative_objective,
        y0,
        jac=True,
        method="L-BFGS-B",
        bounds=scipy.optimize.Bounds(-half_width, half_width),
        options={"maxiter": max_iterations},
    )
    max_value = record["max"]
    return SharpnessResult(
        sharpness=100.0 * (max_value - base_value) / (1.0 + base_value),
        loss=base_value,
        max_loss=max_value,
        epsilon=epsilon,
        subspace_dim=None if projection is None else int(projection.shape[1]),
        iterations=int(result.nit),
        evaluations=record["evaluations"],
    )


def loss_and_gradient_function(model: keras.Model, data, *, loss=None, batch_size: int = 256):
    """theta -> (mean loss over `data`, gradient), evaluated on a clone of `model`.

    theta is the flat vector of the trainable weights in the order of
    `model.trainable_variables`. `model` itself is never modified.

    Args:
        model: a built Keras model.
        data: `(x, y)` arrays or a batched `tf.data.Dataset` of `(x, y)`.
        loss: a `keras.losses.Loss` or per-example loss function; default
            `SparseCategoricalCrossentropy(from_logits=True)`.
        batch_size: batch size for arrays.

    Returns:
        `(function, theta0)`: the function on float64 vectors, and the model's
        current trainable weights as a flat float64 vector.
    """
    if not isinstance(model, keras.Model):
        raise ValueError(f"model must be a keras.Model; received {type(model).__name__}.")
    loss = _common.resolve_loss(loss)
    batch_size = check_positive_int("batch_size", batch_size)
    clone = _common.clone_model(model)
    variables = list(clone.trainable_variables)
    dim = _common.num_parameters(variables)
    if dim == 0:
        raise ValueError("model has no trainable weights.")

    batch_value_and_gradient = _common.mean_loss_and_flat_gradient(clone, variables, loss)

    def value_and_gradient(theta):
        theta = _common.check_vector(theta, dim, "theta")
        for variable, piece in zip(variables, _common.split_flat(theta, variables), strict=True):
            variable.assign(piece)
        total_value, total_gradient, count = 0.0, np.zeros(dim), 0
        for x, y in _common.iterate_batches(data, batch_size, "data"):
            n = _common.batch_length(y)
            value, gradient = batch_value_and_gradient(x, y)
            total_value += n * float(value)
            total_gradient += n * gradient.numpy()
            count += n
        if count == 0:
            raise ValueError("data holds no examples.")
        return total_value / count, total_gradient / count

    return value_and_gradient, _common.flat_values(variables)


def epsilon_sharpness(
    model: keras.Model,
    data,
    *,
    epsilon: float = 1e-3,
    subspace_dim: int | None = 100,
    seed: int = 0,
    max_iterations: int = 10,
    start: str = "random",
    loss=None,
    batch_size: int = 256,
) -> SharpnessResult:
    """Keskar et al.'s epsilon-sharpness of a model's training loss (Metric 2.1).

    Args:
        model: a built Keras model; not modified (the search runs on a clone).
        data: the training data, `(x, y)` arrays or a batched `tf.data.Dataset`.
        epsilon: box size; Keskar et al. report 1e-3 and 5e-4.
        subspace_dim: p, the dimension of the random subspace (default 100), or
            None for the full parameter space (A = I). p larger than the number of
            parameters is refused.
        seed: seed of A and of the random start.
        max_iterations: L-BFGS-B iteration cap (default 10).
        start: ``"random"`` (default) or ``"zero"``; see the module docstring.
        loss: a `keras.losses.Loss` or per-example loss function; default
            `SparseCategoricalCrossentropy(from_logits=True)`.
        batch_size: batch size for arrays.

    Returns:
        A `SharpnessResult`; `.sharpness` is the metric, in percent.

    Example:
        >>> table = {eps: epsilon_sharpness(model, (x_train, y_train), epsilon=eps).sharpness
        ...          for eps in (1e-3, 5e-4)}
    """
    function, theta = loss_and_gradient_function(model, data, loss=loss, batch_size=batch_size)
    subspace_seed, start_seed = np.random.SeedSequence(seed).spawn(2)
    projection = None
    if subspace_dim is not None:
        subspace_dim = check_positive_int("subspace_dim", subspace_dim)
        if subspace_dim > theta.size:
            raise ValueError(
                f"subspace_dim must be at most the number of trainable parameters "
                f"({theta.size}), or None for the full space; received {subspace_dim}."
            )
        projection = random_subspace(theta.size, subspace_dim, seed=subspace_seed)
    return sharpness_of_function(
        function,
        theta,
        epsilon=epsilon,
        projection=projection,
        max_iterations=max_iterations,
        start=start,
        seed=start_seed,
    )
