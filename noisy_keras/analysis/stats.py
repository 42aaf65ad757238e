"""Summary statistics over seeds: mean, sample standard deviation, Student-t confidence interval.

For n independent runs x_1..x_n (one per seed) with mean m and sample standard
deviation s (divisor n - 1), the two-sided confidence interval at level c is

    m +- t_{(1 + c) / 2, n - 1} * s / sqrt(n),

exact when the runs are normally distributed. With a single run the standard
deviation and the interval are undefined and reported as NaN.

References:
    W. S. Gosset ("Student"), "The Probable Error of a Mean", Biometrika 6(1), 1908.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import scipy.stats


@dataclasses.dataclass(frozen=True)
class Summary:
    """Mean, spread and confidence interval of a sample.

    Attributes:
        count: number of values n.
        mean: the sample mean.
        std: the sample standard deviation (divisor n - 1); NaN when n = 1.
        ci_low, ci_high: the confidence interval; NaN when n = 1.
        half_width: (ci_high - ci_low) / 2; NaN when n = 1.
        confidence: the confidence level, e.g. 0.95.
    """

    count: int
    mean: float
    std: float
    ci_low: float
    ci_high: float
    half_width: float
    confidence: float

    def as_dict(self) -> dict:
        """The fields as a plain dict (for CSV or Markdown rows)."""
        return dataclasses.asdict(self)


def summarize(values, *, confidence: float = 0.95) -> Summary:
    """Mean, sample standard deviation and Student-t confidence interval of `values`.

    Args:
        values: a 1-D sequence of finite numbers (one per seed), at least one.
        confidence: the confidence level, strictly between 0 and 1 (default 0.95).

    Returns:
        A `Summary`.
    """
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(
            f"values must be a non-empty 1-D sequence of numbers; received shape {array.shape}."
        )
    if not np.all(np.isfinite(array)):
        raise ValueError(f"values must all be finite; received {array.tolist()!r}.")
    if not isinstance(confidence, float | int) or not 0.0 < confidence < 1.0:
        raise ValueError(
            f"confidence must be a number strictly between 0 and 1; received {confidence!r}."
        )
    count = int(array.size)
    mean = float(array.mean())
    if count == 1:
        nan = float("nan")
        return Summary(count, mean, nan, nan, nan, nan, float(confidence))
    std = float(array.std(ddof=1))
    quantile = float(scipy.stats.t.ppf(0.5 + confidence / 2.0, df=count - 1))
    half_width = quantile * std / math.sqrt(count)
    return Summary(
        count, mean, std, mean - half_width, mean + half_width, half_width, float(confidence)
    )


@dataclasses.dataclass(frozen=True)
class Difference:
    """A difference of two means with Welch's confidence interval.

    Attributes:
        difference: mean(a) - mean(b).
        ci_low, ci_high: the confidence interval of the difference.
        df: the Welch-Satterthwaite degrees of freedom.
        confidence: the confidence level.
        p_value: the two-sided p-value of Welch's t-test of equal means.
    """

    difference: float
    ci_low: float
    ci_high: float
    df: float
    confidence: float
    p_value: float


def welch_difference(a, b, *, confidence: float = 0.95) -> Difference:
    """mean(a) - mean(b) with Welch's t interval (unequal variances).

    With s_a^2, s_b^2 the sample variances (divisor n - 1) and v = s_a^2 / n_a +
    s_b^2 / n_b, the interval is d +- t_{(1 + c) / 2, df} sqrt(v), with the
    Welch-Satterthwaite df = v^2 / ((s_a^2 / n_a)^2 / (n_a - 1) + (s_b^2 / n_b)^2
    / (n_b - 1)) (Welch 1947).

    Args:
        a, b: 1-D sequences of finite numbers, at least two each.
        confidence: strictly between 0 and 1.

    Raises:
        ValueError: fewer than two values in a sample, or no spread in either.
    """
    samples = []
    for name, values in (("a", a), ("b", b)):
        s = summarize(values, confidence=confidence)
        if s.count < 2:
            raise ValueError(f"{name} needs at least two values; received {s.count}.")
        samples.append((s.mean, s.std**2 / s.count, s.count))
    (mean_a, va, na), (mean_b, vb, nb) = samples
    v = va + vb
    if v == 0:
        raise ValueError("a and b have no spread: Welch's interval is undefined.")
    df = v**2 / (va**2 / (na - 1) + vb**2 / (nb - 1))
    half = float(scipy.stats.t.ppf(0.5 + confidence / 2.0, df=df)) * math.sqrt(v)
    d = mean_a - mean_b
    p = 2.0 * float(scipy.stats.t.sf(abs(d) / math.sqrt(v), df=df))
    return Difference(d, d - half, d + half, float(df), float(confidence), p)


def holm_adjust(p_values) -> list[float]:
    """Holm's step-down adjusted p-values for a family of m tests (Holm 1979).

    With the p-values sorted, p_(1) <= ... <= p_(m), the adjusted value of the k-th
    smallest is max over j <= k of min(1, (m - j + 1) p_(j)); rejecting where it is
    below a level controls the family-wise error rate at that level, under any
    dependence between the tests. Returned in the order given.

    Raises:
        ValueError: a p-value outside [0, 1] or not a number.
    """
    values = [float(p) for p in p_values]
    for i, p in enumerate(values):
        if not 0.0 <= p <= 1.0:  # NaN fails too
            raise ValueError(f"p_values[{i}] must be in [0, 1]; received {p!r}.")
    m = len(values)
    adjusted = [0.0] * m
    running = 0.0
    for rank, index in enumerate(sorted(range(m), key=lambda i: values[i])):
        running = max(running, min(1.0, (m - rank) * values[index]))
        adjusted[index] = running
    return adjusted
