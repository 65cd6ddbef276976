"""Data-parallel retraining under torchrun (gloo on CPU): one-process loss curve, rank-0 writes, any-count resume."""

import faulthandler
import json
import os
import signal
import socket
import time

import pytest
import torch
from conftest import SlimnasProcess, wait_until
from safetensors.torch import load_file
from test_retrain import RETRAIN, copy_run, searched  # noqa: F401 (the module's finished search, as a fixture)
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from slimnas.cli import main
from slimnas.compress.distill import HiddenStateMatch
from slimnas.core import distributed

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
    """... and rank 0 scores after the other rank left: scoring longer than the process group's timeout is fine."""
    one = copy_run(searched, tmp_path / "one", monkeypatch)
    two = copy_run(searched, tmp_path / "two", monkeypatch)
    assert main(["retrain", str(one), *SETTINGS]) == 0
    timeout = 4  # seconds; rank 0's scoring (held-out, speed, memory in a fresh process each) takes longer
    returncode, output = torchrun(2, "retrain", str(two), *SETTINGS, f"retrain.ddp_timeout_s={timeout}").finish()
    assert returncode == 0, output[-3000:]
    name = candidate(one)
    single, double = losses(one, name), losses(two, name)
    assert len(single) == len(double) == 2048 // (4 * 32)  # the same steps of the same global batch
    assert single == pytest.approx(double, rel=1e-3)  # the same loss curve, up to summation order
    records = [{r: json.loads((run / "retrain" / r / "record.json").read_text()) for r in ("teacher", name)}
               for run in (one, two)]  # fmt: skip
    scoring = sum(v for r in records[1].values() for k, v in r["seconds"].items() if k != "kd")
    assert scoring > timeout  # rank 0 alone scored for longer than any collective may wait
    a, b = (r[name]["heldout"] for r in records)
    assert abs(a["kl"] - b["kl"]) < a["kl_stderr"]  # the same final KL within its error bar
    before = [r[name]["kd"]["initial"]["kl"] for r in records]  # the same student before KD, the KD run's record
    assert before[0] == pytest.approx(before[1], rel=1e-5) and before[0] > 0
    assert records[1][name]["kd"]["final"]["kl"] == pytest.approx(b["kl"], rel=1e-5)  # the KD run's own numbers
    assert records[1][name]["kd"]["tokens_per_second"] > 0  # not the reload's (nothing trained after the others left)
    assert records[0]["teacher"]["heldout"] == records[1]["teacher"]["heldout"]
    assert output.count("retrain: ") == 1  # rank 0 alone prints (and writes)


class MatchLoss(nn.Module):
    """The hidden-state loss as a module, so DistributedDataParallel averages its maps' gradients over the ranks."""

    def __init__(self, match: HiddenStateMatch):
        super().__init__()
        self.match, self.maps = match, match.maps

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return self.match.loss({0: student}, {0: teacher})


def hidden_case() -> tuple[HiddenStateMatch, torch.Tensor, torch.Tensor]:
    """A global batch of 4 rows whose teacher states are 10 times larger in rows 1 and 3 (rank 1's share)."""
    torch.manual_seed(0)
    match = HiddenStateMatch.build((0,), [0], [0, 2, 3], teacher_hidden=4)
    with torch.no_grad():
        match.maps[0].weight.add_(0.3 * torch.randn_like(match.maps[0].weight))
    scale = torch.tensor([1.0, 10.0, 1.0, 10.0])[:, None, None]
    return match, torch.randn(4, 5, 3), scale * torch.randn(4, 5, 4)


def hidden_rank(rank: int, port: int, out: str) -> None:
    """One of two ranks: its share of the global batch through DistributedDataParallel (gloo). A rank still alive
    after 120 s (a rendezvous or an exit that never ends) prints its stack and exits: the test fails and says where."""
    faulthandler.dump_traceback_later(120, exit=True)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    distributed.init(60)
    match, student, teacher = hidden_case()
    rows = distributed.share(torch.arange(len(student)))
    model = DistributedDataParallel(MatchLoss(match))  # kept: its hooks average the gradient in backward
    loss = model(student[rows], teacher[rows])
    loss.backward()
    mean_loss = distributed.mean(loss)
    del model, loss  # DistributedDataParallel's reducer goes while its process group lives: rank 1 once hung in
    # its teardown after the group was destroyed (a full suite on 2026-12-04; faulthandler showed only frame teardown)
    if distributed.leave():
        torch.save({"loss": mean_loss, "grad": match.maps[0].weight.grad}, out)
    os._exit(0)  # the result is written: no interpreter teardown, where the hang was, can fail the test


def test_the_hidden_state_loss_over_two_ranks_is_the_one_process_loss_of_the_global_batch(tmp_path):
    match, student, teacher = hidden_case()
    single = match.loss({0: student}, {0: teacher})
    single.backward()
    per_share = [match.loss({0: student[r::2]}, {0: teacher[r::2]}) for r in range(2)]  # each normalised alone
    assert abs(sum(per_share).item() / 2 - single.item()) > 0.1 * single.item()  # a case that tells them apart
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ranks = torch.multiprocessing.spawn(hidden_rank, args=(port, str(tmp_path / "rank0.pt")), nprocs=2, join=False)
    deadline = time.monotonic() + 180  # a rank that never starts its function is not covered by its own watchdog
    while not ranks.join(timeout=1):
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail("the two ranks ran past 180 s (their stacks, if they got as far, are above)")
    two = torch.load(tmp_path / "rank0.pt")
    assert two["loss"].item() == pytest.approx(single.item(), rel=1e-6)
    assert torch.allclose(two["grad"], match.maps[0].weight.grad, rtol=1e-5, atol=1e-7)


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
