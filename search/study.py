"""The study: an ask-and-tell loop over candidates until enough of them reached the last rung.

    recover killed workers' trials -> ask -> reject (duplicate, given up) or run the trial
    -> write its record -> tell Optuna

Proposals are feasible by construction: the sampler chooses an attention shape and positions among
the layer counts and FFN sizes the budget leaves for it (search.space.FeasibleEncoding). The sampler
learns only from evidence: rejected proposals are told as FAIL (samplers skip those); candidates
stopped by successive halving are told with their values at the rung they reached and a violated
constraint (the number of rungs they missed), so they rank below every candidate that went on.
Reference candidates are queued once per study and always run to the last rung; the candidate of a
killed, interrupted or stale trial is queued again, so none is lost.
"""

import math
import random
import warnings
from collections import Counter
from dataclasses import asdict
from datetime import datetime

import optuna
from optuna.trial import FrozenTrial, TrialState
from scipy.stats import spearmanr
from tqdm import tqdm

from slimnas.compress.arch import Architecture, param_count, weight_bytes
from slimnas.compress.runtime import interrupt
from slimnas.compress.runtime.errors import SlimnasError, one_line
from slimnas.compress.runtime.files import hash_json
from slimnas.search.records import (
    COMPLETE,
    FAILED,
    TrialRecord,
    outcome_text,
    rung_of,
    trial_dir,
    update_run,
    write_record,
)
from slimnas.search.references import Reference, find_reference
from slimnas.search.setup import SearchSetup
from slimnas.search.space import ATTENTION, DEPTH, WIDTH
from slimnas.search.storage import (
    Heartbeat,
    Worker,
    check_hardware,
    frozen,
    open_study,
    others_running,
    recover_stale_trials,
    retry,
    trial_id,
)
from slimnas.search.trial import run_trial

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


def sampler_seed(setup: SearchSetup, n_trials: int, others: list[FrozenTrial], worker: Worker) -> int:
    """Reproducible for one worker; distinct between workers asking at the same moment."""
    parts = [setup.settings.seed, n_trials] + ([worker.id] if others else [])
    return int(hash_json(parts)[:8], 16)


def suggest(trial: optuna.Trial, setup: SearchSetup) -> Architecture:
    """A feasible candidate from the sampler's three coordinates (see search.space.FeasibleEncoding)."""
    encoding = setup.encoding
    attention = trial.suggest_categorical(ATTENTION, list(encoding.attention))
    return encoding.decode(attention, trial.suggest_float(DEPTH, 0.0, 1.0), trial.suggest_float(WIDTH, 0.0, 1.0))


def candidate_key(trial: FrozenTrial) -> tuple | None:
    """A candidate is its architecture and how its layers are chosen (depth-only cuts one block)."""
    arch = trial.user_attrs.get("architecture")
    return None if arch is None else (tuple(sorted(arch.items())), trial.user_attrs.get("depth_strategy"))


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
    """Candidates that count as evaluated (done, running, queued or given up), with one trial of each."""
    attempts = failed_attempts(trials)
    taken = {}
    for t in trials:
        key = candidate_key(t)
        if t.number == exclude or key is None or REJECTED in t.user_attrs:
            continue
        if t.state in (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING) or attempts[key] >= max_attempts:
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
        last = rung == len(self.setup.rung_steps)  # recorded for the rank agreement; nothing lies beyond it
        if last or self.always or (rung == 0 and self.setup.fidelity.screen == "rank"):
            return True
        peers = [
            t.user_attrs[key]
            for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
            if key in t.user_attrs and t.number != self.trial.number
        ]
        return promoted(value, peers, self.setup.fidelity.eta, self.setup.fidelity.min_peers)


