"""DarwinLM's level-switch mutation as an Optuna sampler (search/sampler=evolution, per-layer studies).

DarwinLM (Tang et al., 2025) evolves per-layer shapes: an offspring is a parent with a few level switches, one
layer moved a level up and another of the same kind a level down, so it keeps the parent's size and a budget the
parent meets stays met. DarwinLM then trains the offspring on a fixed multistep schedule and keeps the best; here
the race does that (search.race), and the sampler only proposes.

The parameters are the per-layer space's (search.layer_space): `kv_I` and `ffn_I` for each layer I, mutated, and
the hidden size, kept from the parent. A kind's levels are the values the study's complete trials have for it (the
space's variants: the screen told to the sampler holds them all). A parent is drawn by tournament from the best
`population_size` complete trials, ranked as Optuna's constrained samplers rank them: feasible trials first (a
candidate the race stopped early violates its `rungs_missed` constraint), then by the quality objective. Until
`n_startup_trials` trials are complete, proposals are random.
"""

import random
import re
from collections import defaultdict

import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler, RandomSampler
from optuna.search_space import IntersectionSearchSpace
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

LAYER_PARAM = re.compile(r"(?P<kind>[a-z]+)_(?P<layer>\d+)")  # kv_I, ffn_I: search.layer_space's names
DUPLICATE_DRAWS = 20  # offspring drawn before one whose parameters no trial has is given up on


class LevelSwitchSampler(BaseSampler):
    """Offspring of the best trials by level switches (relative sampling); random proposals before enough trials
    are complete, and where every offspring drawn is a trial the study holds already."""

    def __init__(
        self,
        seed: int | None = None,
        population_size: int = 8,
        tournament_size: int = 2,
        max_switches: int = 3,
        n_startup_trials: int = 4,
    ):
        if min(population_size, tournament_size, max_switches, n_startup_trials) < 1:
            raise ValueError("population_size, tournament_size, max_switches and n_startup_trials must be >= 1")
        self.population_size, self.tournament_size = population_size, tournament_size
        self.max_switches, self.n_startup_trials = max_switches, n_startup_trials
        self._rng = random.Random(seed)
        self._random = RandomSampler(seed=seed)
        self._search_space = IntersectionSearchSpace()

    def reseed_rng(self) -> None:
        self._rng = random.Random()
        self._random.reseed_rng()

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self._search_space.calculate(study)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict:
        complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                    if search_space.keys() <= t.params.keys()]  # fmt: skip
        if not search_space or len(complete) < self.n_startup_trials:
            return {}
        ranked = sorted(complete, key=_rank_key(study))[: self.population_size]
        parent = min(self._rng.sample(ranked, min(self.tournament_size, len(ranked))), key=ranked.index)
        levels = _levels(complete, search_space)
        taken = {_key(t.params, search_space) for t in study.get_trials(deepcopy=False) if t.params}
        for _ in range(DUPLICATE_DRAWS):
            child = self._mutate({name: parent.params[name] for name in search_space}, levels)
            if _key(child, search_space) not in taken:
                return child
        return {}  # every offspring drawn is taken: a random proposal instead (sample_independent)

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ):
        return self._random.sample_independent(study, trial, param_name, param_distribution)

    def _mutate(self, params: dict, levels: dict[str, list]) -> dict:
        """1 to max_switches level switches: a layer one level up, another of the same kind one level down."""
        child = dict(params)
        for _ in range(self._rng.randint(1, self.max_switches)):
            kinds = [kind for kind, values in levels.items() if len(values) > 1]
            if not kinds:
                break
            kind = self._rng.choice(kinds)
            values = levels[kind]
            names = [name for name in child if _kind(name) == kind]
            up = [n for n in names if child[n] in values and values.index(child[n]) < len(values) - 1]
            down = [n for n in names if child[n] in values and values.index(child[n]) > 0]
            pairs = [(raised, lowered) for raised in up for lowered in down if raised != lowered]
            if not pairs:
                continue
            raised, lowered = self._rng.choice(pairs)
            child[raised] = values[values.index(child[raised]) + 1]
            child[lowered] = values[values.index(child[lowered]) - 1]
        return child


def _kind(name: str) -> str | None:
    match = LAYER_PARAM.fullmatch(name)
    return match["kind"] if match else None


def _levels(trials: list[FrozenTrial], search_space: dict) -> dict[str, list]:
    """Each kind's levels: the distinct values the complete trials hold for its parameters, in order (a random
    proposal's raw values count too: the space's decode takes the nearest variant)."""
    seen: dict[str, set] = defaultdict(set)
    for t in trials:
        for name in search_space:
            if (kind := _kind(name)) is not None:
                seen[kind].add(t.params[name])
    return {kind: sorted(values) for kind, values in seen.items()}


def _key(params: dict, search_space: dict) -> tuple:
    return tuple(params.get(name) for name in sorted(search_space))


def _rank_key(study: optuna.Study):
    """Feasible before infeasible (by total violation), then best quality first: the quality objective by name
    (study.metric_names, set by the search), else the first."""
    names = study.metric_names or []
    index = names.index("quality") if "quality" in names else 0
    sign = -1.0 if study.directions[index] == StudyDirection.MAXIMIZE else 1.0

    def key(trial: FrozenTrial) -> tuple[float, float]:
        violation = sum(max(0.0, value) for value in trial.constraints.values())
        return violation, sign * trial.values[index]

    return key
