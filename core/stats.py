"""Error bars: the standard error of a mean, a 95% interval over seeds, a paired difference and its t-test; how
well one order of candidates predicts another (rank correlation)."""

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass


def mean_and_stderr(values: list[float]) -> tuple[float, float]:
    """Mean and the standard error of the mean (NaN with fewer than two values: no error bar is known)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan)


def paired_difference(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of a - b over the same documents (or seeds), with its standard error: tighter than two error bars."""
    if len(a) != len(b):
        raise ValueError(f"paired values differ in number: {len(a)} and {len(b)}")
    return mean_and_stderr([x - y for x, y in zip(a, b, strict=True)])


@dataclass(frozen=True)
class PairedTest:
    difference: float  # mean of a - b
    stderr: float
    p: float  # p-value of the alternative (Student t over the pairs, scipy.stats.ttest_rel)
    alternative: str  # greater: a - b > 0; two-sided: a - b != 0

    def confident(self, level: float) -> bool:
        """The alternative holds with this confidence."""
        return self.p < 1 - level


def paired_test(a: list[float], b: list[float], alternative: str = "greater") -> PairedTest:
    """Is a larger than b (or, two-sided, different from it), pair by pair? scipy's paired t-test, with the cases
    it leaves undefined made explicit: equal pairs give p = 1; differences without spread, p = 0 when they differ."""
    from scipy.stats import ttest_rel

    difference, stderr = paired_difference(a, b)
    if not stderr > 0:  # every pair differs by the same amount (or there is one pair)
        differs = difference > 0 if alternative == "greater" else difference != 0
        return PairedTest(difference, stderr, 0.0 if differs and len(a) > 1 else 1.0, alternative)
    return PairedTest(difference, stderr, float(ttest_rel(a, b, alternative=alternative).pvalue), alternative)


def mean_ci95(values: list[float], comparisons: int = 1) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student-t interval (a handful of seeds); 95% family-wise (Bonferroni)
    when it is one of `comparisons` intervals read together."""
    from scipy.stats import t as student_t

    mean, stderr = mean_and_stderr(values)
    return mean, float(student_t.ppf(1 - 0.025 / comparisons, len(values) - 1)) * stderr


@dataclass(frozen=True)
class RankAgreement:
    spearman: float
    kendall: float
    n: int  # candidates ranked by both


def rank_agreement(pairs: Sequence[tuple[float, float]]) -> RankAgreement | None:
    """Spearman and Kendall correlation (scipy.stats) of two measures of the same candidates, e.g. a cheap early KL
    and a later one: how far the cheap order predicts the later. None with fewer than three pairs, or when either
    measure is the same for all (both correlations are undefined then)."""
    from scipy.stats import kendalltau, spearmanr

    if len(pairs) < 3:
        return None
    early, late = zip(*pairs, strict=True)
    if len(set(early)) < 2 or len(set(late)) < 2:
        return None
    return RankAgreement(float(spearmanr(early, late).statistic), float(kendalltau(early, late).statistic), len(pairs))
