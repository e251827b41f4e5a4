"""Intervals for the numbers puma_ray reports: how far a robust accuracy measured on n rows, or
averaged over a few training seeds, can be trusted. Pure Python (no SciPy at run time).

- `wilson_interval`: the sampling interval of one accuracy on n rows (Wilson score interval,
  which stays inside [0, 1] and behaves at 0 and 1, unlike the normal approximation).
- `mean_interval`: mean and Student-t interval over repeats (seeds); `paired_difference`: the
  same over per-seed differences to a reference method, which removes the variation the two
  share (the same seed, the same test rows) and is what "costs Y points" should be read from.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist

# Two-sided 97.5% quantiles of Student's t for 1..30 degrees of freedom.
_T975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)  # fmt: skip


def t_quantile_975(df: int) -> float:
    """Student-t 0.975 quantile: the table up to 30 degrees of freedom, then the
    Cornish-Fisher expansion around the normal quantile (error < 1e-4 there)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1 (got {df})")
    if df <= len(_T975):
        return _T975[df - 1]
    z = NormalDist().inv_cdf(0.975)
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


@dataclass(frozen=True)
class Interval:
    """A point estimate with a 95% interval [low, high]; n: the rows or repeats behind it."""

    value: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def format(self, digits: int = 3) -> str:
        """'0.474 ± 0.022' (the half width; intervals here are symmetric or nearly so)."""
        if self.n < 2 and self.low == self.high:
            return f"{self.value:.{digits}f}"
        return f"{self.value:.{digits}f} ± {self.half_width:.{digits}f}"

    def to_dict(self) -> dict:
        return asdict(self)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> Interval:
    """Accuracy successes / n with its Wilson score interval."""
    if n <= 0:
        raise ValueError("an accuracy needs at least one row")
    p = successes / n
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if successes == 0 else max(0.0, centre - half)  # exact ends, not rounding noise
    high = 1.0 if successes == n else min(1.0, centre + half)
    return Interval(p, low, high, n)


def mean_interval(values: list[float]) -> Interval:
    """Mean over repeats with a 95% Student-t interval; one value has no interval."""
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = sum(values) / n
    if n == 1:
        return Interval(mean, mean, mean, 1)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile_975(n - 1) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def paired_difference(values: list[float], reference: list[float]) -> Interval:
    """Mean of values[i] - reference[i] (the same seed i) with its 95% t interval."""
    if len(values) != len(reference):
        raise ValueError(f"paired values differ in length: {len(values)} and {len(reference)}")
    return mean_interval([a - b for a, b in zip(values, reference, strict=True)])
