"""The reproduction's statistics: paired CIs and the claim verdicts."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rmsnorm.reproduce import stats as S


def test_t_quantiles():
    assert S.t_quantile(1) == 12.706 and S.t_quantile(4) == 2.776 and S.t_quantile(30) == 2.042
    assert 1.96 < S.t_quantile(200) < 1.98 and S.t_quantile(0) == math.inf


def test_paired_difference_and_ratio():
    d = S.paired_difference([3.0, 5.0, 7.0], [1.0, 2.0, 3.0])  # differences 2, 3, 4
    assert d.mean == 3.0 and d.n == 3
    assert d.lo == pytest.approx(3 - 4.303 / math.sqrt(3)) and d.hi == pytest.approx(3 + 4.303 / math.sqrt(3))
    r = S.paired_ratio([2.0, 2.0], [1.0, 1.0])
    assert r.mean == pytest.approx(2.0) and r.lo == pytest.approx(2.0) and r.hi == pytest.approx(2.0)
    one = S.paired_difference([1.0], [0.0])
    assert one.n == 1 and one.lo == -math.inf and S.non_inferior(one, 1.0) == S.UNRESOLVED
    with pytest.raises(ValueError, match="equal lengths"):
        S.paired_difference([1.0], [1.0, 2.0])


def test_harm_is_oriented_by_the_metric():
    # BLEU: higher is better, so 1 point lower is 1 point worse
    assert S.harm("BLEU", [20.0, 21.0], [21.0, 22.0]).mean == pytest.approx(1.0)
    # error: lower is better, so 1 point higher is 1 point worse
    assert S.harm("test error %", [11.0, 12.0], [10.0, 11.0]).mean == pytest.approx(1.0)


def test_non_inferiority_verdicts():
    iv = lambda lo, hi: S.Interval((lo + hi) / 2, lo, hi, 5)
    assert S.non_inferior(iv(-0.5, 0.4), 1.0) == S.SUPPORTED
    assert S.non_inferior(iv(1.2, 3.0), 1.0) == S.CONTRADICTED
    assert S.non_inferior(iv(0.5, 1.5), 1.0) == S.UNRESOLVED


def test_time_verdicts():
    ratio = lambda lo, hi: S.Interval(math.sqrt(lo * hi), lo, hi, 10)
    assert S.saves_claimed_time(ratio(0.60, 0.90)) == S.SUPPORTED  # saves 10-40%
    assert S.saves_claimed_time(ratio(0.95, 1.10)) == S.CONTRADICTED  # saves at most 5%
    assert S.saves_claimed_time(ratio(0.85, 0.97)) == S.UNRESOLVED  # 3-15%
    assert S.faster(ratio(0.8, 0.9)) == S.SUPPORTED and S.faster(ratio(1.01, 1.1)) == S.CONTRADICTED
    assert S.faster(ratio(0.9, 1.1)) == S.UNRESOLVED


def test_combine_summary_counts():
    assert S.combine(S.SUPPORTED, S.SUPPORTED) == S.SUPPORTED
    assert S.combine(S.SUPPORTED, S.UNRESOLVED) == S.UNRESOLVED
    assert S.combine(S.UNRESOLVED, S.CONTRADICTED) == S.CONTRADICTED
    assert S.summary([S.SUPPORTED, S.SUPPORTED]) == S.SUPPORTED and S.summary([S.SUPPORTED, S.UNRESOLVED]) == "mixed"
    assert S.counts([S.SUPPORTED, S.UNRESOLVED, S.SUPPORTED]) == "2 supported, 1 unresolved"


@given(st.lists(st.floats(-100, 100, allow_nan=False), min_size=2, max_size=30),
       st.floats(-10, 10, allow_nan=False))
def test_ci_contains_the_mean_and_shifts_with_the_data(xs, shift):
    a = S.mean_ci(xs)
    b = S.mean_ci([x + shift for x in xs])
    assert a.lo <= a.mean <= a.hi
    assert b.mean == pytest.approx(a.mean + shift, abs=1e-6)
    assert b.hi - b.lo == pytest.approx(a.hi - a.lo, rel=1e-6, abs=1e-6)


def _trimmed_by_hand(xs: list[float], g: float) -> tuple[float, float]:
    """The trimmed mean and CI half-width, written out with numpy (a second implementation)."""
    import numpy as np

    x = np.sort(np.asarray(xs, dtype=np.float64))
    n = len(x)
    k = int(np.floor(g * n))
    w = np.clip(x, x[k], x[n - k - 1])
    se = w.std(ddof=1) / ((1 - 2 * g) * np.sqrt(n))
    return float(x[k:n - k].mean()), S.t_quantile(n - 2 * k - 1) * float(se)


def test_trimmed_mean_ci_by_hand_and_at_zero_trim():
    xs = [0.02, -0.01, 0.03, 0.00, 0.01, 0.65, -0.52, 0.02, 0.01, -0.02, 0.04, 0.00]
    t = S.trimmed_mean_ci(xs, 0.2)  # k = 2 dropped at each end
    m, half = _trimmed_by_hand(xs, 0.2)
    assert t.mean == pytest.approx(m) and t.hi - t.mean == pytest.approx(half) and t.n == 12
    assert t.mean == pytest.approx(sum(sorted(xs)[2:10]) / 8)
    plain = S.mean_ci(xs)
    assert S.trimmed_mean_ci(xs, 0.0) == plain
    # the two interrupted rounds (0.65, -0.52) set the plain interval's width, not the trimmed one's
    assert t.hi - t.lo < 0.2 * (plain.hi - plain.lo)
    assert S.trimmed_mean_ci([1.0], 0.2).lo == -math.inf and S.trimmed_mean_ci([], 0.2).n == 0
    assert S.trimmed_mean_ci([1.0, 2.0, 3.0], 0.4).lo == -math.inf  # one value left: no interval
    with pytest.raises(ValueError, match="trim"):
        S.trimmed_mean_ci(xs, 0.5)


@given(st.lists(st.floats(-100, 100, allow_nan=False), min_size=5, max_size=40),
       st.sampled_from([0.0, 0.1, 0.2, 0.3]))
def test_trimmed_mean_ci_matches_a_second_implementation(xs, g):
    t = S.trimmed_mean_ci(xs, g)
    m, half = _trimmed_by_hand(xs, g)
    assert t.mean == pytest.approx(m, abs=1e-9) and (t.hi - t.mean) == pytest.approx(half, rel=1e-9, abs=1e-9)
    assert t.lo <= t.mean <= t.hi


def test_time_ratios_are_trimmed():
    a = [1.0] * 10 + [3.0]
    b = [1.0] * 11
    assert S.time_ratio(a, b).mean == pytest.approx(1.0)  # the one slow round is trimmed
    assert S.paired_ratio(a, b).mean > 1.05
