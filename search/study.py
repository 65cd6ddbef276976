"""The study: screen, then an ask-and-tell loop over candidates until enough of them reached the last rung.

    screen -> queue the first trials -> [recover killed workers' trials -> ask -> reject (duplicate, given
    up) or run the trial (the race decides after each rung) -> write its record -> tell Optuna]
    -> extend the two leaders' last rung while they are not separated (search.leaders)

Proposals are feasible by construction: the sampler chooses an attention shape and positions among
the layer counts and FFN sizes the budget leaves for it (search.space.FeasibleEncoding), or, per layer, each
layer's variant among those the budget leaves (search.layer_space). The sampler
learns only from evidence: rejected proposals are told as FAIL (samplers skip those); candidates
that stopped are told with their values at the rung they reached and a violated constraint (the
rungs they missed, search.race.shortfall), so they rank below every candidate that went on; the
screen's candidates that did not run are told the same way, as candidates that stopped at rung 0.
The screen's best and the reference cuts are queued once per study; the candidate of a killed,
interrupted or stale trial is queued again, so none is lost.
"""

import warnings
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from functools import partial

import optuna
from hydra.utils import instantiate
from optuna.trial import FrozenTrial, TrialState
from tqdm import tqdm

from slimnas.compress.arch import Shape, param_count, shape_of
from slimnas.core import interrupt
from slimnas.core.errors import SlimnasError, one_line
from slimnas.core.files import hash_json
from slimnas.core.rundir import FAILED, TrialRecord, outcome_text, trial_dir, write_record
from slimnas.core.stats import RankAgreement, rank_agreement
from slimnas.search.leaders import extend_leaders, round_tokens
from slimnas.search.proposals import (
    REJECTED,
    SCREENED,
    candidate_key,
    enqueue,
    evaluated_keys,
    failed_attempts,
    proposals_of,
    queue_first_trials,
)
from slimnas.search.race import RESERVED, Race, kd_spent, rung_key, shortfall
from slimnas.search.setup import SearchSetup
from slimnas.search.storage import (
    SILENT,
    Heartbeat,
    Worker,
    check_hardware,
    frozen,
    open_study,
    others_running,
    recover_stale_trials,
    retry,
    set_constraints,
    trial_id,
)
from slimnas.search.trial import new_record, policy_of, run_trial

REJECTIONS_BEFORE_FALLBACK = 20  # then a random unevaluated feasible candidate is queued instead


def make_sampler(setup: SearchSetup, seed: int) -> optuna.samplers.BaseSampler:
    """The configured Optuna sampler (search/sampler=...); samplers read each trial's constraints themselves."""
    return instantiate(setup.settings.sampler, seed=seed)


def sampler_seed(setup: SearchSetup, n_trials: int, others: list[FrozenTrial], worker: Worker) -> int:
    """Reproducible for one worker; distinct between workers asking at the same moment."""
    parts = [setup.settings.seed, n_trials] + ([worker.id] if others else [])
    return int(hash_json(parts)[:8], 16)


def reached_last_rung(trial: FrozenTrial) -> bool:
    return trial.state == TrialState.COMPLETE and trial.user_attrs.get("state") == "complete"


# The loop --------------------------------------------------------------------------------------------


def _rejection(trials: list[FrozenTrial], trial: FrozenTrial, setup: SearchSetup) -> str | None:
    """Why a proposal is not run: its candidate was evaluated (or given up) already."""
    key = candidate_key(trial)
    taken = evaluated_keys(trials, setup.settings.max_attempts, exclude=trial.number)
    if key not in taken:
        return None
    attempts = failed_attempts(trials)[key]
    if attempts >= setup.settings.max_attempts:
        return f"given up after {attempts} failed attempts"
    return f"duplicate of trial {taken[key]}"


def _queue_unevaluated(study: optuna.Study, setup: SearchSetup, trials: list[FrozenTrial]) -> bool:
    """Queue a random feasible candidate nobody evaluated (when the sampler keeps proposing rejects)."""
    taken = evaluated_keys(trials, setup.settings.max_attempts)
    choice = proposals_of(setup).unevaluated(setup, taken, hash_json([setup.settings.seed, len(trials)]))
    if choice is None:
        return False
    enqueue(study, setup, choice, {"proposed_by": "fallback"})
    return True


