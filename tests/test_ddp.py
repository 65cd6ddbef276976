"""Data-parallel retraining under torchrun (gloo on CPU): one-process loss curve, rank-0 writes, any-count resume."""

import json
import os
import signal

import pytest
import torch
from conftest import SlimnasProcess, wait_until
from safetensors.torch import load_file
from test_retrain import RETRAIN, copy_run, searched  # noqa: F401 (the module's finished search, as a fixture)

from slimnas.cli import main

SETTINGS = [*RETRAIN, "retrain.references=false", "retrain.budget_tokens=2048", "distill.save_every=2"]


def torchrun(nproc: int, *args: str) -> SlimnasProcess:
    """`torchrun --standalone --nproc_per_node=N -m slimnas.cli ARGS` (one thread per rank: 2 cores here)."""
    launcher = ("-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}")
    return SlimnasProcess(*args, launcher=launcher, env={"OMP_NUM_THREADS": "1"})


def losses(run_dir, name: str) -> list[float]:
    lines = (run_dir / "retrain" / name / "kd" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["train_kl"] for line in lines if "train_kl" in line]


def candidate(run_dir) -> str:
    return next(p.parent.name for p in (run_dir / "retrain").glob("*/record.json") if p.parent.name != "teacher")


def test_two_processes_follow_the_one_process_loss_curve_at_the_same_global_batch(searched, tmp_path, monkeypatch):  # noqa: F811
    one = copy_run(searched, tmp_path / "one", monkeypatch)
    two = copy_run(searched, tmp_path / "two", monkeypatch)
    assert main(["retrain", str(one), *SETTINGS]) == 0
    returncode, output = torchrun(2, "retrain", str(two), *SETTINGS).finish()
    assert returncode == 0, output[-3000:]
    name = candidate(one)
    single, double = losses(one, name), losses(two, name)
    assert len(single) == len(double) == 2048 // (4 * 32)  # the same steps of the same global batch
    assert single == pytest.approx(double, rel=1e-3)  # the same loss curve, up to summation order
    a, b = (json.loads((run / "retrain" / name / "record.json").read_text())["heldout"] for run in (one, two))
    assert abs(a["kl"] - b["kl"]) < a["kl_stderr"]  # the same final KL within its error bar
    assert output.count("retrain: ") == 1  # rank 0 alone prints (and writes)


def test_a_killed_two_process_retrain_resumes_in_one_process(searched, tmp_path, monkeypatch):  # noqa: F811
    straight = copy_run(searched, tmp_path / "a", monkeypatch)
    resumed = copy_run(searched, tmp_path / "b", monkeypatch)
    assert main(["retrain", str(straight), *SETTINGS]) == 0
    name = candidate(straight)
    state = resumed / "retrain" / name / "kd" / "train_state.safetensors"
    run = torchrun(2, "retrain", str(resumed), *SETTINGS)
    wait_until(state.exists, run, what="the two-process retrain never wrote a checkpoint")
    os.killpg(run.pid, signal.SIGKILL)  # torchrun and both ranks
    run.finish()
    assert not (resumed / "retrain" / name / "record.json").exists()
    assert main(["retrain", str(resumed), *SETTINGS]) == 0  # one process takes it up from the two-process state
    expected = load_file(straight / "retrain" / name / "model" / "model.safetensors")
    actual = load_file(resumed / "retrain" / name / "model" / "model.safetensors")
    assert all(torch.allclose(expected[k], actual[k], atol=1e-4) for k in expected)


def test_a_batch_that_does_not_split_over_the_processes_is_one_line(searched, tmp_path, monkeypatch):  # noqa: F811
    run_dir = copy_run(searched, tmp_path / "c", monkeypatch)
    returncode, output = torchrun(2, "retrain", str(run_dir), *SETTINGS, "distill.batch_size=3").finish()
    assert returncode != 0 and "does not split evenly over 2 processes" in output
