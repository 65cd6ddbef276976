"""The study: an ask-and-tell loop over candidates until enough of them reached the last rung.

    recover killed workers' trials -> ask -> reject (infeasible, duplicate, given up) or run the
    trial -> write its record -> tell Optuna

The sampler learns only from evidence: rejected proposals are told as FAIL (samplers skip those);
candidates stopped by successive halving are told with their values at the rung they reached and a
violated "stopped" constraint, so they rank below every candidate that went on. Reference candidates
(uniform, depth-only, width-only, zero-shot pick) are queued once per study and always run to the
last rung; a retried or interrupted candidate is queued again, so neither is ever lost.
"""

import math
import random
import warnings
from dataclasses import asdict
from itertools import pairwise

import optuna
from optuna.trial import FrozenTrial, TrialState
from tqdm import tqdm

from compress.arch import Architecture, param_count, weight_bytes
from compress.prune import plan_pruning, prune_model
from compress.runtime import interrupt
from compress.runtime.errors import SlimnasError, one_line
from compress.runtime.files import write_json
from search.records import COMPLETE, FAILED, STOPPED, TrialRecord, trial_dir, update_run, write_record
from search.setup import SearchSetup
from search.space import (
    DIMENSIONS,
    Reference,
    depth_only_reference,
    uniform_reference,
    width_only_reference,
)
from search.storage import Heartbeat, Worker, check_hardware, open_study, others_running, recover_stale_trials, retry
from search.trial import run_trial

REJECTED = "rejected"  # user attr of a proposal dropped before any compute
REJECTIONS_BEFORE_FALLBACK = 20  # then a random unevaluated feasible candidate is queued instead
NOT_THE_CANDIDATES_FAULT = ("interrupted",)  # failures that do not count towards search.max_attempts


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    """Samplers read each trial's constraints (set before it is told) themselves."""
    if name == "tpe":
        return optuna.samplers.TPESampler(multivariate=True, seed=seed, n_startup_trials=4)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=8)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=4)
    return optuna.samplers.RandomSampler(seed=seed)  # random, and enumerate (everything is queued)


def suggest(trial: optuna.Trial, setup: SearchSetup) -> Architecture:
    values = {}
    for name in DIMENSIONS:
        choices = setup.space.values[name]
        steps = {b - a for a, b in pairwise(choices)}
        if len(steps) <= 1:
            values[name] = trial.suggest_int(name, choices[0], choices[-1], step=steps.pop() if steps else 1)
        else:
            values[name] = trial.suggest_categorical(name, choices)
    return Architecture(**values)


def candidate_key(trial: FrozenTrial) -> tuple:
    """A candidate is its architecture and how its layers are chosen (depth-only cuts one block)."""
    return tuple(sorted(trial.params.items())), trial.user_attrs.get("depth_strategy")


def attempts(trials: list[FrozenTrial], key: tuple) -> int:
    return sum(
        1
        for t in trials
        if t.state == TrialState.FAIL
        and REJECTED not in t.user_attrs
        and t.user_attrs.get("fail_reason") not in NOT_THE_CANDIDATES_FAULT
        and candidate_key(t) == key
    )


def evaluated_keys(trials: list[FrozenTrial], max_attempts: int, exclude: int | None = None) -> dict[tuple, int]:
    """Candidates that count as evaluated (done, running, queued or given up), with one trial of each."""
    taken = {}
    for t in trials:
        if t.number == exclude:
            continue
        key = candidate_key(t)
        if t.state in (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING):
            taken.setdefault(key, t.number)
        elif t.state == TrialState.FAIL and attempts(trials, key) >= max_attempts:
            taken.setdefault(key, t.number)
    return taken


def reached_last_rung(trial: FrozenTrial) -> bool:
    return trial.state == TrialState.COMPLETE and trial.user_attrs.get("state") == COMPLETE


def promoted(value: float, peers: list[float], eta: int, min_peers: int) -> bool:
    """Successive halving: continue only in the top 1/eta of the trials that reached this rung (higher is better)."""
    if len(peers) < min_peers:
        return True
    rank = sum(1 for p in peers if p > value)
    return rank < math.ceil((len(peers) + 1) / eta)


