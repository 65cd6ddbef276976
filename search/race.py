"""The race: KD tokens go where the ranking is still unsure, and no further than the study's budget.

After each KD rung a candidate is compared with each of its peers at the same rung, document by
document on the selection documents (one-sided paired t-tests, core.stats.paired_test). It stops only
when it is worse than one of them with `search.race.confidence` after a Bonferroni correction over
every comparison it can lose: its peers at this rung times the rungs where it can stop. A stop needs
one rejection, so Holm's procedure reduces to Bonferroni's here; without the correction a candidate
as good as its peers would be stopped far more often than 1 - confidence (24% with ten peers at 95%).
A candidate within noise of every peer gets the next rung. Peers are the trials of any worker that
reached that rung; their per-document KL lives in the study, so every worker races against the same
evidence. With several objectives only a peer that is no larger can stop a candidate: a smaller
candidate that is worse in quality can still be on the front (size also stands in for speed, which is
measured at the last rung only).

The KD-token budget (`search.budget.kd_tokens`) is never exceeded, with any number of workers: before
each rung a trial reserves the tokens it will have seen at its end, then adds up every reservation of
the study; over the budget, it takes its reservation back and stops. Two workers reserving at the same
moment may both step back; neither can overspend.
"""

import math

import optuna
from optuna.trial import FrozenTrial, TrialState

from slimnas.compress.heldout import HeldoutMetrics
from slimnas.core.stats import paired_test
from slimnas.search.setup import SearchSetup

RESERVED = "kd_reserved"  # user attr: KD tokens a trial has reserved (= spent, once it ends)
EXTENSION_TOKENS = "extension_kd_tokens"  # study user attr: KD tokens the leaders' extensions reserved
LIVE = (TrialState.COMPLETE, TrialState.RUNNING)


def rung_key(rung: int) -> str:
    """User attr of a trial's per-document KL at a rung (the race's evidence; `rung_K_kl` is its mean, to read)."""
    return f"rung_{rung}_kl_per_doc"


def rung_attrs(rung: int, metrics_per_doc: list[float]) -> dict:
    return {rung_key(rung): metrics_per_doc, f"rung_{rung}_kl": round(sum(metrics_per_doc) / len(metrics_per_doc), 6)}


def shortfall(rungs_missed: int, quality: float) -> float:
    """The constraint a trial is told with (feasible at <= 0): the rungs it missed, plus a fraction in (0, 1) that
    falls as its quality rises, so samplers also order the trials stopped at the same rung by how good they were."""
    return 0.0 if rungs_missed == 0 else rungs_missed + 1 / (1 + math.exp(quality))


def kd_spent(study: optuna.Study) -> int:
    """KD tokens reserved by the trials and by the leaders' extensions (one study attribute per extension round, so
    a round redone after a kill replaces its own reservation instead of adding to it)."""
    trials = study.get_trials(deepcopy=False)
    extensions = sum(value for key, value in study.user_attrs.items() if key.startswith(EXTENSION_TOKENS))
    return sum(t.user_attrs.get(RESERVED, 0) for t in trials) + extensions


def peers(trials: list[FrozenTrial], rung: int, number: int, params: int, any_size: bool) -> dict[int, list[float]]:
    """Per-document KL at this rung of every other trial that may stop a candidate of this size, by trial number."""
    key = rung_key(rung)
    return {
        t.number: t.user_attrs[key]
        for t in trials
        if t.state in LIVE and key in t.user_attrs and t.number != number
        and (any_size or t.user_attrs["params"] <= params)
    }  # fmt: skip


def verdict(mine: list[float], others: dict[int, list[float]], rung: int, looks: int, confidence: float) -> str | None:
    """Why the candidate stops at this rung, or None when it is not worse than any peer with confidence.

    `looks`: the rungs at which the race may stop a candidate. The p-value is Bonferroni-adjusted over
    len(others) x looks comparisons, so the chance that a candidate as good as all its peers is ever stopped
    stays below 1 - confidence (tests/test_race.py simulates it)."""
    if not others:
        return None
    tests = {number: paired_test(mine, theirs) for number, theirs in others.items()}
    number = min(tests, key=lambda n: (tests[n].p, n))
    comparisons = len(others) * looks
    adjusted = min(1.0, tests[number].p * comparisons)
    if adjusted >= 1 - confidence:
        return None
    test = tests[number]
    return (
        f"worse than trial {number} at rung {rung}: KL +{test.difference:.3f} ± {test.stderr:.3f} over "
        f"{len(mine)} selection documents (one-sided p = {adjusted:.2g}, Bonferroni-adjusted over {len(others)} "
        f"peer(s) x {looks} rung(s))"
    )


class Race:
    """One trial's place in the race: its budget reservations and its verdict after each rung."""

    def __init__(self, study: optuna.Study, trial: optuna.Trial, setup: SearchSetup, params: int, exempt: bool):
        self.study, self.trial, self.setup, self.params = study, trial, setup, params
        self.exempt = exempt  # references and enumeration run to the last rung whatever their peers do

    def reserve(self, rung: int) -> str | None:
        """Reserve the KD tokens of this rung; the reason it cannot go on when the budget has none left."""
        budget = self.setup.settings.budget.kd_tokens
        previous = self.trial.user_attrs.get(RESERVED, 0)
        self.trial.set_user_attr(RESERVED, self.setup.tokens_at(rung))
        if budget is None or kd_spent(self.study) <= budget:
            return None
        self.trial.set_user_attr(RESERVED, previous)
        return f"the study's KD budget ({budget:,} tokens) is spent: no tokens left for rung {rung}"

    def report(self, rung: int, metrics: HeldoutMetrics) -> str | None:
        """Record the rung's per-document KL in the study; why the candidate stops here, or None."""
        for key, value in rung_attrs(rung, metrics.kl_per_doc).items():
            self.trial.set_user_attr(key, value)
        if rung == 0 or rung == self.setup.last_rung or self.exempt:  # the screen only ranks: KD decides
            return None
        any_size = len(self.setup.objectives) == 1
        trials = self.study.get_trials(deepcopy=False, states=LIVE)
        others = peers(trials, rung, self.trial.number, self.params, any_size)
        looks = self.setup.last_rung - 1  # rungs 1 .. last - 1: the screen and the last rung never stop
        return verdict(metrics.kl_per_doc, others, rung, looks, self.setup.settings.race.confidence)
