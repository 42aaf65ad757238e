"""Eigenvalues and trace of a symmetric operator known only by its products v -> A v.

Eigenvalues. Power iteration converges to the eigenvalue of largest *magnitude*.
Away from a minimum the Hessian has negative eigenvalues, and the most negative
can dominate. `top_eigenvalue_power` therefore runs a second power iteration on
the shifted operator H - lambda_1 I whenever the first one returns lambda_1 < 0;
the shifted spectrum is non-negative and its dominant eigenvalue is
lambda_max - lambda_1. `lanczos` (the default) returns the largest *algebraic*
eigenvalues directly, and the top k at once, in fewer products. Both stop when
the residual ||H v - lambda v|| is at most `tolerance * |lambda|` for every
requested pair; for a symmetric matrix this bounds the distance from lambda to the
nearest eigenvalue by the same amount.

Trace. Hutchinson's estimator tr(H) = E[z^T H z] with Rademacher z (entries +-1),
averaged over seeded samples, reported with its standard error.

References:
    C. Lanczos, "An iteration method for the solution of the eigenvalue problem
    of linear differential and integral operators", J. Res. NBS 45, 1950.
    M. F. Hutchinson, "A stochastic estimator of the trace of the influence
    matrix for Laplacian smoothing splines", 1990.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from noisy_keras._validation import check_int, check_positive_int, check_positive_number

__all__ = [
    "METHODS",
    "EigenResult",
    "TraceEstimate",
    "check_method",
    "hutchinson_trace",
    "lanczos",
    "power_iteration",
    "top_eigenvalue_power",
]

METHODS = ("lanczos", "power")


@dataclasses.dataclass(frozen=True)
class EigenResult:
    """Eigenpairs of a symmetric operator.

    Attributes:
        eigenvalues: shape (k,), in descending order.
        eigenvectors: shape (k, n), unit vectors, row i for eigenvalue i.
        residuals: ||A v_i - lambda_i v_i||, shape (k,).
        iterations: number of matrix-vector (Hessian-vector) products used.
        converged: whether every residual met the tolerance within the cap.
        method: ``"lanczos"`` or ``"power"``.
    """

    eigenvalues: np.ndarray
    eigenvectors: np.ndarray
    residuals: np.ndarray
    iterations: int
    converged: bool
    method: str

    @property
    def eigenvalue(self) -> float:
        """The largest eigenvalue found (the sharpness, for a Hessian)."""
        return float(self.eigenvalues[0])


@dataclasses.dataclass(frozen=True)
class TraceEstimate:
    """A Hutchinson trace estimate.

    Attributes:
        trace: the mean of z^T A z over the samples.
        standard_error: sample standard deviation / sqrt(num_samples).
        num_samples: number of Rademacher vectors z.
    """

    trace: float
    standard_error: float
    num_samples: int


def check_method(method) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; received {method!r}.")
    return method


def _check_tolerance(tolerance) -> float:
    return check_positive_number("tolerance", tolerance)


def power_iteration(
    matvec: Callable[[np.ndarray], np.ndarray],
    dim: int,
    *,
    max_iterations: int = 1000,
    tolerance: float = 1e-4,
    seed: int = 0,
    shift: float = 0.0,
) -> EigenResult:
    """The eigenpair of A whose eigenvalue lambda maximizes |lambda - shift|.

    Power iteration on A - shift * I from a seeded Gaussian start vector, with the
    Rayleigh quotient as the estimate. With shift = 0 this is the eigenvalue of
    largest magnitude, which may be negative; see `top_eigenvalue_power`.

    Args:
        matvec: v -> A v for a symmetric A, on float64 vectors of shape (dim,).
        dim: the dimension n.
        max_iterations: cap on the number of products.
        tolerance: stop when ||A v - lambda v|| <= tolerance * |lambda - shift|.
        seed: seed of the start vector.
        shift: the shift (see above).

    Returns:
        An `EigenResult` with k = 1; the eigenvalue is that of A (shift added back).
    """
    dim = check_positive_int("dim", dim)
    max_iterations = check_positive_int("max_iterations", max_iterations)
    tolerance = _check_tolerance(tolerance)
    vector = np.random.default_rng(seed).standard_normal(dim)
    vector /= np.linalg.norm(vector)
    converged, iterations = False, 0
    while iterations < max_iterations:
        iterations += 1
        product = np.asarray(matvec(vector), dtype=np.float64) - shift * vector
        value = float(vector @ product)
        residual = float(np.linalg.norm(product - value * vector))
        if residual <= tolerance * abs(value):
            converged = True
            break
        norm = np.linalg.norm(product)
        if norm == 0.0:
            converged = True
            break
        vector = product / norm
    return EigenResult(
        eigenvalues=np.array([value + shift]),
        eigenvectors=vector[None, :],
        residuals=np.array([residual]),
        iterations=iterations,
        converged=converged,
        method="power",
    )


def top_eigenvalue_power(
    matvec: Callable[[np.ndarray], np.ndarray],
    dim: int,
    *,
    max_iterations: int = 1000,
    tolerance: float = 1e-4,
    seed: int = 0,
) -> EigenResult:
    """The largest algebraic eigenvalue of a symmetric A by (shifted) power iteration.

    A first power iteration finds lambda_1, the eigenvalue of largest magnitude.
    If lambda_1 >= 0 it is also the largest eigenvalue. Otherwise a second power
    iteration runs on A - lambda_1 I, whose eigenvalues lambda_i - lambda_1 are
    >= 0 and whose dominant one is lambda_max - lambda_1.

    Args:
        matvec: as in `power_iteration`.
        dim: as in `power_iteration`.
        max_iterations: as in `power_iteration`; it caps each of the two passes.
        tolerance: as in `power_iteration`.
        seed: as in `power_iteration`.

    Returns:
        An `EigenResult` (k = 1); `iterations` counts the products of both passes
        and `converged` requires both to have converged.
    """
    first = power_iteration(
        matvec, dim, max_iterations=max_iterations, tolerance=tolerance, seed=seed
    )
    if first.eigenvalue >= 0:
        return first
    second = power_iteration(
        matvec,
        dim,
        max_iterations=max_iterations,
        tolerance=tolerance,
        seed=seed,
        shift=first.eigenvalue,
    )
    return dataclasses.replace(
        second,
        iterations=first.iterations + second.iterations,
        converged=first.converged and second.converged,
    )


def lanczos(
    matvec: Callable[[np.ndarray], np.ndarray],
    dim: int,
    k: int = 1,
    *,
    max_iterations: int = 100,
    tolerance: float = 1e-4,
    seed: int = 0,
) -> EigenResult:
    """The k largest (algebraic) eigenpairs of a symmetric A by Lanczos iteration.

    Lanczos with full re-orthogonalization from a seeded Gaussian start vector.
    After each product the tridiagonal matrix T_m is diagonalized; the Ritz pair
    (theta_i, Q s_i) has residual |beta_m s_{m,i}|, and the iteration stops when
    every one of the top k residuals is at most `tolerance * |theta_i|`. If the
    Krylov space becomes invariant before k pairs are found, the iteration
    continues from a new random vector orthogonal to it. Memory: (m + 1) vectors
    of size dim.

    Args:
        matvec: v -> A v for a symmetric A, on float64 vectors of shape (dim,).
        dim: the dimension n.
        k: number of eigenvalues, 1 <= k <= dim.
        max_iterations: cap on the number of products (at most dim are needed).
        tolerance: relative residual tolerance (see above).
        seed: seed of the start vector(s).

    Returns:
        An `EigenResult` with the k largest Ritz values in descending order.
    """
    dim = check_positive_int("dim", dim)
    k = check_positive_int("k", k)
    if k > dim:
        raise ValueError(f"k must be at most dim={dim}; received k={k}.")
    max_iterations = check_positive_int("max_iterations", max_iterations)
    tolerance = _check_tolerance(tolerance)
    rng = np.random.default_rng(seed)
    steps = min(max_iterations, dim)
    basis = np.zeros((steps + 1, dim))
    start = rng.standard_normal(dim)
    basis[0] = start / np.linalg.norm(start)
    diagonal, off_diagonal = [], []
    converged = False
    for j in range(steps):
        product = np.asarray(matvec(basis[j]), dtype=np.float64)
        diagonal.append(float(basis[j] @ product))
        for _ in range(2):  # full re-orthogonalization, twice is enough
            product -= basis[: j + 1].T @ (basis[: j + 1] @ product)
        beta = float(np.linalg.norm(product))
        tridiagonal = np.diag(diagonal) + np.diag(off_diagonal, 1) + np.diag(off_diagonal, -1)
        ritz_values, ritz_vectors = np.linalg.eigh(tridiagonal)
        order = np.argsort(ritz_values)[::-1][:k]
        residuals = beta * np.abs(ritz_vectors[-1, order])
        scale = max(np.max(np.abs(ritz_values)), np.finfo(np.float64).tiny)
        floor = 1e-10 * scale  # eigenvalues at 0 cannot meet a purely relative test
        allowed = tolerance * np.maximum(np.abs(ritz_values[order]), floor)
        if j + 1 >= k and np.all(residuals <= allowed):
            converged = True
            break
        if j + 1 == steps:
            break
        if beta <= 1e-12 * scale:  # invariant subspace: restart orthogonally
            beta = 0.0
            product = rng.standard_normal(dim)
            for _ in range(2):
                product -= basis[: j + 1].T @ (basis[: j + 1] @ product)
            product /= np.linalg.norm(product)
            basis[j + 1] = product
        else:
            basis[j + 1] = product / beta
        off_diagonal.append(beta)
    m = len(diagonal)
    vectors = (basis[:m].T @ ritz_vectors[:, order]).T
    return EigenResult(
        eigenvalues=ritz_values[order].copy(),
        eigenvectors=vectors,
        residuals=residuals,
        iterations=m,
        converged=converged,
        method="lanczos",
    )


def hutchinson_trace(
    matvec: Callable[[np.ndarray], np.ndarray],
    dim: int,
    *,
    num_samples: int = 100,
    seed: int = 0,
) -> TraceEstimate:
    """Hutchinson's estimate of tr(A): the mean of z^T A z over Rademacher vectors z.

    Unbiased; its variance per sample is 2 * sum_{i != j} A_ij^2 for symmetric A (so
    it is exact for a diagonal A).

    Args:
        matvec: v -> A v on float64 vectors of shape (dim,).
        dim: the dimension n.
        num_samples: number of seeded Rademacher vectors, >= 2.
        seed: the seed.

    Returns:
        A `TraceEstimate` with the standard error of the mean.
    """
    dim = check_positive_int("dim", dim)
    num_samples = check_int("num_samples", num_samples, 2)
    rng = np.random.default_rng(seed)
    samples = np.empty(num_samples)
    for i in range(num_samples):
        z = rng.integers(0, 2, size=dim) * 2.0 - 1.0
        samples[i] = z @ np.asarray(matvec(z), dtype=np.float64)
    return TraceEstimate(
        trace=float(samples.mean()),
        standard_error=float(samples.std(ddof=1) / np.sqrt(num_samples)),
        num_samples=num_samples,
    )