class Promotion:
    """Rung decisions for one trial; rung values live in the study so every worker ranks against the same peers."""

    def __init__(self, study: optuna.Study, trial: optuna.Trial, setup: SearchSetup, always: bool):
        self.study, self.trial, self.setup, self.always = study, trial, setup, always

    def __call__(self, rung: int, value: float) -> bool:
        key = f"rung_{rung}"
        self.trial.set_user_attr(key, value)
        if self.always or (rung == 0 and self.setup.fidelity.screen == "rank"):
            return True
        peers = [
            t.user_attrs[key]
            for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
            if key in t.user_attrs and t.number != self.trial.number
        ]
        return promoted(value, peers, self.setup.fidelity.eta, self.setup.fidelity.min_peers)


# References ------------------------------------------------------------------------------------------


def zero_shot_reference(setup: SearchSetup) -> tuple[Reference | None, str]:
    """The best of a seeded sample of feasible candidates by selection KL right after pruning (ModelOpt's pick)."""
    teacher = setup.context.teacher.model
    candidates = list(setup.feasible)
    random.Random(setup.settings.seed).shuffle(candidates)
    scores = []
    for arch in tqdm(candidates[: setup.references.zero_shot_candidates], desc="zero-shot screen", leave=False):
        student = prune_model(teacher, plan_pruning(setup.context.importance, teacher.config, arch, setup.policy), arch)
        metrics = setup.selection.evaluate(student)
        scores.append({**arch.as_dict(), "label": arch.label(), "heldout_kl": metrics.kl, "stderr": metrics.kl_stderr})
    scores.sort(key=lambda s: s["heldout_kl"])
    write_json(setup.run_dir / "zero_shot.json", scores)
    if not scores:
        return None, "zero_shot: no candidate screened"
    best = scores[0]
    arch = Architecture(**{k: best[k] for k in DIMENSIONS})
    note = f"best of {len(scores)} by selection KL without KD ({best['heldout_kl']:.3f} ± {best['stderr']:.3f})"
    return Reference("zero_shot", arch, note), f"zero_shot: {arch.label()}, {note}"


def enqueue_references(study: optuna.Study, setup: SearchSetup) -> None:
    """Queue the references (and, when enumerating, every feasible candidate) once per study."""
    if study.user_attrs.get("references_enqueued"):
        return
    teacher_config = setup.context.teacher.model.config
    finders = {
        "uniform": lambda: uniform_reference(
            list(setup.feasible), teacher_config, setup.budget, setup.references.uniform_tolerance
        ),
        "depth_only": lambda: depth_only_reference(list(setup.feasible), teacher_config, setup.budget),
        "width_only": lambda: width_only_reference(list(setup.feasible), teacher_config, setup.budget),
        "zero_shot": lambda: zero_shot_reference(setup),
    }
    merged: dict[tuple, list[Reference]] = {}
    notes = []
    for kind in setup.references.kinds:
        reference, note = finders[kind]()
        notes.append(note)
        print(f"reference {note}")
        if reference is not None:
            merged.setdefault((reference.arch, reference.depth_strategy), []).append(reference)
    for (arch, depth_strategy), references in merged.items():
        attrs = {
            "reference": "+".join(r.kind for r in references),
            "reference_note": "; ".join(r.note for r in references),
        }
        if depth_strategy:
            attrs["depth_strategy"] = depth_strategy
        study.enqueue_trial(arch.as_dict(), user_attrs=attrs)
    if setup.sampler == "enumerate":
        chosen = {arch for arch, strategy in merged if strategy is None}
        for arch in setup.feasible:
            if arch not in chosen:
                study.enqueue_trial(arch.as_dict())
    study.set_user_attr("reference_notes", notes)
    update_run(setup.run_dir, references=notes)
    study.set_user_attr("references_enqueued", True)


# The loop --------------------------------------------------------------------------------------------


def _rejection(trials: list[FrozenTrial], trial: optuna.Trial, arch: Architecture, setup: SearchSetup) -> str | None:
    if arch not in setup.feasible:
        return "infeasible under the budget"
    frozen = next(t for t in trials if t.number == trial.number)
    key = candidate_key(frozen)
    taken = evaluated_keys(trials, setup.settings.max_attempts, exclude=trial.number)
    if key in taken:
        given_up = attempts(trials, key) >= setup.settings.max_attempts
        return (
            f"given up after {attempts(trials, key)} failed attempts"
            if given_up
            else f"duplicate of trial {taken[key]}"
        )
    return None


