"""Optuna storage, workers and recovery: a killed worker's trial is never lost.

The study lives in a SQLite file in the run directory by default, or in any RDB URL (PostgreSQL) for
many workers on many machines. Every trial records which worker runs it (host, boot id, pid and the
process's start time) and that worker sends heartbeats while it runs. A RUNNING trial is stale when its worker
is gone: at once when the worker ran on this host and its process no longer exists, or once its
heartbeat is older than the grace period (a worker on another host: Optuna's own
`optuna.storages.fail_stale_trials`, whose stale-trial callback, set on the storage, queues the candidate
again). A stale trial is marked failed and its candidate is queued again, so the next worker that looks
runs it.

SQLite has no row locks: now and then two workers can take the same queued trial; the later one to
finish is told the trial is already finished and drops its copy. PostgreSQL has no such race.
"""

import os
import socket
import threading
import time
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import optuna
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from slimnas.core.errors import SlimnasError, first_line

SETTINGS_KEY = "slimnas_settings_hash"  # the study's settings: other settings on the same study are refused
HARDWARE_KEY = "slimnas_hardware"  # where the study's timings were taken
RETRIED_ATTRS = ("architecture", "reference", "reference_note", "depth_strategy")  # what a retry keeps


def storage_url(url: str | None, run_dir: Path) -> str:
    return url or f"sqlite:///{(run_dir / 'study.db').resolve()}"


def open_storage(url: str, heartbeat_interval: int, grace_period: int, attempts: int = 5) -> RDBStorage:
    """Connect, creating the tables if needed; retried because workers starting together race to create them. A
    SQLite file's folder (the run directory) is made here, so a server that cannot be reached leaves nothing behind."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    for attempt in range(1, attempts + 1):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            try:
                return RDBStorage(
                    url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                    heartbeat_stale_trial_callback=requeue_stale,
                )  # fmt: skip
            except ImportError as error:  # no driver for this URL: retrying cannot help
                raise SlimnasError(f"cannot open study storage {url}: {error}") from error
            except Exception as error:  # sqlalchemy raises many types for bad URLs, races and dead servers
                if attempt == attempts:
                    raise SlimnasError(f"cannot open study storage {url}: {first_line(error)}") from error
                time.sleep(0.5 * attempt)
    raise AssertionError("unreachable")


def _refuse_other_settings(study: optuna.Study, settings_hash: str) -> None:
    existing = study.user_attrs.get(SETTINGS_KEY)
    if existing is not None and existing != settings_hash:
        raise SlimnasError(
            f"study '{study.study_name}' was created with other search settings: use another run_dir or study_name"
        )


def check_existing_study(storage: RDBStorage, name: str, settings_hash: str) -> None:
    """Before any compute: a study of this name made with other settings is refused."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        _refuse_other_settings(optuna.load_study(study_name=name, storage=storage), settings_hash)
    except KeyError:
        pass  # no such study yet


def open_study(storage: RDBStorage, name: str, directions: list[str], settings_hash: str) -> optuna.Study:
    """Create the study, or load it when the same command runs again (refusing other settings)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=storage, study_name=name, directions=directions, load_if_exists=True)
    _refuse_other_settings(study, settings_hash)
    if study.user_attrs.get(SETTINGS_KEY) is None:
        study.set_user_attr(SETTINGS_KEY, settings_hash)
    return study


def check_hardware(study: optuna.Study, hardware: dict, timings_rank: bool) -> None:
    """Timings rank candidates only when all were taken on one kind of machine: refuse to mix."""
    existing = study.user_attrs.get(HARDWARE_KEY)
    if existing is None:
        study.set_user_attr(HARDWARE_KEY, hardware)
    elif timings_rank and existing != hardware:
        raise SlimnasError(
            f"this study ranks by measured speed taken on {existing['name']} ({existing['threads']} threads); "
            f"this worker is {hardware['name']} ({hardware['threads']} threads): use a study of its own"
        )


# Optuna's storage internals, in one place: the study loop needs a trial's id (heartbeats) and its frozen state
# while it runs.


def dashboard_constraints(constraints: dict[str, float]) -> dict:
    """The system attribute optuna-dashboard (0.21) reads: the constraint values as a list, Optuna's older format.

    Optuna reads both formats as one set of constraints (a trial is feasible when every value is <= 0), so the
    copy changes no sampler's ranking; without it the dashboard would put stopped and screened-only trials on
    its Pareto front beside the candidates that reached the last rung."""
    return {"constraints": list(constraints.values())}


def set_constraints(study: optuna.Study, trial: optuna.Trial, constraints: dict[str, float]) -> None:
    """Optuna's named constraints of a running trial, and the list optuna-dashboard reads."""
    for name, value in constraints.items():
        trial.set_constraint(name, value)
    for key, value in dashboard_constraints(constraints).items():
        study._storage.set_trial_system_attr(trial._trial_id, key, value)


