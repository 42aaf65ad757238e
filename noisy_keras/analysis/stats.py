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