def _queue_unevaluated(study: optuna.Study, setup: SearchSetup, trials: list[FrozenTrial]) -> bool:
    """Queue a random feasible candidate nobody evaluated (when the sampler keeps proposing rejects)."""
    taken = {key for key in evaluated_keys(trials, setup.settings.max_attempts)}
    left = [a for a in setup.feasible if (tuple(sorted(a.as_dict().items())), None) not in taken]
    if not left:
        return False
    study.enqueue_trial(random.Random(len(trials)).choice(left).as_dict())
    return True


def _finished(trials: list[FrozenTrial], setup: SearchSetup) -> bool:
    """N trials reached the last rung (or nothing is left to propose), and nothing queued is left over."""
    if any(t.state == TrialState.WAITING for t in trials):
        return False
    if sum(reached_last_rung(t) for t in trials) >= setup.settings.n_trials:
        return True
    taken = evaluated_keys(trials, setup.settings.max_attempts)
    return all((tuple(sorted(a.as_dict().items())), None) in taken for a in setup.feasible)


def _tell(study: optuna.Study, trial: optuna.Trial, record: TrialRecord, setup: SearchSetup) -> None:
    if record.state == FAILED:
        study.tell(trial, state=TrialState.FAIL)
        return
    if setup.budget.latency_ms is not None:  # Optuna constraints: <= 0 is satisfied
        trial.set_constraint(
            "latency_over_budget_ms", record.final.get("latency_p50_ms", 0.0) - setup.budget.latency_ms
        )
    trial.set_constraint("stopped_by_halving", 1.0 if record.state == STOPPED else 0.0)
    trial.set_user_attr("state", record.state)
    trial.set_user_attr("stage", record.stage)
    study.tell(trial, [record.final[o.metric] for o in setup.objectives])


def run_study(setup: SearchSetup) -> optuna.Study:
    study = open_study(
        setup.storage, setup.settings.study_name, [o.direction for o in setup.objectives], setup.fingerprint
    )
    check_hardware(study, setup.hardware, setup.timings_rank)
    me = Worker.current()
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    enqueue_references(study, setup)
    failures_in_a_row = rejections_in_a_row = 0
    progress = tqdm(total=setup.settings.n_trials, desc="trials", unit="trial")
    try:
        while True:
            interrupt.check()
            for number, reason in recover_stale_trials(study, setup.storage):
                tqdm.write(f"trial {number}: {reason}; its candidate is queued again")
            trials = study.get_trials(deepcopy=False)
            if (reached := min(sum(reached_last_rung(t) for t in trials), setup.settings.n_trials)) != progress.n:
                progress.update(reached - progress.n)
            if _finished(trials, setup):
                break
            study.sampler = make_sampler(setup.sampler, (setup.settings.seed * 1_000_003 + len(trials)) % 2**31)
            trial = study.ask()
            try:
                with Heartbeat(setup.storage, trial._trial_id):
                    trial.set_user_attr("worker", me.id)
                    arch = suggest(trial, setup)
                    trials = study.get_trials(deepcopy=False)
                    reason = _rejection(trials, trial, arch, setup)
                    if reason is not None:
                        trial.set_user_attr(REJECTED, reason)
                        study.tell(trial, state=TrialState.FAIL)
                        rejections_in_a_row += 1
                        if rejections_in_a_row >= REJECTIONS_BEFORE_FALLBACK:
                            rejections_in_a_row = 0
                            if not _queue_unevaluated(study, setup, trials) and not others_running(study, me):
                                break
                        continue
                    rejections_in_a_row = 0
                    record = _run(study, trial, arch, setup, me)
            except KeyboardInterrupt:
                _fail_interrupted(study, trial, setup, me)
                raise
            failures_in_a_row = failures_in_a_row + 1 if record.state == FAILED else 0
            if failures_in_a_row >= setup.settings.max_failures_in_a_row:
                raise SlimnasError(
                    f"{failures_in_a_row} trials in a row failed, the last with: {record.fail_reason} "
                    f"(see {trial_dir(setup.run_dir, record.trial)}/record.json)"
                )
    finally:
        progress.close()
    for trial in others_running(study, me):
        tqdm.write(
            f"note: trial {trial.number} is still running on worker {trial.user_attrs.get('worker')}: that worker "
            f"finishes it; if it dies, the next run of this command retries it (at once on the same host, "
            f"after {setup.storage.grace_period} s without heartbeat elsewhere)"
        )
    return study


