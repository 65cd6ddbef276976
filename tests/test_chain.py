"""Minitron's whole process on a tiny teacher: teacher correction, and chains of prune-distill stages."""

import json
import os
import signal

import pytest
import torch
from conftest import FAST, SEARCH_FAST, SEARCH_SPACE, save_tiny_checkpoint, slimnas_process, wait_until
from transformers import AutoConfig, AutoModelForCausalLM

from slimnas.cli import main
from slimnas.compress.arch import param_count
from slimnas.compress.corpus import load_corpus
from slimnas.compress.importance import importance_cache_path
from slimnas.compress.models import cache_root, load_model
from slimnas.compress.settings import DataSettings, ImportanceSettings
from slimnas.core.rundir import read_records, read_retrained

CORRECT = ["correct.batch_size=4", "correct.eval_every=4", "correct.save_every=4", "correct.lr=1e-3"]
PIPELINE = [
    *SEARCH_SPACE, *SEARCH_FAST, "search.n_trials=2", "search.measure_speed=false", "search.screen.top_k=2",
    "search.references.kinds=[]", "retrain.top_k=1", "retrain.budget_tokens=256", "retrain.new_tokens=2",
    "quality.tasks=[]", "distill.eval_every=64", "distill.save_every=4",
]  # fmt: skip


@pytest.fixture
def teacher(tmp_path):
    return save_tiny_checkpoint(tmp_path / "teacher", max_position_embeddings=512)


def test_a_corrected_teacher_is_a_plain_checkpoint_that_moved_and_a_rerun_keeps_it(teacher, tmp_path, capsys):
    out = tmp_path / "corrected"
    args = ["correct", f"teacher={teacher}", f"out={out}", *FAST, *CORRECT, "correct.budget_tokens=1024"]
    assert main(args) == 0
    corrected = AutoModelForCausalLM.from_pretrained(out / "model")  # plain transformers, no project code
    original = AutoModelForCausalLM.from_pretrained(teacher)
    moved = [not torch.equal(a, b) for a, b in zip(corrected.parameters(), original.parameters(), strict=True)]
    assert all(moved)
    record = json.loads((out / "model" / "slimnas.json").read_text())
    assert record["corrected_from"] == str(teacher) and record["result"]["tokens"] == 1024
    before, after = record["result"]["initial"], record["result"]["final"]
    assert before["kl"] == pytest.approx(0, abs=1e-3) and after["kl"] > 0.001  # KL to the original: it moved
    assert after["perplexity"] < before["perplexity"]  # fine-tuned on the corpus: lower perplexity on its text
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 1024 // (4 * 32)
    capsys.readouterr()
    assert main(args) == 0 and "finished before, kept" in capsys.readouterr().out
    assert main([*args[:-1], "correct.budget_tokens=2048"]) == 2  # other settings: refused, not overwritten


def test_correct_without_a_budget_is_one_line_before_any_compute(teacher, tmp_path, capsys):
    assert main(["correct", f"teacher={teacher}", f"out={tmp_path / 'c'}", *FAST]) == 2
    assert "correct.budget_tokens" in capsys.readouterr().err and not (tmp_path / "c").exists()


def test_a_pipeline_with_correction_scores_students_against_both_teachers(teacher, tmp_path):
    run_dir = tmp_path / "run"
    args = ["pipeline", f"teacher={teacher}", f"run_dir={run_dir}", *PIPELINE, *CORRECT, "correct.budget_tokens=512"]
    assert main(args) == 0
    corrected = str(run_dir / "corrected" / "model")
    assert json.loads((run_dir / "run.json").read_text())["teacher"] == corrected  # every stage used it
    students = [r for r in read_retrained(run_dir) if r.name != "teacher"]
    assert students and all(r.heldout_other["reference teacher"]["kl"] > 0 for r in students)
    table = json.loads((run_dir / "correction" / "correction.json").read_text())
    assert [row["model"] for row in table["rows"][:2]] == ["original teacher", "corrected teacher"]
    assert table["rows"][0]["KL to original"].startswith("0")
    assert "512 tokens of next-token loss" in table["notes"][1]
    page = (run_dir / "report" / "index.html").read_text()
    assert "Teacher correction" in page and "corrected teacher" in page


