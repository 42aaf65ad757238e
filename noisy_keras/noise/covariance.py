"""Estimating tr(Sigma), the trace of the per-example gradient covariance, from group means.

Estimating tr(Sigma). Let g_1, ..., g_G (G >= 2) be the mean gradients of G
disjoint groups of n examples each (the micro-batches of one update, or the
halves of a replica's batch), drawn i.i.d. from the data: E g_j = g and
Cov g_j = Sigma / n. With g_bar their mean,

    E sum_j |g_j - g_bar|^2 = sum_j E|g_j - g|^2 - G E|g_bar - g|^2
                            = G tr(Sigma) / n - tr(Sigma) / n = (G - 1) tr(Sigma) / n,

so tr(Sigma) ~= n / (G - 1) * sum_j |g_j - g_bar|^2 is unbiased (the sample
variance of the group means, times n). For groups drawn without replacement
from N examples, Cov g_j = Sigma (N - n) / (n (N - 1)) and Cov(g_j, g_k) =
-Sigma / (N - 1), and the same estimate has mean tr(Sigma) N / (N - 1): unbiased
for the 1/(N - 1)-normalized trace (`analysis.covariance_trace(unbiased=True)`).

`noisy_keras.noise.matched.MatchedNoiseOptimizer` sizes its noise by these
estimates; the engine (`noisy_keras.engine.hooks`) computes them from the
micro-batches of an update or the halves of a replica's batch.

References:
    S. McCandlish et al., "An Empirical Model of Large-Batch Training", 2018,
    https://arxiv.org/abs/1812.06162 (Appendix A: the trace from gradients of
    two batch sizes).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from noisy_keras._validation import check_int

__all__ = ["covariance_trace_estimate", "streaming_spread_update", "two_group_trace_estimate"]


def covariance_trace_estimate(group_gradients, group_size) -> tf.Tensor:
    """tr(Sigma) ~= n / (G - 1) * sum_j |g_j - g_bar|^2 from G gradients of n-example groups.

    Unbiased for the per-example gradient covariance (derivation in the module
    docstring). Computed in two passes (mean first), in the gradients' dtype.

    Args:
        group_gradients: a sequence of G >= 2 gradients, each the mean-loss
            gradient of one group of examples, all with the same structure (a
            tensor, an array, or a list of them, one per variable; None entries
            and `tf.IndexedSlices` are allowed).
        group_size: n, examples per group (an integer >= 1 or a scalar tensor).

    Returns:
        A scalar tensor.

    Example:
        >>> float(covariance_trace_estimate([[1.0, 0.0], [3.0, 0.0]], group_size=4))
        8.0
    """
    if isinstance(group_gradients, (tf.Tensor, np.ndarray)) or len(group_gradients) < 2:
        raise ValueError(
            "group_gradients must be a sequence of G >= 2 gradients, one per group; received "
            f"{group_gradients!r:.200}."
        )
    if not tf.is_tensor(group_size):
        group_size = check_int("group_size", group_size, 1)
    groups = []
    for gradient in group_gradients:
        leaves = [g for g in tf.nest.flatten(gradient) if g is not None]
        groups.append([tf.convert_to_tensor(g) for g in leaves])
    count = len(groups)
    if any(len(g) != len(groups[0]) for g in groups) or not groups[0]:
        raise ValueError(
            "group_gradients must all have the same (non-empty) structure; received "
            f"{[len(g) for g in groups]} tensors per group."
        )
    dtype = groups[0][0].dtype
    squares = tf.zeros([], dtype)
    for leaves in zip(*groups):
        stacked = tf.stack([tf.cast(leaf, dtype) for leaf in leaves])
        deviation = stacked - tf.reduce_mean(stacked, axis=0)
        squares += tf.reduce_sum(tf.square(deviation))
    return tf.cast(group_size, dtype) / float(count - 1) * squares


def _leaves(gradient) -> list:
    return [tf.convert_to_tensor(g) for g in tf.nest.flatten(gradient) if g is not None]


def _flat_like(structure, reference: list) -> list:
    flat = tf.nest.flatten(structure) if structure is not None else [None] * len(reference)
    if len(flat) != len(reference):
        raise ValueError(
            f"previous_sum must have one entry per gradient ({len(reference)}); received "
            f"{len(flat)}."
        )
    return flat


def two_group_trace_estimate(first, second, first_size, second_size) -> tf.Tensor:
    """tr(Sigma) ~= |g_1 - g_2|^2 / (1/n_1 + 1/n_2) from the gradients of two disjoint groups.

    For groups of n_1 and n_2 examples drawn i.i.d. from the data,
    Cov(g_1 - g_2) = Sigma (1/n_1 + 1/n_2), so the estimate is unbiased; with
    n_1 = n_2 = n it is `covariance_trace_estimate([g_1, g_2], n)` =
    n |g_1 - g_2|^2 / 2. The engine splits a replica's batch into halves this
    way (an odd batch into n // 2 and n - n // 2). The sum of squares is taken
    in the gradients' dtype.

    Args:
        first, second: the mean-loss gradients of the two groups, same structure
            (a tensor or a list of tensors; None entries are skipped).
        first_size, second_size: n_1, n_2 >= 1 (ints or scalar tensors).

    Returns:
        A scalar tensor.

    Example:
        >>> float(two_group_trace_estimate([1.0, 0.0], [3.0, 0.0], 4, 4))
        8.0
    """
    first, second = _leaves(first), _leaves(second)
    if len(first) != len(second) or not first:
        raise ValueError(
            "first and second must have the same (non-empty) structure; received "
            f"{len(first)} and {len(second)} tensors."
        )
    dtype = first[0].dtype
    squares = tf.add_n(
        [tf.reduce_sum(tf.square(a - tf.cast(b, dtype))) for a, b in zip(first, second)]
    )
    n_1, n_2 = tf.cast(first_size, dtype), tf.cast(second_size, dtype)
    return squares * (n_1 * n_2 / (n_1 + n_2))


def streaming_spread_update(spread, previous_sum, gradient, count: int) -> tf.Tensor:
    """Welford's update of S_m = sum_{j<=m} |g_j - mean(g_0..g_m)|^2 by one more group.

    With s = sum_{j<m} g_j the sum of the m groups seen so far (the engine's
    accumulators), the mean before is a = s / m and after b = (s + g_m) / (m + 1),
    and S_m = S_{m-1} + (g_m - a) . (g_m - b) = S_{m-1} + |m g_m - s|^2 / (m (m + 1))
    (Welford 1962), so that after the last of G groups S_{G-1} = sum_j |g_j - g_bar|^2
    and `covariance_trace_estimate` = n / (G - 1) S_{G-1}, with one scalar of state
    and no copy of the earlier gradients; unlike sum |g_j|^2 - G |g_bar|^2 it does
    not lose precision when the mean is large next to the spread. S_0 = 0.

    Args:
        spread: S_{m-1}, a scalar (ignored for m = 0).
        previous_sum: s, the sum of the gradients of groups 0..m-1, one entry per
            entry of `gradient` (ignored for m = 0 and where `gradient` is None).
        gradient: g_m, a tensor or a list of tensors (None entries skipped).
        count: m, the index of this group (a Python int >= 0).

    Returns:
        S_m as a scalar tensor.
    """
    count = check_int("count", count, 0)
    gradients = tf.nest.flatten(gradient)
    pairs = [
        (tf.convert_to_tensor(g), s)
        for g, s in zip(gradients, _flat_like(previous_sum, gradients))
        if g is not None
    ]
    if not pairs:
        raise ValueError("gradient must hold at least one tensor; received none.")
    dtype = pairs[0][0].dtype
    if count == 0:
        return tf.zeros([], dtype)
    # (g - a) . (g - b) = |m g - s|^2 / (m (m + 1)): one difference per variable.
    squares = tf.add_n([tf.reduce_sum(tf.square(count * g - tf.cast(s, dtype))) for g, s in pairs])
    return tf.cast(spread, dtype) + squares / float(count * (count + 1))
