"""The race's and the leaders' decisions hold their stated confidence; the pick is feasible and current; the KD
budget of the leaders' extension is reserved once, even across a kill."""

import json
import random

import pytest
from conftest import load_study, search_args

import slimnas.search.leaders
from slimnas.cli import main
from slimnas.compress.heldout import HeldoutMetrics, HeldoutSet
from slimnas.core.errors import SlimnasError
from slimnas.core.rundir import TrialRecord, leaders, read_race, read_records, search_pick
from slimnas.search.leaders import separated
from slimnas.search.race import kd_spent, verdict
from slimnas.search.settings import SearchSettings

ALPHA = 0.05
SIMULATIONS = 2000


def equal_candidates(rng: random.Random, n: int, documents: int) -> list[list[float]]:
    """Per-document KL of n candidates that are equally good: a shared document effect plus independent noise."""
    effect = [rng.gauss(1.0, 0.5) for _ in range(documents)]
    return [[e + rng.gauss(0.0, 0.2) for e in effect] for _ in range(n)]


def stop_rate_bound(stops: int) -> tuple[float, float]:
    """The observed rate and alpha + 3 standard errors of a rate alpha over SIMULATIONS draws."""
    return stops / SIMULATIONS, ALPHA + 3 * (ALPHA * (1 - ALPHA) / SIMULATIONS) ** 0.5


def test_a_candidate_as_good_as_its_peers_is_stopped_at_most_alpha_of_the_time():
    """Equal candidates through the race's own decision at every rung where it can stop (3 rungs: looks 1, 2), with
    ten peers: untested against all of them but the best, 24% would be stopped at 95% confidence."""
    rng, rungs, stops, peers = random.Random(0), 3, 0, 10
    for _ in range(SIMULATIONS):
        looks = rungs - 1
        for rung in range(1, rungs):
            mine, *others = equal_candidates(rng, peers + 1, documents=16)
            if verdict(mine, dict(enumerate(others)), rung, looks, 1 - ALPHA):
                stops += 1
                break
    rate, bound = stop_rate_bound(stops)
    assert rate <= bound, f"{rate:.3f} of equal candidates stopped (bound {bound:.3f})"


def test_two_equal_leaders_are_called_separated_at_most_alpha_of_the_time_over_all_extensions():
    rng, extensions, splits = random.Random(7), 2, 0
    for _ in range(SIMULATIONS):
        for _look in range(extensions + 1):
            a, b = equal_candidates(rng, 2, documents=16)
            if separated(a, b, extensions + 1, 1 - ALPHA)[0]:
                splits += 1
                break
    rate, bound = stop_rate_bound(splits)
    assert rate <= bound, f"{rate:.3f} of equal leader pairs separated (bound {bound:.3f})"


def test_separation_is_two_sided_and_finds_a_real_difference_either_way():
    rng = random.Random(1)
    a, b = equal_candidates(rng, 2, documents=32)
    better = [x - 0.3 for x in a]
    assert separated(a, better, 1, 0.95)[0] and separated(better, a, 1, 0.95)[0]
    split, test = separated(a, better, 3, 0.95)
    assert split and test["looks"] == 3 and test["p"] < 0.05


def record(trial: int, quality: float, over_budget: str | None = None, state: str = "complete") -> TrialRecord:
    return TrialRecord(
        trial=trial, architecture={}, label=f"t{trial}", params=1, params_fraction=0.5, weight_bytes_bf16=2, pruning={},
        state=state, final={"quality": quality}, over_budget=over_budget,
    )  # fmt: skip


def test_a_candidate_over_a_measured_budget_is_never_a_leader_or_the_pick(tmp_path):
    records = [record(0, -0.1, over_budget="p50 decode latency 9.0 ms > 5.0 ms"), record(1, -0.2), record(2, -0.3)]
    assert [r.trial for r in leaders(records)] == [1, 2]
    assert search_pick(tmp_path, records).trial == 1
    assert search_pick(tmp_path, [records[0]]) is None


def test_a_race_about_candidates_that_are_no_longer_the_leaders_is_not_trusted(tmp_path):
    records = [record(0, -0.1), record(1, -0.2)]
    race = {"leaders": [0, 1], "winner": 1, "why": "not separated after 2 extension(s)", "rounds": []}
    (tmp_path / "race.json").write_text(json.dumps(race))
    assert read_race(tmp_path, records) == race and search_pick(tmp_path, records).trial == 1
    records.append(record(2, -0.05))  # finished after race.json was written: the leaders are now 2 and 0
    assert read_race(tmp_path, records) is None
    assert search_pick(tmp_path, records).trial == 2


def test_the_summary_metric_with_a_race_is_refused():
    with pytest.raises(SlimnasError, match="choose by one metric and decide by another"):
        SearchSettings(quality_metric="summary", score_trials=True, sampler={"_target_": "optuna.samplers.TPESampler"})
    enumerate_ = SearchSettings(
        quality_metric="summary", score_trials=True, proposals="enumerate", sampler={"_target_": "x.Y"}
    )
    assert enumerate_.quality_metric == "summary"


def test_a_kill_during_the_leaders_extension_does_not_count_its_tokens_twice(
    search_teacher, tmp_path, monkeypatch, capsys
):
    """Equal leaders are extended twice; the first try of the second round is killed, the rerun redoes it."""

    def equal(self, student):
        return HeldoutMetrics(
            self.split, len(self.rows), self.rows.numel(), 0.5, 0.1, 2.0, 0.1, [0.4, 0.6] * 4, [0.7] * 8
        )

    monkeypatch.setattr(HeldoutSet, "evaluate", equal)
    real_extended, calls = slimnas.search.leaders.extended, []

    def killed_in_round_two(setup, rec, tokens):
        calls.append(tokens)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_extended(setup, rec, tokens)

    monkeypatch.setattr(slimnas.search.leaders, "extended", killed_in_round_two)
    run_dir = tmp_path / "run"
    args = search_args(search_teacher, run_dir, "search.n_trials=3", "search.references.kinds=[]")
    assert main(args) != 0
    monkeypatch.setattr(slimnas.search.leaders, "extended", real_extended)
    assert main(args) == 0
    race = json.loads((run_dir / "race.json").read_text())
    assert len(race["rounds"]) == 2
    study = load_study(run_dir)
    trials = sum(r.kd_tokens for r in read_records(run_dir))
    rounds = sum(2 * done["kd_tokens"] for done in race["rounds"])
    assert kd_spent(study) == trials + rounds


def test_with_an_impossible_latency_budget_nothing_is_picked_or_retrained(search_teacher, tmp_path, capsys):
    """Every candidate is timed and breaks the budget: none leads, no race runs, retrain refuses in one line."""
    run_dir = tmp_path / "run"
    args = search_args(search_teacher, run_dir, "search.n_trials=2", "search.references.kinds=[]")
    assert main([*args, "search.budget.latency_ms=0.001"]) == 0
    complete = [r for r in read_records(run_dir) if r.state == "complete"]
    assert complete and all(r.over_budget.startswith("p50 decode latency") for r in complete)
    assert leaders(complete) == [] and not (run_dir / "race.json").exists()
    capsys.readouterr()
    assert main(["retrain", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert "meets every budget" in err and len(err.splitlines()) == 1
