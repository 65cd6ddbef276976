"""Where a study's candidates come from: registered strategies, chosen by `search.proposals`.

    screen     the screen's best (`search.screen.top_k`) first, then the sampler, told the rest of the screen
    uniform    feasible candidates in a seeded random order, no screen, no sampler (the random-search baseline)
    enumerate  every screened candidate to the last rung, none stopped (what a race is measured against)
    per_layer  per-layer candidates (search.layer_space): a sample stratified by size and the seed shapes (the MIP's
               picks over the block library, the proportional allocation: search.block_seeds) screened, their best
               first, then the sampler over each layer's variant, told the rest of the screen

Every strategy also queues the reference cuts (search.references) once per study. A new way of proposing
is a new subclass of `Proposals` added to `PROPOSALS` (and its name to search.settings.PROPOSALS): the
study's loop asks the strategy, it never branches on the name. This module also keeps the study's
bookkeeping of candidates: which ones count as evaluated, given up, or only screened.
"""

import random
from collections import Counter

import optuna
from optuna.trial import FrozenTrial, TrialState, create_trial

from slimnas.compress.arch import (
    Architecture,
    LayerShape,
    PerLayerArchitecture,
    Shape,
    param_count,
    shape_of,
    validate_target,
)
from slimnas.compress.prune import select_layers
from slimnas.core.errors import SlimnasError
from slimnas.core.files import locked
from slimnas.core.rundir import update_run
from slimnas.search.race import rung_attrs, shortfall
from slimnas.search.references import find_reference
from slimnas.search.screen import Screened, run_screen
from slimnas.search.settings import PROPOSALS as PROPOSAL_NAMES
from slimnas.search.setup import SearchSetup
from slimnas.search.space import ATTENTION, DEPTH, WIDTH
from slimnas.search.storage import dashboard_constraints
from slimnas.search.trial import policy_of

REJECTED = "rejected"  # user attr of a proposal dropped before any compute
SCREENED = "screened"  # user attr "state" of a screened candidate told to the sampler without running
NOT_THE_CANDIDATES_FAULT = ("interrupted",)  # failures that do not count towards search.max_attempts


# Which candidates count as evaluated ----------------------------------------------------------------------


def _hashable(architecture: dict) -> tuple:
    """An architecture record as a key (a per-layer one's lists as tuples)."""
    return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in sorted(architecture.items()))


def candidate_key(trial: FrozenTrial) -> tuple | None:
    """A candidate is its architecture and how its layers are chosen (depth-only cuts one block)."""
    arch = trial.user_attrs.get("architecture")
    return None if arch is None else (_hashable(arch), trial.user_attrs.get("depth_strategy"))


def arch_key(arch: Shape) -> tuple:
    return _hashable(arch.as_dict()), None


def failed_attempts(trials: list[FrozenTrial]) -> Counter:
    """Failed runs per candidate (rejections and interruptions are not the candidate's fault)."""
    return Counter(
        candidate_key(t)
        for t in trials
        if t.state == TrialState.FAIL
        and REJECTED not in t.user_attrs
        and t.user_attrs.get("fail_reason") not in NOT_THE_CANDIDATES_FAULT
    )


def evaluated_keys(trials: list[FrozenTrial], max_attempts: int, exclude: int | None = None) -> dict[tuple, int]:
    """Candidates that count as evaluated (run, running, queued or given up), with one trial of each.

    A screened candidate told to the sampler was never run: the sampler may propose it, and then it runs.
    """
    attempts = failed_attempts(trials)
    taken = {}
    for t in trials:
        key = candidate_key(t)
        if t.number == exclude or key is None or REJECTED in t.user_attrs or t.user_attrs.get("state") == SCREENED:
            continue
        if t.state in (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING) or attempts[key] >= max_attempts:
            taken.setdefault(key, t.number)
    return taken


def enqueue(study: optuna.Study, setup: SearchSetup, arch: Shape, attrs: dict) -> None:
    """Queue a candidate with its architecture and size recorded (the study's user attributes carry them)."""
    params = param_count(setup.context.teacher.model.config, arch)
    study.enqueue_trial(proposals_of(setup).params(setup, arch, attrs),
                        user_attrs={"architecture": arch.as_dict(), "params": params, **attrs})  # fmt: skip