def _finished(trials: list[FrozenTrial], setup: SearchSetup) -> str | None:
    """Why the loop ends: enough trials reached the last rung, nothing is left, or no KD tokens are left."""
    waiting = any(t.state == TrialState.WAITING for t in trials)
    if not waiting and sum(reached_last_rung(t) for t in trials) >= setup.settings.n_trials:
        return f"{setup.settings.n_trials} trials reached the last rung"
    budget = setup.settings.budget.kd_tokens
    spent = sum(t.user_attrs.get(RESERVED, 0) for t in trials)
    if budget is not None and spent + setup.tokens_at(1) > budget:
        why = f"the study's KD budget is spent ({spent:,} of {budget:,} tokens)"
        if proposals_of(setup).races and setup.settings.race.extensions > 0:  # it needs more than one rung's tokens
            why += f"; the leaders' extension ({extension_tokens(setup):,} tokens) cannot run either"
        return why
    taken = evaluated_keys(trials, setup.settings.max_attempts)
    if not waiting and proposals_of(setup).unevaluated(setup, taken, setup.settings.seed) is None:
        return proposals_of(setup).spent
    return proposals_of(setup).exhausted(waiting)


def extension_tokens(setup: SearchSetup) -> int:
    """KD tokens of the leaders' first extension round: both leaders again with twice the last rung's tokens."""
    return 2 * round_tokens(setup, 0)


def _extension_plan(setup: SearchSetup) -> str:
    """The plan line's promise about the leaders' extension, kept only when the budget can pay for it."""
    settings = setup.settings
    if not proposals_of(setup).races or settings.race.extensions == 0:
        return ""
    plan = f"; the two leaders' last rung doubled up to {settings.race.extensions}x while they are not separated"
    budget, needed = settings.budget.kd_tokens, settings.n_trials * setup.tokens_at(setup.last_rung)
    if budget is not None and budget - needed < extension_tokens(setup):
        return (
            f"; no extension of the leaders' last rung: after {settings.n_trials} trials at the last rung "
            f"({needed:,} tokens) the KD budget ({budget:,}) has less than the {extension_tokens(setup):,} it needs"
        )
    return plan + (" (if the KD budget has room left)" if budget is not None else "")


def _tell(study: optuna.Study, trial: optuna.Trial, record: TrialRecord, setup: SearchSetup) -> None:
    if record.state == FAILED:
        study.tell(trial, state=TrialState.FAIL)
        return
    constraints = {}  # Optuna's constraints: <= 0 is satisfied
    if setup.settings.budget.latency_ms is not None:
        constraints["latency_over_budget_ms"] = record.final["latency_p50_ms"] - setup.settings.budget.latency_ms
    constraints["rungs_missed"] = shortfall(setup.last_rung - record.rung, record.final["quality"])
    set_constraints(study, trial, constraints)
    trial.set_user_attr("state", record.state)
    trial.set_user_attr("rung", record.rung)
    trial.set_user_attr("label", record.label)  # readable in optuna-dashboard
    if record.stop_reason:
        trial.set_user_attr("stop_reason", record.stop_reason)
    study.tell(trial, [record.final[o.metric] for o in setup.objectives])


def _failed_record(trial: FrozenTrial, reason: str, setup: SearchSetup, ended: bool) -> TrialRecord:
    """A failed trial's record has the shape of any other, with what is known of it.

    `ended`: it failed here and now, so its seconds are known; a dead worker's trial counts 0 s.
    """
    arch = shape_of(trial.user_attrs["architecture"])
    record = new_record(setup, trial.number, arch, policy_of(setup, trial.user_attrs), trial.user_attrs)
    record.state, record.fail_reason = FAILED, reason
    record.seconds = (datetime.now() - trial.datetime_start).total_seconds() if ended and trial.datetime_start else 0.0
    return record


def _run(study: optuna.Study, trial: optuna.Trial, arch: Shape, setup: SearchSetup) -> TrialRecord | None:
    """Run one accepted candidate, write its record and tell the study; a failure is recorded and the search goes
    on. None when another worker finished this very trial first (SQLite can hand a queued trial to two workers)."""
    state = frozen(study, trial)
    exempt = "reference" in state.user_attrs or not proposals_of(setup).races
    race = Race(study, trial, setup, state.user_attrs["params"], exempt)
    try:
        record = run_trial(setup, trial.number, arch, race, state.user_attrs)
    except optuna.exceptions.UpdateFinishedTrialError:
        tqdm.write(f"note: trial {trial.number} was also taken by another worker, which finished it first")
        return None
    except Exception as error:  # an OOM, a NaN, anything
        record = _failed_record(state, f"{type(error).__name__}: {one_line(error)}", setup, ended=True)
    if frozen(study, trial).state != TrialState.RUNNING:  # finished by the other worker while this one ran it
        tqdm.write(f"note: trial {trial.number} was also taken by another worker, which finished it first")
        return None
    write_record(setup.run_dir, record)  # before telling: a kill in between leaves a record that recovery rewrites
    try:
        if record.state == FAILED:
            trial.set_user_attr("fail_reason", record.fail_reason)
        _tell(study, trial, record, setup)
    except optuna.exceptions.UpdateFinishedTrialError:
        tqdm.write(f"note: trial {trial.number} was also taken by another worker, which finished it first")
        return None
    if record.stop_reason:
        tqdm.write(f"trial {trial.number} ({record.label}) stopped after rung {record.rung}: {record.stop_reason}")
    return record