def enqueue_references(study: optuna.Study, setup: SearchSetup) -> None:
    """Queue the references (and, when enumerating, every feasible candidate) once per study.

    Two workers starting together may both queue them; the second copies are rejected as duplicates.
    """
    if study.user_attrs.get("references_enqueued"):
        return
    merged: dict[tuple, list[Reference]] = {}
    notes = []
    for kind in setup.references.kinds:
        reference, note = find_reference(kind, setup)
        notes.append(note)
        print(f"reference {note}")
        if reference is not None:
            merged.setdefault((reference.arch, reference.depth_strategy), []).append(reference)
    for (arch, depth_strategy), references in merged.items():
        attrs = {
            "architecture": arch.as_dict(),  # queued candidates count as evaluated: the sampler's copies are rejected
            "reference": "+".join(r.kind for r in references),
            "reference_note": "; ".join(r.note for r in references),
            "proposed_by": "reference",
        }
        if depth_strategy:
            attrs["depth_strategy"] = depth_strategy
        study.enqueue_trial(setup.encoding.encode(arch), user_attrs=attrs)
    if setup.sampler == "enumerate":
        chosen = {arch for arch, strategy in merged if strategy is None}
        for arch in setup.feasible:
            if arch not in chosen:
                attrs = {"architecture": arch.as_dict(), "proposed_by": "enumerate"}
                study.enqueue_trial(setup.encoding.encode(arch), user_attrs=attrs)
    study.set_user_attr("reference_notes", notes)
    update_run(setup.run_dir, references=notes)
    study.set_user_attr("references_enqueued", True)


# The loop --------------------------------------------------------------------------------------------


def _rejection(trials: list[FrozenTrial], trial: FrozenTrial, setup: SearchSetup) -> str | None:
    """Why a proposal is not run: its candidate was evaluated (or given up) already."""
    key = candidate_key(trial)
    taken = evaluated_keys(trials, setup.settings.max_attempts, exclude=trial.number)
    if key not in taken:
        return None
    attempts = failed_attempts(trials)[key]
    return (
        f"given up after {attempts} failed attempts"
        if attempts >= setup.settings.max_attempts
        else (f"duplicate of trial {taken[key]}")
    )


def _queue_unevaluated(study: optuna.Study, setup: SearchSetup, trials: list[FrozenTrial]) -> bool:
    """Queue a random feasible candidate nobody evaluated (when the sampler keeps proposing rejects)."""
    taken = evaluated_keys(trials, setup.settings.max_attempts)
    left = [a for a in setup.feasible if (tuple(sorted(a.as_dict().items())), None) not in taken]
    if not left:
        return False
    choice = random.Random(hash_json([setup.settings.seed, len(trials)])).choice(left)
    study.enqueue_trial(
        setup.encoding.encode(choice), user_attrs={"architecture": choice.as_dict(), "proposed_by": "fallback"}
    )
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
        trial.set_constraint("latency_over_budget_ms", record.final["latency_p50_ms"] - setup.budget.latency_ms)
    trial.set_constraint("rungs_missed", float(len(setup.rung_steps) - rung_of(record.stage)))
    trial.set_user_attr("state", record.state)
    trial.set_user_attr("stage", record.stage)
    study.tell(trial, [record.final[o.metric] for o in setup.objectives])


def _failed_record(trial: FrozenTrial, reason: str, setup: SearchSetup, worker: str, ended: bool) -> TrialRecord:
    """A failed trial's record has the shape of any other, with what is known of it.

    `ended`: it failed here and now, so its seconds are known; a dead worker's trial counts 0 s.
    """
    arch = Architecture(**trial.user_attrs["architecture"])
    config = setup.context.teacher.model.config
    return TrialRecord(
        trial=trial.number,
        architecture=arch.as_dict(),
        label=arch.label(),
        params=param_count(config, arch),
        params_fraction=param_count(config, arch) / param_count(config),
        weight_bytes_bf16=weight_bytes(config, arch=arch),
        pruning=asdict(setup.policy),
        reference=trial.user_attrs.get("reference"),
        reference_note=trial.user_attrs.get("reference_note"),
        retry_of=trial.user_attrs.get("retry_of"),
        state=FAILED,
        fail_reason=reason,
        seconds=(datetime.now() - trial.datetime_start).total_seconds() if ended and trial.datetime_start else 0.0,
        worker=worker,
        command=setup.command,
        hardware=setup.hardware,
    )


