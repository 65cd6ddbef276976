"""Killed and interrupted workers lose nothing, with the default heartbeat settings."""

import os
import signal

import pytest
from conftest import load_study, reached_last_rung, search_args, slimnas_process, wait_until
from optuna.trial import TrialState

from slimnas.core.rundir import read_records
from slimnas.search.race import rung_key

SLOW_RUNGS = "search.race.rung_tokens=[1024,32768]"  # seconds of KD after the first rung: caught mid-KD
SHORTER_RUNGS = "search.race.rung_tokens=[1024,4096]"  # four workers on the cores; holds if the victim ends early
POSTGRES = os.environ.get("SLIMNAS_TEST_POSTGRES_URL")


def mid_kd(study):
    """A trial past its screen and not finished: accepted, running, with work to lose."""
    return [t for t in study.get_trials(states=(TrialState.RUNNING,)) if rung_key(0) in t.user_attrs]


def ran(study) -> list:
    """Trials that ran a candidate to completion (not the screened candidates told to the sampler)."""
    return [t for t in study.get_trials(states=(TrialState.COMPLETE,)) if t.user_attrs.get("state") != "screened"]


def candidate(trial) -> tuple:
    return tuple(sorted(trial.user_attrs["architecture"].items())), trial.user_attrs.get("depth_strategy")