# The strategies ---------------------------------------------------------------------------------------------


class Proposals:
    """How a study's candidates are proposed. The default: the sampler proposes after the first trials."""

    name = ""
    races = True  # the race may stop a candidate, and the two leaders' last rung is extended
    tells_screen = False  # the screen's candidates that did not run are told to the sampler
    spent = "every feasible candidate was evaluated"  # why the study ends when `unevaluated` finds none
    space = "search space"  # what the uniform space (search.space) is to this strategy, in the start's first line

    def screen(self, setup: SearchSetup) -> list[Screened]:
        """The screened candidates, best first (one worker screens, the others read the cache)."""
        return run_screen(setup)

    def first(self, setup: SearchSetup, screened: list[Screened]) -> list[tuple[Screened, str]]:
        """The screened candidates queued first, each with who proposed it."""
        return [(screen, "screen") for screen in screened[: setup.settings.screen.top_k]]

    def suggest(self, trial: optuna.Trial, setup: SearchSetup, queued: dict | None) -> Shape:
        """The trial's candidate, from the sampler's coordinates (search.space.FeasibleEncoding). A queued trial's
        coordinates are fixed and decode to its candidate; `queued` is that candidate's record (None: not queued)."""
        encoding = setup.encoding
        attention = trial.suggest_categorical(ATTENTION, list(encoding.attention))
        return encoding.decode(attention, trial.suggest_float(DEPTH, 0.0, 1.0), trial.suggest_float(WIDTH, 0.0, 1.0))

    def params(self, setup: SearchSetup, arch: Shape, attrs: dict) -> dict:
        """A candidate in the sampler's coordinates, to queue it or tell it."""
        return setup.encoding.encode(arch)

    def distributions(self, setup: SearchSetup) -> dict:
        return setup.encoding.distributions()

    def unevaluated(self, setup: SearchSetup, taken: dict, seed: int | str) -> Shape | None:
        """A feasible candidate nobody evaluated, drawn with `seed`; None when every one was."""
        left = [arch for arch in setup.feasible if arch_key(arch) not in taken]
        return random.Random(seed).choice(left) if left else None

    def queue_next(self, study: optuna.Study, setup: SearchSetup, trials: list[FrozenTrial]) -> None:
        """Queue the next candidate before the study asks (nothing: the sampler proposes)."""

    def exhausted(self, waiting: bool) -> str | None:
        """Why the loop ends for this strategy alone (None: when the budgets and the feasible set say so)."""
        return None

    def describe(self, setup: SearchSetup) -> str:
        raise NotImplementedError


class ScreenFirst(Proposals):
    name = "screen"
    tells_screen = True

    def describe(self, setup: SearchSetup) -> str:
        sampler = setup.settings.sampler["_target_"].rsplit(".", 1)[-1]
        return (
            f"the screen's best {setup.settings.screen.top_k} first, then {sampler} (told the screen); "
            f"{setup.settings.n_trials} trials to reach the last rung"
        )


class Uniform(Proposals):
    name = "uniform"

    def screen(self, setup: SearchSetup) -> list[Screened]:
        return []

    def queue_next(self, study: optuna.Study, setup: SearchSetup, trials: list[FrozenTrial]) -> None:
        """Random search: the next candidate of a seeded uniform order of the feasible set not evaluated yet."""
        if any(t.state == TrialState.WAITING for t in trials):
            return
        taken = evaluated_keys(trials, setup.settings.max_attempts)
        order = random.Random(setup.settings.seed).sample(list(setup.feasible), len(setup.feasible))
        choice = next((arch for arch in order if arch_key(arch) not in taken), None)
        if choice is not None:
            enqueue(study, setup, choice, {"proposed_by": "uniform"})

    def describe(self, setup: SearchSetup) -> str:
        return f"feasible candidates in a seeded random order; {setup.settings.n_trials} trials to reach the last rung"


