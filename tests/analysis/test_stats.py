"""Tests for noisy_keras.analysis.stats: known values of mean, std and Student-t intervals."""

import math

import numpy as np
import pytest
import scipy.stats

from noisy_keras.analysis import stats, summarize

# Student t quantiles from printed tables (two-sided 95% -> 0.975 quantile).
T_975_DF4 = 2.7764451051977987
T_975_DF1 = 12.706204736174707
T_995_DF9 = 3.2498355415921263


def test_known_values_five_samples():
    summary = summarize([1.0, 2.0, 3.0, 4.0, 5.0])
    assert summary.count == 5
    assert summary.mean == 3.0
    assert summary.std == pytest.approx(math.sqrt(2.5), rel=1e-15)
    half = T_975_DF4 * math.sqrt(2.5) / math.sqrt(5)
    assert summary.half_width == pytest.approx(half, rel=1e-12)
    assert (summary.ci_low, summary.ci_high) == pytest.approx((3.0 - half, 3.0 + half), rel=1e-12)
    assert summary.confidence == 0.95


def test_two_samples_and_other_level():
    summary = summarize([0.70, 0.74])
    assert summary.std == pytest.approx(0.04 / math.sqrt(2), rel=1e-12)
    assert summary.half_width == pytest.approx(T_975_DF1 * 0.02, rel=1e-12)
    ten = np.arange(10.0)
    wide = summarize(ten, confidence=0.99)
    assert wide.half_width == pytest.approx(T_995_DF9 * ten.std(ddof=1) / math.sqrt(10), rel=1e-12)


def test_single_value_has_undefined_spread():
    summary = summarize([0.5])
    assert summary.mean == 0.5
    assert math.isnan(summary.std) and math.isnan(summary.ci_low) and math.isnan(summary.half_width)
    assert summary.as_dict()["count"] == 1


def test_interval_covers_true_mean_at_its_level():
    # 2000 samples of size 5 from N(1, 2^2): coverage ~ Binomial(2000, 0.95); 4 sigma bounds.
    rng = np.random.default_rng(0)
    trials = 2000
    covered = sum(
        (s := summarize(rng.normal(1.0, 2.0, size=5))).ci_low <= 1.0 <= s.ci_high
        for _ in range(trials)
    )
    sigma = math.sqrt(trials * 0.95 * 0.05)
    assert abs(covered - 0.95 * trials) < 4 * sigma


@pytest.mark.parametrize(
    "values, confidence, match",
    [
        ([], 0.95, "non-empty"),
        ([[1.0, 2.0]], 0.95, "1-D"),
        ([1.0, float("nan")], 0.95, "finite"),
        ([1.0, 2.0], 1.0, "confidence"),
        ([1.0, 2.0], 0.0, "confidence"),
    ],
)
def test_bad_input_raises(values, confidence, match):
    with pytest.raises(ValueError, match=match):
        summarize(values, confidence=confidence)


def test_welch_difference_matches_the_hand_computed_interval():
    a, b = [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0]
    # s_a^2 = 5/3, s_b^2 = 4: v = 5/12 + 4/3 = 7/4; df = v^2 / ((5/12)^2/3 + (4/3)^2/2)
    v = 5 / 12 + 4 / 3
    df = v**2 / ((5 / 12) ** 2 / 3 + (4 / 3) ** 2 / 2)
    half = scipy.stats.t.ppf(0.975, df) * math.sqrt(v)
    d = stats.welch_difference(a, b)
    assert d.difference == pytest.approx(2.5 - 4.0)
    assert d.df == pytest.approx(df)
    assert (d.ci_low, d.ci_high) == pytest.approx((-1.5 - half, -1.5 + half))
    # the interval agrees with the unequal-variance t test: 0 lies outside iff p < 0.05
    p = scipy.stats.ttest_ind(a, b, equal_var=False).pvalue
    assert (d.ci_high < 0) == (p < 0.05)
    assert d.p_value == pytest.approx(p, rel=1e-10)
    with pytest.raises(ValueError, match="b needs at least two values"):
        stats.welch_difference(a, [1.0])
    with pytest.raises(ValueError, match="no spread"):
        stats.welch_difference([1.0, 1.0], [2.0, 2.0])


def test_holm_adjust_matches_the_step_down_rule_by_hand():
    # sorted 0.01 < 0.02 < 0.03 < 0.5 (m = 4): 4 x 0.01, max(0.04, 3 x 0.02), max(.., 2 x 0.03), 0.5
    assert stats.holm_adjust([0.03, 0.5, 0.01, 0.02]) == pytest.approx([0.06, 0.5, 0.04, 0.06])
    assert stats.holm_adjust([0.4, 0.3]) == pytest.approx([0.6, 0.6])  # monotone, capped
    assert stats.holm_adjust([0.9, 0.8]) == [1.0, 1.0]
    assert stats.holm_adjust([]) == []
    with pytest.raises(ValueError, match=r"p_values\[1\] must be in \[0, 1\]; received nan"):
        stats.holm_adjust([0.1, float("nan")])
