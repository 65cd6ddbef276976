import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState
from sqlalchemy.exc import SQLAlchemyError

from compress.arch import Architecture, param_count
from search.cli import main
from search.objectives import dominates, pareto_front

SPACE = [
    "search.space.hidden_size={choices:[48,64]}",
    "search.space.intermediate_size={choices:[48,64,80,96]}",
    "search.space.num_attention_heads={choices:[2,4]}",
    "search.space.num_key_value_heads={choices:[1,2]}",
    "search.space.num_hidden_layers={choices:[2,3,4]}",
]
FAST = [
    "data.seq_len=32", "importance.n_samples=16", "precision=fp32", "distill.batch_size=4", "distill.eval_rows=4",
    "search.fidelity.rung_tokens=[128,384]", "search.fidelity.min_peers=2", "search.zero_shot_candidates=3",
    "search.speed.prompt_len=16", "search.speed.new_tokens=4", "search.speed.repeats=1",
    "search.budget.params=0.7", "search.budget.window=0.3",
]  # fmt: skip


def search_args(teacher, run_dir, *extra):
    return ["search", f"teacher={teacher}", f"search.run_dir={run_dir}", *SPACE, *FAST, *extra]


def load(run_dir):
    return optuna.load_study(study_name="slimnas", storage=f"sqlite:///{run_dir / 'study.db'}")


def completed(study):
    return study.get_trials(states=(TrialState.COMPLETE,))


@pytest.fixture
def teacher(tmp_path):
    from conftest import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path / "teacher", max_position_embeddings=512)


def test_search_meets_constraints_and_reports_the_exact_pareto_front(teacher, tmp_path):
    run_dir = tmp_path / "run"
    assert main(search_args(teacher, run_dir, "search.n_trials=6", "search.sampler=tpe")) == 0
    study = load(run_dir)
    done = completed(study)
    assert len(done) == 6
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(teacher)
    target = 0.7 * param_count(config)
    for trial in done:
        arch = Architecture(**trial.params)
        assert abs(param_count(config, arch) - target) <= 0.3 * target
        assert trial.user_attrs["params"] == param_count(config, arch) == trial.values[1]
        # Rungs at 128 and 384 tokens (4 rows x 32 tokens a step): one KD run, continued past rung 1.
        stages = trial.user_attrs["stages"]
        assert trial.user_attrs["kd_tokens"] == 384 and stages["kd_1"]["tokens"] == 128 == stages["kd_2"]["tokens"] / 2
        assert all("heldout_kl" in stages[name] for name in ("screen", "kd_1", "kd_2"))
        kd_dir = run_dir / "trials" / f"{trial.number:04d}" / "kd"
        assert not (kd_dir / "train_state.pt").exists()  # no optimizer state left behind per trial
        metrics = (kd_dir / "metrics.jsonl").read_text().splitlines()
        assert [r["step"] for r in map(json.loads, metrics) if "heldout_kl" in r] == [0, 1, 3]
    # Pareto front, computed here independently: maximise quality, minimise params.
    expected = {
        t.number
        for t in done
        if not any(o.values[0] >= t.values[0] and o.values[1] <= t.values[1] and o.values != t.values for o in done)
    }
    reported = set(pd.read_csv(run_dir / "pareto.csv").trial)
    assert reported == expected
    references = {t.user_attrs.get("reference") for t in study.trials} - {None}
    assert "zero_shot" in references
    assert len({tuple(sorted(t.params.items())) for t in done}) == len(done)
    assert main(search_args(teacher, run_dir, "search.n_trials=6", "search.sampler=tpe")) == 0  # resume: no-op
    assert len(completed(load(run_dir))) == 6


def test_pareto_front_helper():
    points = {0: [1.0, 10.0], 1: [2.0, 20.0], 2: [0.5, 15.0], 3: [2.0, 20.0]}
    assert pareto_front(points, ["maximize", "minimize"]) == [0, 1, 3]
    assert dominates([2.0, 5.0], [1.0, 5.0], ["maximize", "minimize"])
    assert not dominates([2.0, 5.0], [2.0, 5.0], ["maximize", "minimize"])