def _reference(trial: optuna.Trial, arch: Architecture) -> Reference | None:
    attrs = trial.user_attrs
    if "reference" not in attrs:
        return None
    return Reference(attrs["reference"], arch, attrs.get("reference_note", ""), attrs.get("depth_strategy"))


def _failed_record(trial: optuna.Trial, arch: Architecture, reason: str, setup: SearchSetup, me: Worker) -> TrialRecord:
    """A failed trial's record has the shape of any other, with what it knew."""
    reference = _reference(trial, arch)
    return TrialRecord(
        trial=trial.number,
        architecture=arch.as_dict(),
        label=arch.label(),
        params=param_count(setup.context.teacher.model.config, arch),
        params_fraction=param_count(setup.context.teacher.model.config, arch)
        / param_count(setup.context.teacher.model.config),
        weight_bytes_bf16=weight_bytes(setup.context.teacher.model.config, arch=arch),
        pruning=asdict(setup.policy),
        reference=reference.kind if reference else None,
        reference_note=reference.note if reference else None,
        retry_of=trial.user_attrs.get("retry_of"),
        state=FAILED,
        fail_reason=reason,
        worker=me.id,
        command=setup.command,
        hardware=setup.hardware,
    )


def _run(study: optuna.Study, trial: optuna.Trial, arch: Architecture, setup: SearchSetup, me: Worker) -> TrialRecord:
    """Run one accepted candidate, write its record and tell the study; a failure is recorded and the search goes on."""
    reference = _reference(trial, arch)
    promote = Promotion(study, trial, setup, always=reference is not None)
    try:
        record = run_trial(setup, trial.number, arch, promote, reference, trial.user_attrs.get("retry_of"), me.id)
    except Exception as error:  # an OOM, a NaN, anything
        record = _failed_record(trial, arch, f"{type(error).__name__}: {one_line(error)}", setup, me)
        trial.set_user_attr("fail_reason", record.fail_reason)
    write_record(setup.run_dir, record)
    try:
        _tell(study, trial, record, setup)
    except optuna.exceptions.UpdateFinishedTrialError:
        tqdm.write(f"note: trial {trial.number} was also taken by another worker (SQLite), which finished it first")
    return record


def _fail_interrupted(study: optuna.Study, trial: optuna.Trial, setup: SearchSetup, me: Worker) -> None:
    """Ctrl-C: the running trial is recorded as interrupted and its candidate queued again for the next run."""
    frozen = study._storage.get_trial(trial._trial_id)
    if frozen.state != TrialState.RUNNING:
        return
    trial.set_user_attr("fail_reason", "interrupted")
    if REJECTED not in frozen.user_attrs and len(frozen.params) == len(DIMENSIONS):
        arch = Architecture(**frozen.params)
        write_record(setup.run_dir, _failed_record(trial, arch, "interrupted", setup, me))
        study.tell(trial, state=TrialState.FAIL)
        retry(study, study._storage.get_trial(trial._trial_id))
    else:
        study.tell(trial, state=TrialState.FAIL)


def summary_lines(study: optuna.Study) -> list[str]:
    """Trials by state, so a user sees at once that nothing was lost."""
    trials = study.get_trials(deepcopy=False)
    counts: dict[str, int] = {}
    for t in trials:
        if t.state == TrialState.COMPLETE:
            key = (
                "reached the last rung"
                if reached_last_rung(t)
                else f"stopped by halving after {t.user_attrs.get('stage')}"
            )
        elif t.state == TrialState.FAIL:
            key = (
                f"rejected ({t.user_attrs[REJECTED].split(' of ')[0]})"
                if REJECTED in t.user_attrs
                else (f"failed: {t.user_attrs.get('fail_reason', 'unknown')}")
            )
        else:
            key = t.state.name.lower()
        counts[key] = counts.get(key, 0) + 1
    retried = [t.number for t in trials if t.user_attrs.get("retry_of") is not None]
    lines = [f"{n:>4}  {key}" for key, n in sorted(counts.items(), key=lambda kv: -kv[1])]
    if retried:
        lines.append(f"      retries of killed or interrupted trials: {', '.join(map(str, retried))}")
    return lines