class Enumerate(Proposals):
    name = "enumerate"
    races = False

    def first(self, setup: SearchSetup, screened: list[Screened]) -> list[tuple[Screened, str]]:
        return [(screen, "enumerate") for screen in screened]

    def exhausted(self, waiting: bool) -> str | None:
        return None if waiting else "every screened candidate was evaluated"

    def describe(self, setup: SearchSetup) -> str:
        return "every feasible candidate to the last rung, none stopped (enumeration)"


class PerLayer(ScreenFirst):
    """Per-layer candidates (search.layer_space): the screen scores a sample stratified by size plus the caller's
    seed shapes (SearchSetup.seeds), its best go first (a seed recorded as proposed by its origin: mip, proportional),
    then the sampler proposes each layer's variant."""

    name = "per_layer"
    spent = "no unevaluated candidate in 100 random draws of the per-layer space (it is not enumerated)"
    space = "uniform space (the reference cuts only)"

    def screen(self, setup: SearchSetup) -> list[Screened]:
        config, budget = setup.context.teacher.model.config, setup.settings.budget
        for seed in setup.seeds:
            validate_target(seed, config)
            if not budget.allows(config, seed):
                raise SlimnasError(f"seed shape {seed.label()} ({param_count(config, seed):,} parameters) is outside "
                                   f"the budget: {budget.describe(config)}")  # fmt: skip
        sample = setup.layer_space.stratified_sample(setup.settings.screen.per_layer_samples, setup.settings.seed)
        return run_screen(setup, list(dict.fromkeys([*setup.seeds, *sample])))

    def first(self, setup: SearchSetup, screened: list[Screened]) -> list[tuple[Screened, str]]:
        return [(s, setup.seeds.get(s.arch, "screen")) for s in screened[: setup.settings.screen.top_k]]

    def suggest(self, trial: optuna.Trial, setup: SearchSetup, queued: dict | None) -> Shape:
        proposed = setup.layer_space.suggest(trial)  # a queued trial's parameters are fixed: recorded all the same
        return proposed if queued is None else shape_of(queued)

    def params(self, setup: SearchSetup, arch: Shape, attrs: dict) -> dict:
        """A uniform candidate (a reference) is told as the layers it keeps, each with its sizes: what it is in this
        space's terms, although its sizes need not be among the variants."""
        if isinstance(arch, Architecture):
            kept = set(select_layers(setup.context.importance, arch.num_hidden_layers, policy_of(setup, attrs)))
            layer = LayerShape(arch.intermediate_size, arch.num_attention_heads, arch.num_key_value_heads)
            layers = tuple(layer if i in kept else LayerShape(0, 0, 0) for i in range(setup.layer_space.layers))
            arch = PerLayerArchitecture(arch.hidden_size, layers)
        return setup.layer_space.encode(arch)

    def distributions(self, setup: SearchSetup) -> dict:
        return setup.layer_space.distributions()

    def unevaluated(self, setup: SearchSetup, taken: dict, seed: int | str) -> Shape | None:
        """A random feasible candidate nobody evaluated (None when 100 draws found none: the space may not be spent)."""
        rng = random.Random(seed)
        draws = (setup.layer_space.random(rng) for _ in range(100))
        return next((shape for shape in draws if arch_key(shape) not in taken), None)

    def describe(self, setup: SearchSetup) -> str:
        origins = ", ".join(f"{n} {who}" for who, n in Counter(setup.seeds.values()).items())
        seeds = f" and {len(setup.seeds)} seed shapes ({origins})" if setup.seeds else ""
        sampler = setup.settings.sampler["_target_"].rsplit(".", 1)[-1]
        return (
            f"{setup.layer_space.describe()}; {setup.settings.screen.per_layer_samples} sampled by size{seeds} "
            f"screened, their best {setup.settings.screen.top_k} first, then {sampler} over each layer's variant "
            f"(told the screen); {setup.settings.n_trials} trials to reach the last rung"
        )


