"""DarwinLM's level switches (search/sampler=evolution): offspring keep their parent's size, the parent is the best
feasible trial by the quality objective, nothing proposed twice, and only per-layer studies may use it."""

import random

import optuna
import pytest
from optuna.trial import create_trial
from test_search_per_layer import SMOLLM2

from slimnas.config import check, compose
from slimnas.core.errors import SlimnasError
from slimnas.search.constraints import Budget
from slimnas.search.evolution import LevelSwitchSampler
from slimnas.search.layer_space import HIDDEN, LayerSpace
from slimnas.search.space import PerLayerSpaceSettings

SPACE = LayerSpace.of(PerLayerSpaceSettings(), [384, 448, 512, 576], SMOLLM2, Budget(params=0.6, window=0.1, cap=True))


def sums(params: dict) -> tuple[int, int]:
    """Each kind's total over the layers: a level switch moves one layer up and one down, so it keeps both."""
    return (sum(v for k, v in params.items() if k.startswith("kv_")),
            sum(v for k, v in params.items() if k.startswith("ffn_")))  # fmt: skip


def told(shape, value: float, constraint: float | None = None, values: list[float] | None = None):
    constraints = {} if constraint is None else {"rungs_missed": constraint}
    return create_trial(params=SPACE.encode(shape), distributions=SPACE.distributions(),
                        values=values or [value], system_attrs={"constraints": list(constraints.values())})  # fmt: skip


def test_offspring_are_level_switches_of_the_best_trial_and_never_a_trial_the_study_holds():
    sample = SPACE.stratified_sample(12, seed=0)
    study = optuna.create_study(sampler=LevelSwitchSampler(seed=0, population_size=1, tournament_size=1))
    study.add_trials([told(shape, float(i)) for i, shape in enumerate(sample)])  # sample[0] is the best (lowest)
    parent = SPACE.encode(sample[0])
    held = [SPACE.encode(shape) for shape in sample]
    for _ in range(10):
        trial = study.ask()
        SPACE.suggest(trial)
        child = trial.params
        assert child not in held
        assert child[HIDDEN] == parent[HIDDEN] and sums(child) == sums(parent)
        changed = sum(child[k] != parent[k] for k in parent)
        assert 2 <= changed <= 2 * 3  # max_switches=3, two layers each
        held.append(dict(child))
        study.tell(trial, 100.0)  # worse than every parent: the next child comes from sample[0] again


def test_the_parent_is_the_best_feasible_trial_by_the_quality_objective_named_in_the_study():
    """Multi-objective, quality maximised and named second: a better but infeasible trial (stopped by the race) is
    not the parent, nor is the trial best by the other objective."""
    rng = random.Random(0)
    shapes = [SPACE.random(rng) for _ in range(3)]
    infeasible, best, other = shapes
    study = optuna.create_study(directions=["minimize", "maximize"],
                                sampler=LevelSwitchSampler(seed=1, population_size=1, tournament_size=1,
                                                           n_startup_trials=3))  # fmt: skip
    with pytest.warns(optuna.exceptions.ExperimentalWarning):
        study.set_metric_names(["params", "quality"])
    study.add_trials([
        told(infeasible, 0, constraint=1.0, values=[1.0, -0.5]),
        told(best, 0, constraint=0.0, values=[3.0, -1.0]),
        told(other, 0, constraint=0.0, values=[0.5, -2.0]),  # fewest parameters, worse quality
    ])  # fmt: skip
    trial = study.ask()
    SPACE.suggest(trial)
    assert sums(trial.params) == sums(SPACE.encode(best)) and trial.params[HIDDEN] == best.hidden_size


def test_until_enough_trials_are_complete_proposals_are_random_and_every_one_decodes_into_the_budget():
    study = optuna.create_study(sampler=LevelSwitchSampler(seed=2, n_startup_trials=4))
    proposals, params = [], []
    for i in range(12):
        trial = study.ask()
        proposals.append(SPACE.suggest(trial))
        params.append(tuple(sorted(trial.params.items())))
        study.tell(trial, float(i))
    assert len(set(params)) == 12  # distinct proposals (two may decode to one candidate: the study rejects those)
    assert all(SPACE.low <= SPACE.params(shape) <= SPACE.high for shape in proposals)


def test_the_evolution_sampler_is_for_per_layer_studies_only():
    with pytest.raises(SlimnasError, match="search/sampler=evolution mutates per-layer variants"):
        check(compose("search", ["search/sampler=evolution", "run_dir=x"]))
    check(compose("search", ["search/sampler=evolution", "search.proposals=per_layer", "run_dir=x"]))