def _fail_interrupted(study: optuna.Study, trial: optuna.Trial, setup: SearchSetup) -> None:
    """Ctrl-C: the running trial is recorded as interrupted and its candidate queued again for the next run."""
    state = frozen(study, trial)
    if state.state != TrialState.RUNNING:
        return
    trial.set_user_attr("fail_reason", "interrupted")
    accepted = REJECTED not in state.user_attrs and "architecture" in state.user_attrs
    if accepted:
        write_record(setup.run_dir, _failed_record(state, "interrupted", setup, ended=True))
    study.tell(trial, state=TrialState.FAIL)
    if accepted:
        retry(study, frozen(study, trial))


def _recover(study: optuna.Study, setup: SearchSetup) -> None:
    for stale, reason in recover_stale_trials(study, setup.storage):
        tqdm.write(f"trial {stale.number}: {reason}; its candidate is queued again")
        if "architecture" in stale.user_attrs:  # its record (maybe a "complete" one written before the kill)
            write_record(setup.run_dir, _failed_record(stale, reason, setup, ended=False))


def run_study(setup: SearchSetup) -> optuna.Study:
    directions = [o.direction for o in setup.objectives]
    study = open_study(setup.storage, setup.settings.study_name, directions, setup.settings_hash)
    with warnings.catch_warnings():  # experimental in Optuna 5, and what optuna-dashboard shows
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([o.name for o in setup.objectives])
    check_hardware(study, setup.hardware, setup.timings_rank)
    worker = Worker.current()
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    proposals = proposals_of(setup)
    queue_first_trials(study, setup, proposals.screen(setup))
    failures_in_a_row = rejections_in_a_row = 0
    progress = tqdm(total=setup.settings.n_trials, desc="trials", unit="trial")
    try:
        while True:
            interrupt.check()
            _recover(study, setup)
            trials = study.get_trials(deepcopy=False)
            if (reached := min(sum(reached_last_rung(t) for t in trials), setup.settings.n_trials)) != progress.n:
                progress.update(reached - progress.n)
            if why := _finished(trials, setup):
                tqdm.write(f"search ends: {why}")
                break
            proposals.queue_next(study, setup, trials)
            study.sampler = make_sampler(setup, sampler_seed(setup, len(trials), others_running(study, worker), worker))
            trial = study.ask()
            try:
                with Heartbeat(setup.storage, trial_id(trial)):
                    trial.set_user_attr("worker", worker.id)
                    arch = proposals.suggest(trial, setup, frozen(study, trial).user_attrs.get("architecture"))
                    if "proposed_by" not in frozen(study, trial).user_attrs:
                        trial.set_user_attr("proposed_by", "sampler")
                    trial.set_user_attr("architecture", arch.as_dict())
                    trial.set_user_attr("params", param_count(setup.context.teacher.model.config, arch))
                    if reason := _rejection(study.get_trials(deepcopy=False), frozen(study, trial), setup):
                        trial.set_user_attr(REJECTED, reason)
                        study.tell(trial, state=TrialState.FAIL)
                        rejections_in_a_row += 1
                        if rejections_in_a_row >= REJECTIONS_BEFORE_FALLBACK:
                            rejections_in_a_row = 0
                            if not _queue_unevaluated(study, setup, trials) and not others_running(study, worker):
                                break
                        continue
                    rejections_in_a_row = 0
                    record = _run(study, trial, arch, setup)
            except KeyboardInterrupt:
                _fail_interrupted(study, trial, setup)
                raise
            if record is None:
                continue
            failures_in_a_row = failures_in_a_row + 1 if record.state == FAILED else 0
            if failures_in_a_row >= setup.settings.max_failures_in_a_row:
                raise SlimnasError(
                    f"{failures_in_a_row} trials in a row failed, the last with: {record.fail_reason} "
                    f"(see {trial_dir(setup.run_dir, record.trial)}/record.json)"
                )
    finally:
        progress.close()
    running = others_running(study, worker)
    for trial in running:
        tqdm.write(
            f"note: trial {trial.number} is still running on worker {trial.user_attrs.get('worker')}: that worker "
            f"finishes it; if it dies, the next run of this command retries it (at once on the same host, "
            f"after {setup.settings.storage.grace_period} s without heartbeat elsewhere)"
        )
    if not running and proposals.races:
        extend_leaders(study, setup)
    return study


