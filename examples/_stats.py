"""Mean and 95% confidence interval over seeds (Student t), shared by the examples."""

from __future__ import annotations

import math
from collections.abc import Sequence

from scipy import stats

__all__ = ["format_ci", "mean_ci"]


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """(mean, half-width) of the two-sided t confidence interval of the mean; half-width nan for n < 2."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        raise ValueError("mean_ci needs at least one value")
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)


def format_ci(values: Sequence[float], digits: int = 3, confidence: float = 0.95) -> str:
    """'0.912 ± 0.011 (n=3)' (or '0.912 (n=1)')."""
    mean, half = mean_ci(values, confidence)
    if math.isnan(half):
        return f"{mean:.{digits}f} (n={len(values)})"
    return f"{mean:.{digits}f} ± {half:.{digits}f} (n={len(values)})"