def test_a_two_stage_chain_recomputes_importance_on_the_first_student_and_resumes_after_a_kill(teacher, tmp_path):
    run_dir = tmp_path / "chain"
    capped = "search.budget.cap=true"  # every stage below its target: the chain's sizes strictly decrease
    args = ["pipeline", f"teacher={teacher}", f"run_dir={run_dir}", "chain=[0.8,0.55]", *PIPELINE, capped]
    process = slimnas_process(*args)
    stage_2 = run_dir / "stage_2"
    wait_until(lambda: any(stage_2.glob("trials/*/record.json")), process, timeout=600, what="stage 2 never started")
    os.kill(process.pid, signal.SIGKILL)  # killed in the second stage's search
    process.finish()
    first = {p: p.read_bytes() for p in (run_dir / "stage_1").rglob("record.json")}

    assert main(args) == 0
    assert {p: p.read_bytes() for p in first} == first  # the first stage's results kept as they were
    assert len(read_records(run_dir / "stage_1")) == len([p for p in first if p.parent.parent.name == "trials"])
    stage_1_run = json.loads((run_dir / "stage_1" / "run.json").read_text())
    stage_2_run = json.loads((stage_2 / "run.json").read_text())
    pick = next(r for r in read_retrained(run_dir / "stage_1") if r.name != "teacher")
    assert stage_2_run["teacher"] == pick.model_dir  # the first stage's retrained pick teaches the second
    student = load_model(pick.model_dir)
    corpus = load_corpus(student.tokenizer, DataSettings(**stage_2_run["settings"]["data"]))
    settings = ImportanceSettings(**stage_2_run["settings"]["importance"])
    expected = importance_cache_path(cache_root(), student.fingerprint, corpus.fingerprint, settings)
    assert stage_2_run["importance"] == str(expected) != stage_1_run["importance"]
    assert all(r.params <= student.model.num_parameters() for r in read_records(stage_2))

    chain = json.loads((run_dir / "chain" / "chain.json").read_text())
    assert [row["stage"] for row in chain["rows"]] == ["original", 1, 2]
    assert (run_dir / "chain" / "chain.png").stat().st_size
    assert [row["teacher"].split(":")[0] for row in chain["rows"][1:]] == ["the original", "stage 1's pick"]
    fractions = [float(row["params %"]) for row in chain["rows"]]
    assert fractions[0] == 100 > fractions[1] > fractions[2]
    page = (run_dir / "report" / "index.html").read_text()
    assert "The chain" in page and "stage_2" in page


def test_chains_compares_a_chain_and_a_corrected_teacher_with_one_cut_at_the_same_kd_tokens(teacher, tmp_path, capsys):
    run_dir = tmp_path / "chains"
    arms = "chains.arms=[one_shot,one_shot_corrected,chain_corrected]"
    budgets = ["search.budget.cap=true", "search.budget.kd_tokens=2048", "retrain.budget_tokens=256",
               "chains.correct_tokens=256"]  # fmt: skip
    args = ["chains", f"teacher={teacher}", f"run_dir={run_dir}", "chains.stages=[0.8,0.55]", arms, *PIPELINE,
            *CORRECT, *budgets]  # fmt: skip
    assert main(args) == 0
    arms_json = json.loads((run_dir / "proof" / "arms.json").read_text())
    one_shot, chain = arms_json["one_shot"], arms_json["chain_corrected"]
    target = 0.55 * param_count(AutoConfig.from_pretrained(teacher))
    assert all(0.7 * target <= arm["params"] <= target for arm in (one_shot, chain))  # under the same cap
    assert one_shot["kd_tokens"] <= 2048 + 256 and chain["kd_tokens"] <= 2048 + 256  # the same KD tokens in all
    assert len(one_shot["kl_per_doc"]) == len(chain["kl_per_doc"]) == 8  # the same evaluation documents
    assert (run_dir / "corrected" / "model" / "config.json").is_file()
    assert capsys.readouterr().out.count("correcting ") == 1  # one corrected teacher for both corrected arms
    for arm in ("one_shot_corrected", "chain_corrected"):
        assert (run_dir / arm / "corrected").resolve() == (run_dir / "corrected").resolve()
    assert json.loads((run_dir / "chain_corrected" / "stage_1" / "run.json").read_text())["teacher"].endswith(
        "corrected/model"
    )
    proof = json.loads((run_dir / "proof" / "proof.json").read_text())
    assert [row["arm"] for row in proof["rows"]] == ["one_shot", "one_shot_corrected", "chain_corrected"]
    assert main(["report", str(run_dir)]) == 0
    assert "Chain vs one shot" in (run_dir / "report" / "index.html").read_text()


def test_chains_without_a_cap_is_one_line_before_any_compute(teacher, tmp_path, capsys):
    args = ["chains", f"teacher={teacher}", f"run_dir={tmp_path / 'chains'}", "search.budget.kd_tokens=2048"]
    assert main(args) != 0
    err = capsys.readouterr().err
    assert "search.budget.cap=true" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "chains").exists()
