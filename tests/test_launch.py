"""Search workers started through Hydra's launcher plugins, joining one PostgreSQL study."""

import os
import signal
import time

import pytest
from conftest import load_study, reached_last_rung, search_args, slimnas_process, wait_until
from optuna.trial import TrialState
from test_search_recovery import POSTGRES, SHORTER_RUNGS, candidate, mid_kd, ran

from slimnas.cli import main

pytestmark = pytest.mark.skipif(not POSTGRES, reason="no PostgreSQL server")


def worker_logs(run_dir) -> str:
    """What submitit's local jobs printed (joblib's workers print to the parent's output)."""
    return "".join(p.read_text(errors="replace") for p in run_dir.glob(".submitit/**/*.out"))


def check_study(run_dir, name, n_trials):
    study = load_study(run_dir, name, POSTGRES)
    complete = ran(study)
    assert len(reached_last_rung(study)) >= n_trials
    assert len({candidate(t) for t in complete}) == len(complete)  # no candidate run twice
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))  # none left behind
    return study, complete


def test_four_joblib_workers_share_one_study_and_compute_each_cache_once(search_teacher, tmp_path):
    run_dir, name = tmp_path / "run", f"joblib-{tmp_path.name}"
    args = search_args(
        search_teacher, run_dir, "search.n_trials=8", "search/sampler=random", SHORTER_RUNGS, "search.workers=4",
        f"search.storage.url={POSTGRES}", f"search.study_name={name}", "search.measure_speed=false",
    )  # fmt: skip
    returncode, output = slimnas_process(*args).finish()
    assert returncode == 0, output[-3000:]
    assert "starting 4 search workers through hydra/launcher=joblib" in output
    _, complete = check_study(run_dir, name, 8)
    workers = {t.user_attrs["worker"] for t in complete}
    assert len(workers) > 1  # the trials were shared out among processes
    assert output.count("importance: computing") == 1  # computed by one worker, read by the others
    screened = [line for line in (run_dir / "screen.jsonl").read_text().splitlines() if line]
    assert len(screened) == len(set(screened))  # every candidate screened once
    assert (run_dir / "multirun.yaml").is_file()  # Hydra's record of the sweep


def test_four_submitit_local_workers_recover_one_killed_mid_kd(search_teacher, tmp_path):
    run_dir, name = tmp_path / "run", f"submitit-{tmp_path.name}"
    args = search_args(
        search_teacher, run_dir, "search.n_trials=8", "search/sampler=random", SHORTER_RUNGS, "search.workers=4",
        "hydra/launcher=submitit_local", f"search.storage.url={POSTGRES}", f"search.study_name={name}",
        "search.measure_speed=false",
    )  # fmt: skip
    parent = slimnas_process(*args)
    caught = []
    wait_until(lambda: caught.extend(mid_kd(load_study(run_dir, name, POSTGRES))) or caught, parent, timeout=600)
    victim = caught[0]
    os.kill(int(victim.user_attrs["worker"].split(":")[1]), signal.SIGKILL)
    returncode, output = parent.finish()
    assert returncode in (0, 2), output[-3000:]  # 2: it saw the killed job, and says to rerun
    if returncode == 2:
        assert "rerun the same command" in output
    deadline = time.time() + 600  # survivors the parent stopped waiting for may still be finishing the study
    while time.time() < deadline:
        study = load_study(run_dir, name, POSTGRES)
        if len(reached_last_rung(study)) >= 8 and not study.get_trials(states=(TrialState.RUNNING,)):
            break
        time.sleep(1)
    study, complete = check_study(run_dir, name, 8)
    assert any(candidate(t) == candidate(victim) for t in complete)  # the killed one was finished by the others
    assert worker_logs(run_dir).count("importance: computing") == 1
    assert study.trials[victim.number].state == TrialState.FAIL


def test_sqlite_is_refused_for_workers_on_other_machines(search_teacher, tmp_path, capsys):
    args = search_args(search_teacher, tmp_path / "run", "search.workers=2", "hydra/launcher=submitit_slurm")
    assert main(args) == 2
    assert "SQLite" in capsys.readouterr().err and not (tmp_path / "run").exists()