def test_kill_9_then_the_same_command_completes_the_killed_candidate(search_teacher, tmp_path):
    run_dir = tmp_path / "run"
    args = search_args(search_teacher, run_dir, "search.n_trials=5", "search/sampler=random", SLOW_RUNGS)
    process = slimnas_process(*args)
    wait_until(lambda: mid_kd(load_study(run_dir)), process)
    os.kill(process.pid, signal.SIGKILL)  # at once: the trial just seen is mid-KD for seconds yet
    process.finish()
    left_running = load_study(run_dir).get_trials(states=(TrialState.RUNNING,))
    assert len(left_running) == 1 and "architecture" in left_running[0].user_attrs
    killed = left_running[0]  # what the kill interrupted (the trial seen, unless it finished in between)
    before = {t.number: t.values for t in reached_last_rung(load_study(run_dir))}

    rerun = slimnas_process(*args)  # the default grace period: the dead worker is seen at once on this host
    returncode, output = rerun.finish()
    assert returncode == 0, output
    study = load_study(run_dir)
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
    after = {t.number: t.values for t in reached_last_rung(study)}
    assert len(after) >= 5 and all(after[n] == v for n, v in before.items())
    failed = study.trials[killed.number]
    assert failed.state == TrialState.FAIL and "died" in failed.user_attrs["fail_reason"]
    retries = [t for t in study.trials if t.user_attrs.get("retry_of") == killed.number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    same = [t for t in ran(study) if candidate(t) == candidate(killed)]
    assert len(same) == 1  # completed exactly once
    references = [t for t in study.trials if t.user_attrs.get("reference")]
    assert references and all(any(candidate(c) == candidate(r) for c in ran(study)) for r in references)
    assert f"trial {killed.number}: worker" in output and "queued again" in output


@pytest.mark.skipif(not POSTGRES, reason="no PostgreSQL server (tests/with_services.sh starts one)")
def test_four_workers_on_postgresql_one_killed_lose_nothing(search_teacher, tmp_path):
    run_dir = tmp_path / "run"
    name = f"four-{tmp_path.name}"
    args = search_args(
        search_teacher, run_dir, "search.n_trials=8", "search/sampler=random", SHORTER_RUNGS,
        f"search.storage.url={POSTGRES}", f"search.study_name={name}",
    )  # fmt: skip
    workers = [slimnas_process(*args) for _ in range(4)]
    caught = []
    wait_until(lambda: caught.extend(mid_kd(load_study(run_dir, name, POSTGRES))) or caught, workers[0])
    victim_trial = caught[0]
    victim = next(w for w in workers if w.pid == int(victim_trial.user_attrs["worker"].split(":")[1]))
    os.kill(victim.pid, signal.SIGKILL)
    victim.finish()
    before = {t.number: t.values for t in reached_last_rung(load_study(run_dir, name, POSTGRES))}
    for worker in workers:
        if worker is not victim:
            returncode, output = worker.finish()
            assert returncode == 0, output
    study = load_study(run_dir, name, POSTGRES)
    done = reached_last_rung(study)
    complete = ran(study)
    assert len(done) >= 8 and all(study.trials[n].values == v for n, v in before.items())  # none lost or changed
    assert len({candidate(t) for t in complete}) == len(complete)  # no candidate evaluated twice
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
    assert any(candidate(t) == candidate(victim_trial) for t in complete)  # the killed one was finished by others


@pytest.mark.parametrize(
    "backend",
    ["sqlite", pytest.param("postgresql", marks=pytest.mark.skipif(not POSTGRES, reason="no PostgreSQL server"))],
)
def test_two_processes_share_one_study_without_duplicates(search_teacher, tmp_path, backend):
    run_dir = tmp_path / "run"
    url = POSTGRES if backend == "postgresql" else f"sqlite:///{run_dir / 'study.db'}"
    name = f"two-{tmp_path.name}"
    args = search_args(
        search_teacher, run_dir, "search.n_trials=6", "search/sampler=random",
        f"search.storage.url={url}", f"search.study_name={name}",
    )  # fmt: skip
    first, second = slimnas_process(*args), slimnas_process(*args)
    for process in (first, second):
        returncode, output = process.finish()
        assert returncode == 0, output
    study = load_study(run_dir, name, url)
    complete = ran(study)
    assert len(reached_last_rung(study)) >= 6
    assert len({candidate(t) for t in complete}) == len(complete)


def test_ctrl_c_keeps_the_study_consistent_and_the_rerun_finishes_the_candidate(search_teacher, tmp_path):
    run_dir = tmp_path / "run"
    args = search_args(search_teacher, run_dir, "search.n_trials=4", "search/sampler=random", SLOW_RUNGS)
    process = slimnas_process(*args)
    wait_until(lambda: mid_kd(load_study(run_dir)), process)
    os.kill(process.pid, signal.SIGINT)
    returncode, output = process.finish(timeout=120)
    assert returncode == 130, output
    assert "slimnas: interrupted; completed work is kept" in output
    study = load_study(run_dir)
    assert not study.get_trials(states=(TrialState.RUNNING,))
    interrupted = [t for t in study.get_trials(states=(TrialState.FAIL,)) if t.user_attrs.get("fail_reason")]
    assert [t.user_attrs["fail_reason"] for t in interrupted] == ["interrupted"]
    assert study.get_trials(states=(TrialState.WAITING,))  # its candidate is queued for the next run
    records = {r.trial: r for r in read_records(run_dir)}
    assert records[interrupted[0].number].fail_reason == "interrupted"
    returncode, output = slimnas_process(*args).finish()
    assert returncode == 0, output
    study = load_study(run_dir)
    retry = [t for t in study.trials if t.user_attrs.get("retry_of") == interrupted[0].number]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE


def test_a_study_ranked_by_timings_refuses_workers_on_other_hardware():
    import optuna

    from slimnas.core.errors import SlimnasError
    from slimnas.search.storage import check_hardware

    study = optuna.create_study(directions=["maximize", "minimize"])
    here, elsewhere = {"name": "cpu-a", "threads": 2}, {"name": "cpu-b", "threads": 16}
    check_hardware(study, here, timings_rank=True)  # the first worker sets the study's hardware
    check_hardware(study, here, timings_rank=True)
    check_hardware(study, elsewhere, timings_rank=False)  # no timing ranks candidates: any machine may join
    with pytest.raises(SlimnasError, match="ranks by measured speed taken on cpu-a"):
        check_hardware(study, elsewhere, timings_rank=True)


def test_a_worker_whose_start_time_is_unknown_is_not_declared_dead(monkeypatch):
    """Without /proc the start time cannot be read: such a worker is left to the heartbeat, never called dead."""
    import slimnas.search.storage as storage

    here = storage.Worker.current()
    assert here.host.count("/") == 2  # host name / boot id / pid namespace: one host name on two machines differs
    assert not storage.Worker(here.host, 999_999, "").gone()  # unknown start time: unknown, not dead
    assert storage.Worker(here.host, 999_999, "123").gone()  # known start, no such process here: dead
    assert not storage.Worker("elsewhere/boot/ns", 999_999, "123").gone()  # another machine: the heartbeat decides
    monkeypatch.setattr(storage, "_process_start", lambda pid: None)  # a host without /proc
    assert storage.Worker.current().started == "" and not storage.Worker.current().gone()


def test_a_queued_trial_without_a_worker_is_recovered_without_error(search_teacher, tmp_path, monkeypatch):
    """A trial taken from the queue whose worker died inside ask() has an architecture but no worker attribute."""
    import datetime

    import optuna

    import slimnas.search.storage as storage
    from slimnas.cli import main

    run_dir = tmp_path / "run"
    assert main(search_args(search_teacher, run_dir, "search.n_trials=2")) == 0
    study = load_study(run_dir)
    study.enqueue_trial(study.trials[0].params, user_attrs={"architecture": study.trials[0].user_attrs["architecture"]})
    orphan = study.ask()  # RUNNING, no worker: as if its worker died in ask()
    later = datetime.datetime.now() + datetime.timedelta(seconds=storage.UNCLAIMED_SECONDS + 5)
    monkeypatch.setattr(storage, "datetime", type("clock", (), {"now": staticmethod(lambda: later)}))
    assert main(search_args(search_teacher, run_dir, "search.n_trials=3")) == 0
    recovered = optuna.load_study(study_name="slimnas", storage=f"sqlite:///{run_dir / 'study.db'}").trials[
        orphan.number
    ]
    assert recovered.state == TrialState.FAIL and "died while asking" in recovered.user_attrs["fail_reason"]
    assert {r.trial: r for r in read_records(run_dir)}[orphan.number].worker == ""


def test_a_trial_finished_by_another_worker_is_dropped_without_a_traceback(search_teacher, tmp_path, monkeypatch):
    """SQLite can hand one queued trial to two workers: the second to finish drops its copy and carries on."""
    import optuna

    import slimnas.search.study as study_module
    from slimnas.cli import main

    real_run_trial, calls = study_module.run_trial, {"n": 0}

    def finished_elsewhere(setup, number, arch, race, attrs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise optuna.exceptions.UpdateFinishedTrialError("finished by another worker")
        return real_run_trial(setup, number, arch, race, attrs)

    monkeypatch.setattr(study_module, "run_trial", finished_elsewhere)
    run_dir = tmp_path / "run"
    assert main(search_args(search_teacher, run_dir, "search.n_trials=3")) == 0
    assert not any(r.state == "failed" for r in read_records(run_dir))
