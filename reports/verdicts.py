"""Verdicts over seeds, for the proof (`slimnas baselines`) and the chains table (`slimnas chains`).

A small search's pick moves with its seed, and that variation is over seeds: an interval over one seed's
documents does not cover it. So a difference between two methods is stated twice, paired by seed (a 95%
interval over seeds) and paired by document (each document's difference averaged over the seeds, a 95%
interval over documents), and called significant only when it lies outside both. With one seed no interval
over seeds is known, so nothing is called significant. Pick stability says how often the seeds agreed.
"""

import math
import statistics
from collections import Counter
from dataclasses import dataclass

from slimnas.core.stats import mean_ci95


@dataclass(frozen=True)
class Difference:
    """A method minus a reference, both measured at the same seeds (and, for per-document metrics, documents)."""

    difference: float  # mean over seeds
    ci95_seeds: float  # half-width of the 95% interval over seeds (NaN with one seed)
    ci95_documents: float | None  # half-width of the 95% interval over documents; None without per-document values
    documents: int | None
    reference_better: int  # seeds where the reference is better

    @property
    def significant(self) -> bool:
        """Outside both intervals; never with one seed."""
        if math.isnan(self.ci95_seeds):
            return False
        return abs(self.difference) > max(self.ci95_seeds, self.ci95_documents or 0.0)


def paired(
    mine: list[float],
    reference: list[float],
    mine_per_doc: list[list[float]] | None = None,
    reference_per_doc: list[list[float]] | None = None,
    higher_is_better: bool = False,
    comparisons: int = 1,
) -> Difference:
    """`mine` minus `reference` seed by seed (lists in the same seed order); with per-document values (one list
    per seed, the same documents in each), also document by document, each averaged over the seeds. Both
    intervals are 95% family-wise over `comparisons` differences read together (Bonferroni)."""
    differences = [a - b for a, b in zip(mine, reference, strict=True)]
    difference, ci95_seeds = mean_ci95(differences, comparisons)
    ci95_documents, documents = None, None
    if mine_per_doc is not None and reference_per_doc is not None:
        by_document = [
            statistics.fmean(a) - statistics.fmean(b)
            for a, b in zip(zip(*mine_per_doc, strict=True), zip(*reference_per_doc, strict=True), strict=True)
        ]
        ci95_documents, documents = mean_ci95(by_document, comparisons)[1], len(by_document)
    better = sum(d < 0 if higher_is_better else d > 0 for d in differences)
    return Difference(difference, ci95_seeds, ci95_documents, documents, better)


@dataclass(frozen=True)
class Stability:
    """How far a method's pick moved with the seed."""

    finalist: str  # the finalist most seeds chose (on a tie, the earliest seed's)
    same: int  # seeds that chose it
    seeds: int
    kl_spread: float  # the finalists' retrained KL over the seeds: largest minus smallest

    def text(self) -> str:
        return f"{self.same} of {self.seeds}"


def pick_stability(finalists: list[str], kls: list[float]) -> Stability:
    """Each seed's finalist (a name that tells different models apart) and its retrained KL, in seed order."""
    finalist, same = Counter(finalists).most_common(1)[0]
    return Stability(finalist, same, len(finalists), max(kls) - min(kls))
