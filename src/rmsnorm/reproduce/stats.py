"""Paired statistics and the verdicts on the paper's claims, computed from raw per-seed and per-round data.

Every comparison pairs what was measured under the same conditions: quality by seed (same data order and
initialisation stream), time by round (the variants take turns within a round). A quality comparison is the
mean of the paired differences with a two-sided 95% Student-t confidence interval. A time comparison is the
20%-trimmed mean of the paired log ratios with its Tukey-McLaughlin interval (:func:`trimmed_mean_ci`):
timing on a shared machine has heavy tails (a round the operating system interrupted is off by tens of
percent while half of the rounds lie within a few percent of the median), and trimming keeps a handful of
such rounds from setting the width of the interval. One pair gives no interval.

The claims (Zhang & Sennrich 2019) and how each comparison decides them:

- **C1, comparable quality**: RMSNorm is at most ``margin`` worse than LayerNorm (a non-inferiority test;
  the margin per metric is in :data:`MARGINS`). supported: the whole CI of "how much worse" lies below
  the margin; contradicted: the whole CI lies above it; unresolved otherwise.
- **C2, 7%-64% less time**: the time RMSNorm saves relative to LayerNorm. supported: the CI of the saving
  lies at or above 7%; contradicted: the whole CI lies below 7% (including "slower"); unresolved otherwise.
- **C3, pRMSNorm comparable to RMSNorm at lower cost**: both "pRMSNorm at most ``margin`` worse than
  RMSNorm" (as C1) and "pRMSNorm faster than RMSNorm" (the CI of the time ratio below 1; contradicted when
  it lies above 1). supported when both parts are; contradicted when either is; unresolved otherwise.

A claim over several tasks or shapes is summarised by counting its comparisons' verdicts.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass

SUPPORTED, CONTRADICTED, UNRESOLVED = "supported", "contradicted", "unresolved"
CLAIM_SAVING_PCT = (7.0, 64.0)  # the paper's range of time saved by RMSNorm over LayerNorm
TIME_TRIM = 0.2  # share of the round-paired log time ratios trimmed at each end (module docstring)
# Non-inferiority margins, in the metric's own units, fixed before any run: about the spread between
# the paper's own LayerNorm and RMSNorm results on each kind of task.
MARGINS = {"BLEU": 1.0, "test error %": 1.0, "R@1": 2.0}
# Which direction is better, per metric.
HIGHER_IS_BETTER = {"BLEU": True, "test error %": False, "R@1": True}

# two-sided 95% Student-t quantiles t_{0.975, df} for df = 1..30
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t_quantile(df: int) -> float:
    """t_{0.975, df}: the table for df <= 30, then the normal quantile with a 1/df correction."""
    if df < 1:
        return math.inf
    return _T975[df - 1] if df <= 30 else 1.95996 + 2.37 / df


@dataclass(frozen=True)
class Interval:
    """Mean of n paired values and its two-sided 95% CI (lo = hi = mean ± inf for n < 2)."""

    mean: float
    lo: float
    hi: float
    n: int

    def as_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


def mean_ci(values: Sequence[float]) -> Interval:
    """Mean and its two-sided 95% Student-t CI: :func:`trimmed_mean_ci` with nothing trimmed."""
    return trimmed_mean_ci(values, 0.0)


def trimmed_mean_ci(values: Sequence[float], trim: float) -> Interval:
    """The ``trim``-trimmed mean (``k = floor(trim * n)`` values dropped at each end) and its two-sided 95% CI
    (Tukey & McLaughlin 1963; Wilcox, *Introduction to Robust Estimation and Hypothesis Testing*, 4.3):
    standard error ``s_w / ((1 - 2 trim) sqrt(n))`` from the standard deviation ``s_w`` of the values
    winsorized at the same points, Student-t with ``n - 2k - 1`` degrees of freedom (with ``trim = 0``, the
    plain t interval)."""
    if not 0.0 <= trim < 0.5:
        raise ValueError(f"trim must be in [0, 0.5), got {trim}")
    xs = sorted(values)
    n = len(xs)
    k = math.floor(trim * n)
    if n == 0:
        return Interval(math.nan, -math.inf, math.inf, 0)
    m = statistics.fmean(xs[k:n - k])
    if n - 2 * k < 2:
        return Interval(m, -math.inf, math.inf, n)
    wins = [xs[k]] * k + xs[k:n - k] + [xs[n - k - 1]] * k
    half = t_quantile(n - 2 * k - 1) * statistics.stdev(wins) / ((1 - 2 * trim) * math.sqrt(n))
    return Interval(m, m - half, m + half, n)


def paired_difference(a: Sequence[float], b: Sequence[float]) -> Interval:
    """Mean of a_i - b_i with its CI (pairs by position)."""
    if len(a) != len(b):
        raise ValueError(f"paired samples need equal lengths, got {len(a)} and {len(b)}")
    return mean_ci([x - y for x, y in zip(a, b)])


def paired_ratio(a: Sequence[float], b: Sequence[float], trim: float = 0.0) -> Interval:
    """Geometric mean of a_i / b_i with its CI (a CI on log ratios, mapped back); with ``trim``, the
    trimmed mean of the log ratios (:func:`trimmed_mean_ci`)."""
    if len(a) != len(b):
        raise ValueError(f"paired samples need equal lengths, got {len(a)} and {len(b)}")
    logs = trimmed_mean_ci([math.log(x / y) for x, y in zip(a, b)], trim)
    return Interval(math.exp(logs.mean), math.exp(logs.lo) if logs.n > 1 else 0.0,
                    math.exp(logs.hi) if logs.n > 1 else math.inf, logs.n)


def time_ratio(a: Sequence[float], b: Sequence[float]) -> Interval:
    """t(a) / t(b) from round-paired timings: the 20%-trimmed geometric mean and its CI (module docstring)."""
    return paired_ratio(a, b, TIME_TRIM)


def within(ratio: Interval, rel: float) -> bool:
    """Whether a ratio's CI lies within a factor exp(±rel) of its mean (False without a CI)."""
    return ratio.n >= 2 and max(math.log(ratio.hi / ratio.mean), math.log(ratio.mean / ratio.lo)) <= rel


