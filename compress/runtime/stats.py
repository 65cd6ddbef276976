"""Error bars: the standard error of a mean, a 95% interval over seeds, a paired difference."""

import math
import statistics


def mean_and_stderr(values: list[float]) -> tuple[float, float]:
    """Mean and the standard error of the mean (NaN with fewer than two values: no error bar is known)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan)


def paired_difference(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of a - b over the same rows (or seeds), with its standard error: tighter than two error bars."""
    if len(a) != len(b):
        raise ValueError(f"paired values differ in number: {len(a)} and {len(b)}")
    return mean_and_stderr([x - y for x, y in zip(a, b, strict=True)])


def mean_ci95(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student-t interval (a handful of seeds)."""
    from scipy.stats import t as student_t

    mean, stderr = mean_and_stderr(values)
    return mean, float(student_t.ppf(0.975, len(values) - 1)) * stderr