def _reference(trial: FrozenTrial, arch: Architecture) -> Reference | None:
    attrs = trial.user_attrs
    if "reference" not in attrs:
        return None
    return Reference(attrs["reference"], arch, attrs.get("reference_note", ""), attrs.get("depth_strategy"))


def _run(study: optuna.Study, trial: optuna.Trial, arch: Architecture, setup: SearchSetup, worker: Worker):
    """Run one accepted candidate, write its record and tell the study; a failure is recorded and the search goes on."""
    state = frozen(study, trial)
    reference = _reference(state, arch)
    promote = Promotion(study, trial, setup, always=reference is not None)
    try:
        record = run_trial(setup, trial.number, arch, promote, reference, state.user_attrs.get("retry_of"), worker.id)
    except Exception as error:  # an OOM, a NaN, anything
        record = _failed_record(state, f"{type(error).__name__}: {one_line(error)}", setup, worker.id, ended=True)
        trial.set_user_attr("fail_reason", record.fail_reason)
    write_record(setup.run_dir, record)
    try:
        _tell(study, trial, record, setup)
    except optuna.exceptions.UpdateFinishedTrialError:
        tqdm.write(f"note: trial {trial.number} was also taken by another worker (SQLite), which finished it first")
    return record


def _fail_interrupted(study: optuna.Study, trial: optuna.Trial, setup: SearchSetup, worker: Worker) -> None:
    """Ctrl-C: the running trial is recorded as interrupted and its candidate queued again for the next run."""
    state = frozen(study, trial)
    if state.state != TrialState.RUNNING:
        return
    trial.set_user_attr("fail_reason", "interrupted")
    accepted = REJECTED not in state.user_attrs and "architecture" in state.user_attrs
    if accepted:
        write_record(setup.run_dir, _failed_record(state, "interrupted", setup, worker.id, ended=True))
    study.tell(trial, state=TrialState.FAIL)
    if accepted:
        retry(study, frozen(study, trial))


def run_study(setup: SearchSetup) -> optuna.Study:
    directions = [o.direction for o in setup.objectives]
    study = open_study(setup.storage, setup.settings.study_name, directions, setup.settings_hash)
    check_hardware(study, setup.hardware, setup.timings_rank)
    worker = Worker.current()
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    enqueue_references(study, setup)
    failures_in_a_row = rejections_in_a_row = 0
    progress = tqdm(total=setup.settings.n_trials, desc="trials", unit="trial")
    try:
        while True:
            interrupt.check()
            for stale, reason in recover_stale_trials(study, setup.storage):
                tqdm.write(f"trial {stale.number}: {reason}; its candidate is queued again")
                if "architecture" in stale.user_attrs:  # its record (maybe a "complete" one written before the kill)
                    write_record(
                        setup.run_dir, _failed_record(stale, reason, setup, stale.user_attrs["worker"], ended=False)
                    )
            trials = study.get_trials(deepcopy=False)
            if (reached := min(sum(reached_last_rung(t) for t in trials), setup.settings.n_trials)) != progress.n:
                progress.update(reached - progress.n)
            if _finished(trials, setup):
                break
            study.sampler = make_sampler(
                setup.sampler, sampler_seed(setup, len(trials), others_running(study, worker), worker)
            )
            trial = study.ask()
            try:
                with Heartbeat(setup.storage, trial_id(trial)):
                    trial.set_user_attr("worker", worker.id)
                    arch = suggest(trial, setup)
                    trial.set_user_attr("architecture", arch.as_dict())
                    if "proposed_by" not in frozen(study, trial).user_attrs:
                        trial.set_user_attr("proposed_by", "sampler")
                    reason = _rejection(study.get_trials(deepcopy=False), frozen(study, trial), setup)
                    if reason is not None:
                        trial.set_user_attr(REJECTED, reason)
                        study.tell(trial, state=TrialState.FAIL)
                        rejections_in_a_row += 1
                        if rejections_in_a_row >= REJECTIONS_BEFORE_FALLBACK:
                            rejections_in_a_row = 0
                            if not _queue_unevaluated(study, setup, trials) and not others_running(study, worker):
                                break
                        continue
                    rejections_in_a_row = 0
                    record = _run(study, trial, arch, setup, worker)
            except KeyboardInterrupt:
                _fail_interrupted(study, trial, setup, worker)
                raise
            failures_in_a_row = failures_in_a_row + 1 if record.state == FAILED else 0
            if failures_in_a_row >= setup.settings.max_failures_in_a_row:
                raise SlimnasError(
                    f"{failures_in_a_row} trials in a row failed, the last with: {record.fail_reason} "
                    f"(see {trial_dir(setup.run_dir, record.trial)}/record.json)"
                )
    finally:
        progress.close()
    for trial in others_running(study, worker):
        tqdm.write(
            f"note: trial {trial.number} is still running on worker {trial.user_attrs.get('worker')}: that worker "
            f"finishes it; if it dies, the next run of this command retries it (at once on the same host, "
            f"after {setup.storage.grace_period} s without heartbeat elsewhere)"
        )
    return study