def describe(setup: SearchSetup) -> list[str]:
    """The budgets and choices of the search, printed at its start."""
    config, settings = setup.context.teacher.model.config, setup.settings
    tokens = ", ".join(f"{t:,}" for t in settings.race.rung_tokens)
    corpus = setup.context.corpus
    lines = [
        f"{proposals_of(setup).space}: {setup.space.size()} points, {len(setup.feasible)} feasible under "
        f"{settings.budget.describe(config)}",
        f"proposals: {proposals_of(setup).describe(setup)}; objectives: "
        + ", ".join(f"{o.name} ({o.direction})" for o in setup.objectives),
        f"KD per trial: rungs at {tokens} tokens (batch {setup.distill.batch_size} x {corpus.seq_len}); a candidate "
        f"stops when a peer is better with {settings.race.confidence:.0%} one-sided confidence, Bonferroni-adjusted "
        f"over its peers and the rungs where it can stop" + _extension_plan(setup),
        f"quality: -held-out KL on {corpus.documents('selection')} selection {corpus.unit}s (one row each, full "
        f"vocabulary) of {corpus.source}; error bars and the race's tests over those documents",
    ]
    if setup.suite is not None:
        lines.append(
            f"lm-eval per trial: {setup.suite.describe()}, {setup.quality.trial_limit} documents each from the "
            f"selection pool"
        )
    return lines


# What happened, in words ------------------------------------------------------------------------------


def outcome(trial: FrozenTrial) -> str:
    """What became of a trial, in the words the summary and the report use."""
    if trial.state == TrialState.COMPLETE:
        if trial.user_attrs.get("state") == SCREENED:
            return "screened only (told to the sampler)"
        return outcome_text(trial.user_attrs.get("state", "complete"), trial.user_attrs.get("rung", 0))
    if trial.state == TrialState.FAIL:
        if REJECTED in trial.user_attrs:
            return f"rejected ({trial.user_attrs[REJECTED].split(' of ')[0]})"
        return f"failed: {trial.user_attrs.get('fail_reason', SILENT)}"  # Optuna's stale-trial check leaves no reason
    return trial.state.name.lower()


def _summed_kl(trial: FrozenTrial, rung: int) -> float | None:
    """A trial's KL at a rung, summed over the documents (ranks like the mean); None when it did not reach it."""
    values = trial.user_attrs.get(rung_key(rung))
    return None if values is None else sum(values)


def predicted_by_library(setup: SearchSetup) -> Callable[[FrozenTrial], float | None] | None:
    """A trial's KL as the block library predicts it (search.blocks), None without a library."""
    if setup.blocks is None:
        return None
    library = setup.blocks.library
    return lambda trial: library.predict(shape_of(trial.user_attrs["architecture"]))


def agreement_with_last_rung(
    trials: list[FrozenTrial], last_rung: int, predicted: Callable[[FrozenTrial], float | None] | None = None
) -> dict[str, RankAgreement]:
    """How far each cheap ranking predicts the last rung's, over the trials that reached it: each earlier rung's KL
    and, when given, a prediction made before any trial ran (the block library's summed block KL)."""
    final = [t for t in trials if reached_last_rung(t) and rung_key(last_rung) in t.user_attrs]
    rankings = {f"rung {rung}{' (the screen)' if rung == 0 else ''}": partial(_summed_kl, rung=rung)
                for rung in range(last_rung)}  # fmt: skip
    if predicted is not None:
        rankings["the block library's predicted KL (summed block costs, no KD)"] = predicted
    agreement = {}
    for name, ranking in rankings.items():
        pairs = [(early, _summed_kl(t, last_rung)) for t in final if (early := ranking(t)) is not None]
        if (found := rank_agreement(pairs)) is not None:
            agreement[name] = found
    return agreement


def summary_lines(study: optuna.Study, setup: SearchSetup) -> list[str]:
    """Trials by outcome and by who proposed them, the KD spent, and how early rungs predicted the last."""
    trials = study.get_trials(deepcopy=False)
    lines = [f"{n:>4}  {key}" for key, n in Counter(outcome(t) for t in trials).most_common()]
    ran = [t for t in trials if REJECTED not in t.user_attrs and t.user_attrs.get("state") != SCREENED]
    proposers = Counter(t.user_attrs.get("proposed_by", "sampler") for t in ran)
    lines.append("      evaluated candidates proposed by: " + ", ".join(f"{k} {n}" for k, n in proposers.most_common()))
    retried = [
        f"{t.number} (of {t.user_attrs['retry_of']})" for t in trials if t.user_attrs.get("retry_of") is not None
    ]
    if retried:
        lines.append(f"      retries of killed or interrupted trials: {', '.join(retried)}")
    budget = setup.settings.budget.kd_tokens
    lines.append(f"      KD tokens spent: {kd_spent(study):,}" + (f" of {budget:,}" if budget else ""))
    for name, found in agreement_with_last_rung(trials, setup.last_rung, predicted_by_library(setup)).items():
        lines.append(
            f"      rank agreement of {name} with the last rung: "
            f"Spearman {found.spearman:.2f}, Kendall {found.kendall:.2f} over {found.n} trials"
        )
    return lines
