"""The ratio of two settings timed side by side, with an interval that also covers drift.

``pomt refine`` and ``pomt bench`` time their settings in interleaved rounds and pool each
setting's samples. The samples of one round are taken one after another, in one state of
the device (its clocks, its load, what its caches hold), so they are not independent:
the interval of the median of the pooled samples assumes they are, and comes out too
narrow when that state drifts between rounds. On the 2-core development CPU, 95%
intervals of a ratio built from the pooled intervals held its median over 30 repeated
runs in 43-80% of them (scripts/ratio_coverage.py; docs/PERFORMANCE.md).

The rounds are closer to independent (the method of batch means). Each round in which both
settings ran gives one ratio of their medians; the Student t interval of the mean of
the logarithms of those ratios is an interval of the ratio that includes the drift
between rounds. :func:`paired_ratio` reports the union of that interval and the one from
the pooled samples, so that rounds which happen to agree cannot make it narrower than
the samples allow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pomt_cli.measure.timing import Measurement

#: Iterations of the continued fraction of the incomplete beta function (it converges in
#: far fewer for the arguments a t quantile needs).
_MAX_TERMS = 300


def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    value = d
    for m in range(1, _MAX_TERMS + 1):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            value *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return value


def incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b), for a, b > 0 and 0 <= x <= 1."""
    if not (a > 0 and b > 0 and 0.0 <= x <= 1.0):
        raise ValueError(f"incomplete_beta needs a, b > 0 and 0 <= x <= 1, got a={a}, b={b}, x={x}")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(b, a, 1.0 - x) / b


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t distribution with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    tail = 0.5 * incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def student_t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t distribution with ``df`` degrees of freedom (bisection on the CDF)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"a quantile needs 0 < p < 1, got {p}")
    if p < 0.5:
        return -student_t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while student_t_cdf(high, df) < p:
        low, high = high, 2.0 * high
    for _ in range(200):
        middle = 0.5 * (low + high)
        if student_t_cdf(middle, df) < p:
            low = middle
        else:
            high = middle
        if high - low <= 1e-12 * max(1.0, high):
            break
    return 0.5 * (low + high)


@dataclass(frozen=True)
class PairedRatio:
    """``a``'s median over ``b``'s, with the interval of :func:`paired_ratio`.

    Attributes:
        ratio: the ratio of the pooled medians.
        low, high: the interval of the ratio (None when neither the pooled samples nor the
            rounds give one).
        rounds: the rounds paired for the interval from the rounds (0: none was used).
    """

    ratio: float
    low: float | None
    high: float | None
    rounds: int

    @property
    def above_one(self) -> bool | None:
        """Whether the whole interval lies above 1 (None without an interval)."""
        return None if self.low is None else self.low > 1.0


def round_interval(a: Measurement, b: Measurement, confidence: float) -> tuple[float, float] | None:
    """The Student t interval of the ratio from the medians of paired rounds, or None.

    Rounds pair by position, so both measurements must come from the same rounds (as
    many parts each, at least two).
    """
    k = len(a.part_medians)
    if k < 2 or len(b.part_medians) != k:
        return None
    pairs = list(zip(a.part_medians, b.part_medians))
    if any(not (x > 0 and y > 0) for x, y in pairs):
        return None
    logs = [math.log(x / y) for x, y in pairs]
    mean = sum(logs) / k
    spread = math.sqrt(sum((v - mean) ** 2 for v in logs) / (k - 1))
    half = student_t_quantile(0.5 + confidence / 2.0, k - 1) * spread / math.sqrt(k)
    return math.exp(mean - half), math.exp(mean + half)


def paired_ratio(a: Measurement, b: Measurement) -> PairedRatio | None:
    """``a`` over ``b``, timed in the same interleaved rounds, with an interval that includes drift.

    The interval is the union of the ratio's range over the two pooled intervals of the
    median (``a.ci_low / b.ci_high`` to ``a.ci_high / b.ci_low``) and the Student t interval
    from the rounds (:func:`round_interval`, at ``a``'s confidence), each where it exists,
    and it holds the ratio of the pooled medians.

    Returns:
        None when either measurement has no samples (out of memory).
    """
    if a.median_ms is None or b.median_ms is None or b.median_ms <= 0:
        return None
    lows, highs = [], []
    if None not in (a.ci_low_ms, a.ci_high_ms, b.ci_low_ms, b.ci_high_ms) and b.ci_low_ms > 0:
        lows.append(a.ci_low_ms / b.ci_high_ms)
        highs.append(a.ci_high_ms / b.ci_low_ms)
    rounds = round_interval(a, b, a.confidence)
    if rounds is not None:
        lows.append(rounds[0])
        highs.append(rounds[1])
    ratio = a.median_ms / b.median_ms
    if not lows:
        return PairedRatio(ratio=ratio, low=None, high=None, rounds=0)
    # The rounds' interval is centred on their mean log ratio, which may differ from the
    # ratio of the pooled medians: the interval always holds the ratio it goes with.
    return PairedRatio(ratio=ratio, low=min(*lows, ratio), high=max(*highs, ratio),
                       rounds=len(a.part_medians) if rounds else 0)