def outcome(trial: FrozenTrial) -> str:
    """What became of a trial, in the words the summary and the report use."""
    if trial.state == TrialState.COMPLETE:
        return outcome_text(trial.user_attrs.get("state", COMPLETE), trial.user_attrs.get("stage", ""))
    if trial.state == TrialState.FAIL:
        if REJECTED in trial.user_attrs:
            return f"rejected ({trial.user_attrs[REJECTED].split(' of ')[0]})"
        return f"failed: {trial.user_attrs.get('fail_reason', 'unknown')}"
    return trial.state.name.lower()


def rank_agreement(trials: list[FrozenTrial], n_rungs: int) -> dict[int, tuple[float, int]]:
    """Spearman correlation of each earlier rung's quality with the last rung's, over the trials that reached it.

    How far the cheap early ranking predicts the final one: the evidence for stopping candidates early.
    """
    final = [t for t in trials if reached_last_rung(t)]
    agreement = {}
    for rung in range(n_rungs):
        last = f"rung_{n_rungs}"
        pairs = [(t.user_attrs[f"rung_{rung}"], t.user_attrs[last]) for t in final if f"rung_{rung}" in t.user_attrs]
        if len(pairs) >= 3:
            agreement[rung] = (float(spearmanr(*zip(*pairs, strict=True)).statistic), len(pairs))
    return agreement


def summary_lines(study: optuna.Study, setup: SearchSetup) -> list[str]:
    """Trials by state and by who proposed them, so a user sees at once that nothing was lost."""
    trials = study.get_trials(deepcopy=False)
    lines = [f"{n:>4}  {key}" for key, n in Counter(outcome(t) for t in trials).most_common()]
    evaluated = Counter(t.user_attrs.get("proposed_by", "sampler") for t in trials if REJECTED not in t.user_attrs)
    lines.append("      evaluated candidates proposed by: " + ", ".join(f"{k} {n}" for k, n in evaluated.most_common()))
    retried = [
        f"{t.number} (of {t.user_attrs['retry_of']})" for t in trials if t.user_attrs.get("retry_of") is not None
    ]
    if retried:
        lines.append(f"      retries of killed or interrupted trials: {', '.join(retried)}")
    for rung, (rho, n) in rank_agreement(trials, len(setup.rung_steps)).items():
        name = "zero-KD screen" if rung == 0 else f"rung {rung}"
        lines.append(f"      rank agreement of the {name} with the last rung: Spearman {rho:.2f} over {n} trials")
    return lines