PROPOSALS: dict[str, Proposals] = {p.name: p for p in (ScreenFirst(), Uniform(), Enumerate(), PerLayer())}
assert tuple(PROPOSALS) == PROPOSAL_NAMES, "search.settings.PROPOSALS lists the registered strategies"


def proposals_of(setup: SearchSetup) -> Proposals:
    return PROPOSALS[setup.settings.proposals]


# The first trials: the strategy's share of the screen, the reference cuts, the rest of the screen told ---------


def first_trials(setup: SearchSetup, screened: list[Screened]) -> list[tuple[Shape, dict]]:
    """(candidate, user attrs) to queue in order: the strategy's share of the screen, then the references."""
    queued: dict[tuple, tuple[Shape, dict]] = {}
    for rank, (screen, proposed_by) in enumerate(proposals_of(setup).first(setup, screened)):
        attrs = {"proposed_by": proposed_by}
        note = f"screen rank {rank + 1} of {len(screened)}: KL {screen.kl:.3f} ± {screen.kl_stderr:.3f} without KD"
        if rank == 0:
            attrs |= {"reference": "zero_shot", "reference_note": f"the screen's best: {note}"}
        queued[(screen.arch, None)] = (screen.arch, attrs | {"screen_note": note})
    for kind in setup.settings.references.kinds:
        reference, note = find_reference(kind, setup)
        print(f"reference {note}")
        if reference is None:
            continue
        arch, attrs = queued.get((reference.arch, reference.depth_strategy), (reference.arch, {}))
        kinds = [k for k in [attrs.get("reference"), kind] if k]
        notes = [n for n in [attrs.get("reference_note"), note] if n]
        attrs |= {"reference": "+".join(kinds), "reference_note": "; ".join(notes)}
        attrs.setdefault("proposed_by", "reference")
        if reference.depth_strategy:
            attrs["depth_strategy"] = reference.depth_strategy
        queued[(reference.arch, reference.depth_strategy)] = (arch, attrs)
    return list(queued.values())


def tell_screen(study: optuna.Study, setup: SearchSetup, screened: list[Screened], queued: set) -> int:
    """The screen's other candidates, told as trials that stopped at rung 0 (only where every objective is known
    without running them: quality from the KL, and no timed objective)."""
    if not proposals_of(setup).tells_screen or setup.timings_rank or setup.settings.quality_metric != "heldout_kl":
        return 0
    config, proposals = setup.context.teacher.model.config, proposals_of(setup)
    told = []
    for screen in screened:
        if (screen.arch, None) in queued:
            continue
        values = {"quality": -screen.kl, "params": param_count(config, screen.arch)}
        attrs = {"architecture": screen.arch.as_dict(), "params": values["params"],
                 "proposed_by": setup.seeds.get(screen.arch, "screen"), "state": SCREENED, "rung": 0,
                 "label": screen.arch.label()}  # fmt: skip
        attrs |= rung_attrs(0, screen.kl_per_doc)
        constraints = {"rungs_missed": shortfall(setup.last_rung, -screen.kl)}
        told.append(
            create_trial(
                params=proposals.params(setup, screen.arch, {}),
                distributions=proposals.distributions(setup),
                values=[values[o.name] for o in setup.objectives],
                user_attrs=attrs,
                constraints=constraints,
                system_attrs=dashboard_constraints(constraints),
            )  # fmt: skip
        )
    study.add_trials(told)
    return len(told)


def queue_first_trials(study: optuna.Study, setup: SearchSetup, screened: list[Screened]) -> None:
    """Once per study (workers take turns): the first trials in order, and the screen told to the sampler."""
    with locked(setup.run_dir / ".queue.lock"):
        if study.user_attrs.get("first_trials_queued"):
            return
        first = first_trials(setup, screened)
        for arch, attrs in first:
            enqueue(study, setup, arch, attrs)
        told = tell_screen(study, setup, screened, {(arch, a.get("depth_strategy")) for arch, a in first})
        notes = [f"{len(screened)} candidates screened, {len(first)} queued first, {told} told to the sampler"]
        update_run(setup.run_dir, queued=notes)
        study.set_user_attr("first_trials_queued", True)
