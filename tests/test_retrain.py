"""slimnas retrain on a tiny teacher: fair full distillation, resumable per candidate, HF checkpoints."""

import json
import os
import shutil
import signal

import pytest
import torch
from conftest import save_tiny_checkpoint, search_args, slimnas_process, wait_until
from huggingface_hub import ModelCard
from omegaconf import OmegaConf
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from slimnas.bench.quality import pool
from slimnas.cli import main
from slimnas.config import compose
from slimnas.core.errors import SlimnasError
from slimnas.core.rundir import read_records, read_retrained
from slimnas.recipes.retrain import choose_candidates, effective_config

RETRAIN = [
    "precision=fp32", "distill.batch_size=4", "distill.eval_every=64", "distill.save_every=16",
    "quality.tasks=[]", "speed.prompt_len=16", "speed.new_tokens=4", "speed.repeats=2", "retrain.new_tokens=4",
    "retrain.top_k=1",
]  # fmt: skip


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """A finished 3-trial search, copied by each test that retrains it."""
    root = tmp_path_factory.mktemp("retrain")
    teacher = save_tiny_checkpoint(root / "teacher", max_position_embeddings=512)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLIMNAS_CACHE", str(root / "cache"))
        args = search_args(teacher, root / "run", "search.n_trials=3", "search.measure_speed=false")
        assert main(args) == 0
    return root


def copy_run(searched, tmp_path, monkeypatch):
    shutil.copytree(searched / "run", tmp_path / "run")
    monkeypatch.setenv("SLIMNAS_CACHE", str(searched / "cache"))
    return tmp_path / "run"


def test_retrain_gives_every_candidate_the_same_budget_and_a_loadable_checkpoint(searched, tmp_path, monkeypatch):
    run_dir = copy_run(searched, tmp_path, monkeypatch)
    assert main(["retrain", str(run_dir), *RETRAIN, "retrain.budget_tokens=1024"]) == 0
    retrained = {r.name: r for r in read_retrained(run_dir)}
    records = {r.trial: r for r in read_records(run_dir)}
    references = {n for n, r in records.items() if r.reference and r.state == "complete"}
    candidates = [r for name, r in retrained.items() if name != "teacher"]
    assert {r.trial for r in candidates} >= references and len(candidates) == len(references | {candidates[0].trial})
    assert {r.kd_tokens for r in candidates} == {1024} and retrained["teacher"].kd_tokens == 0
    for record in candidates:
        model = AutoModelForCausalLM.from_pretrained(record.model_dir)
        assert model.config.num_hidden_layers == record.architecture["num_hidden_layers"]
        assert record.heldout["split"] == "evaluation" and record.heldout["kl_stderr"] > 0
        assert record.kd["final"]["kl"] == pytest.approx(record.heldout["kl"], rel=1e-5)
        assert record.memory["peak_bytes"] > 0 and record.speed["decode_speedup"] > 0
        assert len(record.generations) == 3 and all(g["text"] for g in record.generations)
        card = ModelCard.load(run_dir / "retrain" / record.name / "model" / "README.md")  # huggingface_hub parses it
        assert record.label in card.text and "KD tokens" in card.text and record.command in card.text
        results = {(r.dataset_type, r.metric_type): r for r in card.data.eval_results}
        kl = results[("slimnas-heldout", "kl_divergence")]
        assert kl.metric_value == pytest.approx(record.heldout["kl"], abs=1e-4) and "evaluation" in kl.dataset_split
        assert card.data.base_model is None  # a local teacher is no hub id: left out (its name is in the text)
        assert "1. a local checkpoint, teacher" in card.text and f"{record.kd_tokens:,} KD tokens" in card.text
        assert card.data.slimnas["kd_tokens"] == 1024 and card.data.slimnas["architecture"] == record.architecture
        assert not (run_dir / "retrain" / record.name / "kd" / "train_state.safetensors").exists()
        slimnas = json.loads((run_dir / "retrain" / record.name / "model" / "slimnas.json").read_text())
        assert slimnas["plan"] == records[record.trial].plan  # re-pruned exactly as searched
        assert slimnas["teacher"] == str(searched / "teacher")  # what it was made from: a later card's lineage


def test_kill_9_mid_candidate_then_rerun_gives_the_weights_of_an_uninterrupted_run(searched, tmp_path, monkeypatch):
    straight = copy_run(searched, tmp_path / "a", monkeypatch)
    resumed = copy_run(searched, tmp_path / "b", monkeypatch)
    settings = [*RETRAIN, "retrain.budget_tokens=49152"]
    assert main(["retrain", str(straight), *settings]) == 0

    process = slimnas_process("retrain", str(resumed), *settings)
    order = choose_candidates(straight, top_k=1, references=True)
    first, second = (f"{c.trial:04d}" for c in order[:2])

    def mid_second_candidate():
        state = resumed / "retrain" / second / "kd" / "train_state.safetensors"
        return (resumed / "retrain" / first / "record.json").exists() and state.exists()

    wait_until(mid_second_candidate, process, what="retrain never reached its second candidate")
    os.kill(process.pid, signal.SIGKILL)
    process.finish()
    finished = (resumed / "retrain" / first / "record.json").read_text()
    finished_mtime = (resumed / "retrain" / first / "model" / "model.safetensors").stat().st_mtime
    assert not (resumed / "retrain" / second / "record.json").exists()

    returncode, output = slimnas_process("retrain", str(resumed), *settings).finish()
    assert returncode == 0, output
    assert "retrained before, kept" in output
    assert (resumed / "retrain" / first / "record.json").read_text() == finished
    assert (resumed / "retrain" / first / "model" / "model.safetensors").stat().st_mtime == finished_mtime
    expected = load_file(straight / "retrain" / second / "model" / "model.safetensors")
    actual = load_file(resumed / "retrain" / second / "model" / "model.safetensors")
    assert expected.keys() == actual.keys() and all((expected[k] == actual[k]).all() for k in expected)