def test_a_failing_trial_is_recorded_with_its_reason_and_the_search_completes(teacher, tmp_path, monkeypatch):
    import search.study

    real_run_trial = search.study.run_trial
    calls = {"n": 0}

    def flaky(context, source, arch, settings, trial_dir, promote, depth_strategy=None):
        if trial_dir.parent.name == "trials":
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("simulated out of memory")
        return real_run_trial(context, source, arch, settings, trial_dir, promote, depth_strategy)

    monkeypatch.setattr(search.study, "run_trial", flaky)
    run_dir = tmp_path / "run"
    assert main(search_args(teacher, run_dir, "search.n_trials=4", "search.sampler=random")) == 0
    study = load(run_dir)
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert len(failed) == 1 and failed[0].user_attrs["fail_reason"] == "RuntimeError: simulated out of memory"
    assert len(completed(study)) == 4
    trials = pd.read_csv(run_dir / "trials.csv")
    assert trials[trials.state == "FAIL"].fail_reason.tolist() == ["RuntimeError: simulated out of memory"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("search.budget.params=0.05", "budget unreachable"),
        ("search.space.hidden_size={choices:[1000]}", "invalid search space"),
        ("search.space.num_hidden_layers={choices:null,max_prune:1.5}", "invalid search space"),
        ("search.objectives=[speediness]", "unknown objective"),
        ("search.fidelity.rung_tokens=[128,200]", "at least one KD step (128 tokens)"),
    ],
)
def test_invalid_space_or_unreachable_budget_writes_nothing(teacher, tmp_path, capsys, override, message):
    run_dir = tmp_path / "run"
    assert main(search_args(teacher, run_dir, override)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("slimnas: error:") and message in err
    assert not run_dir.exists()


def cli(*args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "search.cli", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_completed(run_dir, count, process, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run_dir / "study.db").exists():
            try:
                if len(completed(load(run_dir))) >= count:
                    return
            except (KeyError, SQLAlchemyError):
                pass  # the search is still creating the storage or the study
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.5)
    raise AssertionError("search made no progress")


def test_kill_9_then_the_same_command_resumes_to_n(teacher, tmp_path):
    run_dir = tmp_path / "run"
    args = search_args(
        teacher, run_dir, "search.n_trials=6", "search.sampler=random", "search.fidelity.rung_tokens=[512,2048]",
        "search.storage.heartbeat_interval=1", "search.storage.grace_period=2",
    )  # fmt: skip
    process = cli(*args)
    wait_for_completed(run_dir, 2, process)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    before = {t.number: t.values for t in completed(load(run_dir))}
    assert 2 <= len(before) < 6

    resumed = cli(*args)
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    study = load(run_dir)
    after = {t.number: t.values for t in completed(study)}
    assert len(after) >= 6 and all(after[n] == v for n, v in before.items())
    assert not study.get_trials(states=(TrialState.RUNNING,))


POSTGRES = os.environ.get("SLIMNAS_TEST_POSTGRES_URL")


@pytest.mark.parametrize(
    "backend",
    ["sqlite", pytest.param("postgresql", marks=pytest.mark.skipif(not POSTGRES, reason="no PostgreSQL server"))],
)
def test_two_processes_share_one_study_without_duplicates(teacher, tmp_path, backend):
    run_dir = tmp_path / "run"
    url = POSTGRES if backend == "postgresql" else f"sqlite:///{run_dir / 'study.db'}"
    study_name = f"two-workers-{tmp_path.name}"
    args = search_args(
        teacher, run_dir, "search.n_trials=6", "search.sampler=random",
        f"search.storage.url={url}", f"search.study_name={study_name}",
    )  # fmt: skip
    first, second = cli(*args), cli(*args)
    for process in (first, second):
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr
    done = optuna.load_study(study_name=study_name, storage=url).get_trials(states=(TrialState.COMPLETE,))
    assert len(done) >= 6
    assert len({tuple(sorted(t.params.items())) for t in done}) == len(done)


def test_ctrl_c_leaves_the_study_consistent(teacher, tmp_path):
    run_dir = tmp_path / "run"
    args = search_args(
        teacher, run_dir, "search.n_trials=6", "search.sampler=random", "search.fidelity.rung_tokens=[512,2048]"
    )
    process = cli(*args)
    wait_for_completed(run_dir, 1, process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "slimnas: interrupted; completed work is kept" in stderr
    study = load(run_dir)
    assert not study.get_trials(states=(TrialState.RUNNING,))
    assert all(t.user_attrs.get("fail_reason") == "interrupted" for t in study.get_trials(states=(TrialState.FAIL,)))
    assert len(completed(study)) >= 1
    assert set(pd.read_csv(run_dir / "trials.csv").trial) >= {t.number for t in completed(study)}