def harm(metric: str, ours: Sequence[float], ref: Sequence[float]) -> Interval:
    """How much worse ``ours`` is than ``ref`` in the metric's units, paired by seed (negative: better)."""
    d = paired_difference(ours, ref)
    if HIGHER_IS_BETTER[metric]:
        return Interval(-d.mean, -d.hi, -d.lo, d.n)
    return d


def non_inferior(h: Interval, margin: float) -> str:
    """Verdict of "at most ``margin`` worse" from the CI of how much worse."""
    if h.n < 2:
        return UNRESOLVED
    if h.hi < margin:
        return SUPPORTED
    if h.lo > margin:
        return CONTRADICTED
    return UNRESOLVED


def saving_pct(ratio: Interval) -> Interval:
    """Time saved in percent from a time-ratio CI (ours / reference)."""
    return Interval(100 * (1 - ratio.mean), 100 * (1 - ratio.hi), 100 * (1 - ratio.lo), ratio.n)


def saves_claimed_time(ratio: Interval, low: float = CLAIM_SAVING_PCT[0]) -> str:
    """C2's verdict from the CI of t(RMSNorm) / t(LayerNorm)."""
    s = saving_pct(ratio)
    if s.n < 2:
        return UNRESOLVED
    if s.lo >= low:
        return SUPPORTED
    if s.hi < low:
        return CONTRADICTED
    return UNRESOLVED


def faster(ratio: Interval) -> str:
    """Verdict of "ours is faster" from the CI of t(ours) / t(reference)."""
    if ratio.n < 2:
        return UNRESOLVED
    if ratio.hi < 1.0:
        return SUPPORTED
    if ratio.lo > 1.0:
        return CONTRADICTED
    return UNRESOLVED


def combine(*verdicts: str) -> str:
    """All parts supported: supported; any contradicted: contradicted; else unresolved."""
    if any(v == CONTRADICTED for v in verdicts):
        return CONTRADICTED
    if verdicts and all(v == SUPPORTED for v in verdicts):
        return SUPPORTED
    return UNRESOLVED


def summary(verdicts: Sequence[str]) -> str:
    """A claim's overall verdict over its comparisons: the common verdict, else "mixed"."""
    if not verdicts:
        return UNRESOLVED
    if all(v == verdicts[0] for v in verdicts):
        return verdicts[0]
    return "mixed"


def counts(verdicts: Sequence[str]) -> str:
    """"2 supported, 1 unresolved" (in a fixed order, zero counts left out)."""
    parts = [f"{sum(v == k for v in verdicts)} {k}" for k in (SUPPORTED, CONTRADICTED, UNRESOLVED)
             if any(v == k for v in verdicts)]
    return ", ".join(parts) or "no comparison"