def trial_id(trial: optuna.Trial) -> int:
    return trial._trial_id


def frozen(study: optuna.Study, trial: optuna.Trial) -> FrozenTrial:
    return study._storage.get_trial(trial._trial_id)


def _process_start(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid").removeprefix("pid:[").removesuffix("]")
    except OSError:
        return ""


def _boot_id() -> str:
    """Distinct per boot of a machine: two machines (or containers) with one host name still differ."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
    except OSError:
        return ""


@dataclass(frozen=True)
class Worker:
    host: str  # host name / boot id / pid namespace: machines and containers may share a host name
    pid: int
    started: str  # the process's start time (clock ticks after boot): a reused pid is another process; "" unknown

    @classmethod
    def current(cls) -> "Worker":
        host = f"{socket.gethostname()}/{_boot_id()}/{_pid_namespace()}"
        return cls(host, os.getpid(), _process_start(os.getpid()) or "")

    @property
    def id(self) -> str:
        return f"{self.host}:{self.pid}:{self.started}"

    @classmethod
    def parse(cls, text: str) -> "Worker":
        host, pid, started = text.rsplit(":", 2)
        return cls(host, int(pid), started)

    def gone(self) -> bool:
        """True when this worker ran here and its process no longer exists. Where start times cannot be read (no
        /proc) nothing is known: not gone, and the heartbeat's grace period decides instead."""
        if self.host != Worker.current().host or not self.started:
            return False
        return _process_start(self.pid) != self.started


class Heartbeat:
    """Records the trial's heartbeat every interval while the block runs."""

    def __init__(self, storage: RDBStorage, trial_id: int):
        self.storage, self.trial_id, self.stop = storage, trial_id, threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while True:
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception:  # a dropped connection must not kill the trial; the next beat retries
                pass
            if self.stop.wait(self.storage.heartbeat_interval):
                return

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def retry(study: optuna.Study, failed: FrozenTrial) -> None:
    """Queue the failed trial's candidate again, keeping what it was (a reference) but none of its results."""
    attrs = {key: failed.user_attrs[key] for key in RETRIED_ATTRS if key in failed.user_attrs}
    attrs |= {"retry_of": failed.number, "proposed_by": "retry"}
    study.enqueue_trial(failed.params, user_attrs=attrs, skip_if_exists=False)


UNCLAIMED_SECONDS = 60  # a RUNNING trial with no worker recorded this long after it started was killed in ask()
SILENT = "its worker stopped sending heartbeats"  # the failure Optuna's stale-trial check leaves without a reason


def requeue_stale(study: optuna.Study, trial: FrozenTrial) -> None:
    """The storage's heartbeat_stale_trial_callback: optuna.storages.fail_stale_trials failed this trial of a silent
    worker; its candidate is queued again."""
    if trial.params:
        retry(study, trial)


def _dead_here(trial: FrozenTrial) -> str | None:
    """Why a RUNNING trial's worker is known dead without waiting for the heartbeat's grace period, or None."""
    worker = trial.user_attrs.get("worker")
    if worker is not None and Worker.parse(worker).gone():
        return f"worker {worker} died"
    if worker is None and trial.datetime_start is not None:
        if (datetime.now() - trial.datetime_start).total_seconds() > UNCLAIMED_SECONDS:
            return "its worker died while asking the sampler"
    return None


def recover_stale_trials(study: optuna.Study, storage: RDBStorage) -> list[tuple[FrozenTrial, str]]:
    """Fail every RUNNING trial whose worker is gone and queue its candidate again; returns (trial, reason).

    A worker that died on this host is seen at once; one on another host when its heartbeat is older than the
    grace period (Optuna's check, whose callback queues the candidate again)."""
    recovered = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        reason = _dead_here(trial)
        if reason is None:
            continue
        try:
            storage.set_trial_user_attr(trial._trial_id, "fail_reason", reason)
            storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker recovered it first
        failed = storage.get_trial(trial._trial_id)
        requeue_stale(study, failed)
        recovered.append((failed, reason))
    before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
    with warnings.catch_warnings():  # experimental since Optuna 2.9, and still the public call
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        if trial.number not in before and "fail_reason" not in trial.user_attrs:
            recovered.append((trial, f"{SILENT} for {storage.grace_period} s"))
    return recovered


def others_running(study: optuna.Study, me: Worker) -> list[FrozenTrial]:
    return [
        t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if t.user_attrs.get("worker") != me.id
    ]