@pytest.mark.parametrize(
    "setup, message",
    [
        ("not_a_run", "is not a slimnas run directory"),
        ("no_trials", "no trial that reached the last rung"),
        ("corrupt", "corrupt JSON file"),
        ("other_pools", "quality.seed=1 draws other pools than the search's (quality.seed=0)"),
        ("smaller_selection", "quality.selection_share=0.2 is below the search's (0.3)"),
    ],
)
def test_bad_input_is_one_line_and_overwrites_nothing(searched, tmp_path, monkeypatch, capsys, setup, message):
    run_dir = copy_run(searched, tmp_path, monkeypatch)
    extra = []
    if setup == "not_a_run":
        run_dir = tmp_path / "elsewhere"
        run_dir.mkdir()
    elif setup == "no_trials":
        shutil.rmtree(run_dir / "trials")
    elif setup == "other_pools":  # the evaluation pool would overlap the selection pool the search chose on
        extra = ["quality.seed=1"]
    elif setup == "smaller_selection":
        extra = ["quality.selection_share=0.2"]
    else:
        next((run_dir / "trials").glob("*/record.json")).write_text("{not json")
    assert main(["retrain", str(run_dir), *RETRAIN, *extra]) == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (run_dir / "retrain").exists()


def test_a_top_k_larger_than_the_front_is_clamped_with_a_message(searched, tmp_path, monkeypatch, capsys):
    run_dir = copy_run(searched, tmp_path, monkeypatch)
    front = json.loads((run_dir / "front.json").read_text())["trials"]
    chosen = choose_candidates(run_dir, top_k=99, references=False)
    assert len(chosen) == len(front) and f"retrain.top_k=99 but the front has {len(front)}" in capsys.readouterr().out


def test_a_stale_retrain_record_is_refused_before_any_compute(searched, tmp_path, monkeypatch, capsys):
    run_dir = copy_run(searched, tmp_path, monkeypatch)
    assert main(["retrain", str(run_dir), *RETRAIN, "retrain.budget_tokens=512", "retrain.references=false"]) == 0
    before = {p: p.stat().st_mtime for p in (run_dir / "retrain").rglob("record.json")}
    assert main(["retrain", str(run_dir), *RETRAIN, "retrain.budget_tokens=1024", "retrain.references=false"]) == 2
    assert "was retrained with other settings" in capsys.readouterr().err.strip().splitlines()[-1]
    assert {p: p.stat().st_mtime for p in (run_dir / "retrain").rglob("record.json")} == before
    assert main(["retrain", str(run_dir), *RETRAIN, "retrain.budget_tokens=512", "retrain.references=false"]) == 0
    assert "retrained before, kept" in capsys.readouterr().out  # the same settings: reused


def test_each_candidate_retrained_in_its_own_launcher_job_gives_the_same_weights(searched, tmp_path, monkeypatch):
    together = copy_run(searched, tmp_path / "a", monkeypatch)
    apart = copy_run(searched, tmp_path / "b", monkeypatch)
    settings = [*RETRAIN, "retrain.budget_tokens=512"]
    assert main(["retrain", str(together), *settings]) == 0
    returncode, output = slimnas_process("retrain", str(apart), *settings, "retrain.jobs=true").finish()
    assert returncode == 0, output[-3000:]
    names = sorted(p.parent.name for p in together.glob("retrain/*/record.json"))
    assert f"starting {len(names) - 1} retrain jobs (one per candidate) through hydra/launcher=joblib" in output
    assert sorted(p.parent.name for p in apart.glob("retrain/*/record.json")) == names
    assert (apart / "multirun.yaml").is_file()  # Hydra's record of the sweep over retrain.only
    for name in (n for n in names if n != "teacher"):
        expected = load_file(together / "retrain" / name / "model" / "model.safetensors")
        actual = load_file(apart / "retrain" / name / "model" / "model.safetensors")
        assert all(torch.equal(expected[k], actual[k]) for k in expected)  # a job retrains exactly as in sequence


def test_retrain_scores_on_the_search_pools_and_refuses_pools_that_overlap_its_selection_pool():
    search = compose("search", ["teacher=t", "run_dir=r", "quality.seed=3", "quality.selection_share=0.4"])
    run = {"settings": OmegaConf.to_container(search, resolve=True)}

    def quality(*overrides):
        return effective_config(compose("retrain", ["run_dir=r", *overrides]), run).quality

    assert (quality().seed, quality().selection_share) == (3, 0.4)  # the search's, not retrain's defaults (0, 0.3)
    larger = quality("quality.selection_share=0.5")
    assert (larger.seed, larger.selection_share) == (3, 0.5)
    assert set(pool(500, 0.5, 3, "evaluation")).isdisjoint(pool(500, 0.4, 3, "selection"))  # inside the search's
    with pytest.raises(SlimnasError, match="quality.seed=5 draws other pools than the search's"):
        quality("quality.seed=5")
    with pytest.raises(SlimnasError, match="quality.selection_share=0.35 is below the search's"):
        quality("quality.selection_share=0.35")
