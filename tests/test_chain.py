"""Minitron's whole process on a tiny teacher: teacher correction, and chains of prune-distill stages."""

import json
import math
import os
import signal
import statistics

import optuna
import pytest
import torch
from conftest import FAST, SEARCH_FAST, SEARCH_SPACE, save_tiny_checkpoint, slimnas_process, storage, wait_until
from scipy.stats import t as student_t
from transformers import AutoConfig, AutoModelForCausalLM

from slimnas.cli import main
from slimnas.compress.arch import param_count
from slimnas.compress.corpus import load_corpus
from slimnas.compress.importance import importance_cache_path
from slimnas.compress.models import cache_root, load_model
from slimnas.compress.settings import DataSettings, ImportanceSettings
from slimnas.core.rundir import read_records, read_retrained
from slimnas.core.tables import plus_minus
from slimnas.reports.verdicts import paired, pick_stability

POSTGRES = os.environ.get("SLIMNAS_TEST_POSTGRES_URL")
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


CHAINS_BUDGETS = ["search.budget.cap=true", "search.budget.kd_tokens=2048", "retrain.budget_tokens=256"]


def test_chains_compares_a_chain_and_a_corrected_teacher_with_one_cut_at_the_same_kd_tokens(teacher, tmp_path, capsys):
    run_dir = tmp_path / "chains"
    arms = "chains.arms=[one_shot,one_shot_corrected,chain_corrected]"
    args = ["chains", f"teacher={teacher}", f"run_dir={run_dir}", "chains.stages=[0.8,0.55]", arms, "chains.seeds=[0]",
            *PIPELINE, *CORRECT, *CHAINS_BUDGETS, "chains.correct_tokens=256"]  # fmt: skip
    assert main(args) == 0
    arms_json = json.loads((run_dir / "proof" / "arms.json").read_text())
    one_shot, chain = arms_json["one_shot"]["0"], arms_json["chain_corrected"]["0"]
    target = 0.55 * param_count(AutoConfig.from_pretrained(teacher))
    assert all(0.7 * target <= arm["params"] <= target for arm in (one_shot, chain))  # under the same cap
    assert one_shot["kd_tokens"] <= 2048 + 256 and chain["kd_tokens"] <= 2048 + 256  # the same KD tokens in all
    assert len(one_shot["kl_per_doc"]) == len(chain["kl_per_doc"]) == 8  # the same evaluation documents
    assert (run_dir / "corrected" / "model" / "config.json").is_file()
    assert capsys.readouterr().out.count("correcting ") == 1  # one corrected teacher for both corrected arms
    for arm in ("one_shot_corrected", "chain_corrected"):
        assert (run_dir / "seed_0" / arm / "corrected").resolve() == (run_dir / "corrected").resolve()
    stage_1 = run_dir / "seed_0" / "chain_corrected" / "stage_1"
    assert json.loads((stage_1 / "run.json").read_text())["teacher"].endswith("corrected/model")
    proof = json.loads((run_dir / "proof" / "proof.json").read_text())
    assert [row["arm"] for row in proof["rows"]] == ["one_shot", "one_shot_corrected", "chain_corrected"]
    # one seed: the table is there, with the interval over documents, but without a verdict
    assert "one seed: no interval over seeds" in " ".join(proof["notes"])
    assert [row["significant"] for row in proof["rows"]] == ["", "no", "no"]
    assert [row["same final student (seeds)"] for row in proof["rows"]] == ["1 of 1"] * 3
    assert chain["finalist"].count(" -> ") == 1  # a chain's final student: its pick at every stage
    assert "±" in proof["rows"][2]["minus one_shot (95% over documents)"]
    assert "±" not in proof["rows"][2]["minus one_shot (95% over seeds)"]
    assert main(["report", str(run_dir)]) == 0
    assert "Chain vs one shot" in (run_dir / "report" / "index.html").read_text()


def test_chains_without_a_cap_is_one_line_before_any_compute(teacher, tmp_path, capsys):
    args = ["chains", f"teacher={teacher}", f"run_dir={tmp_path / 'chains'}", "search.budget.kd_tokens=2048"]
    assert main(args) != 0
    err = capsys.readouterr().err
    assert "search.budget.cap=true" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "chains").exists()


@pytest.mark.skipif(not POSTGRES, reason="no PostgreSQL server (tests/with_services.sh starts one)")
def test_chains_over_two_seeds_in_one_postgresql_storage_give_a_verdict_over_seeds_and_documents(
    teacher, tmp_path, capsys
):
    run_dir, name = tmp_path / "chains", f"chains-{tmp_path.name}"
    args = ["chains", f"teacher={teacher}", f"run_dir={run_dir}", "chains.stages=[0.8,0.55]",
            "chains.arms=[one_shot,one_shot_corrected]", "chains.seeds=[0,1]", *PIPELINE, *CORRECT, *CHAINS_BUDGETS,
            "chains.correct_tokens=256", f"search.storage.url={POSTGRES}", f"search.study_name={name}"]  # fmt: skip
    assert main(args) == 0
    assert capsys.readouterr().out.count("correcting ") == 1  # one corrected teacher for every arm and seed
    # one storage: every seed's every arm a study of its own (a chain's stages add their own), holding its trials
    for seed in (0, 1):
        for arm in ("one_shot", "one_shot_corrected"):
            trials = optuna.load_study(study_name=f"{name}-seed_{seed}-{arm}", storage=storage(POSTGRES)).trials
            records = read_records(run_dir / f"seed_{seed}" / arm)
            labels = {t.number: t.user_attrs.get("label") for t in trials}
            assert records and all(labels[r.trial] == r.label for r in records)
            settings = json.loads((run_dir / f"seed_{seed}" / arm / "run.json").read_text())["settings"]
            assert settings["search"]["seed"] == settings["distill"]["seed"] == seed

    arms = json.loads((run_dir / "proof" / "arms.json").read_text())
    proof = json.loads((run_dir / "proof" / "proof.json").read_text())
    corrected, one_shot = ([arms[arm][str(s)] for s in (0, 1)] for arm in ("one_shot_corrected", "one_shot"))
    row = next(r for r in proof["rows"] if r["arm"] == "one_shot_corrected")
    differences = [c["kl"] - o["kl"] for c, o in zip(corrected, one_shot, strict=True)]
    half_seeds = student_t.ppf(0.975, 1) * statistics.stdev(differences) / 2**0.5
    corrected_docs, one_shot_docs = (
        [statistics.fmean(seeds) for seeds in zip(*(r["kl_per_doc"] for r in runs), strict=True)]
        for runs in (corrected, one_shot)
    )  # each document's KL averaged over the seeds
    by_document = [c - o for c, o in zip(corrected_docs, one_shot_docs, strict=True)]
    half_documents = student_t.ppf(0.975, 7) * statistics.stdev(by_document) / 8**0.5
    mean = statistics.fmean(differences)
    assert row["minus one_shot (95% over seeds)"] == plus_minus(mean, half_seeds)
    assert row["minus one_shot (95% over documents)"] == plus_minus(mean, half_documents)
    assert row["significant"] == ("yes" if abs(mean) > max(half_seeds, half_documents) else "no")
    assert row["seeds where one_shot is better"] == f"{sum(d > 0 for d in differences)} of 2"
    same = 2 if corrected[0]["finalist"] == corrected[1]["finalist"] else 1
    assert row["same final student (seeds)"] == f"{same} of 2"
    assert row["KL spread (seeds)"] == f"{abs(corrected[0]['kl'] - corrected[1]['kl']):.3f}"


def test_the_verdict_needs_both_intervals_and_more_than_one_seed():
    mine, reference = [1.0, 1.3, 1.1], [0.5, 0.6, 0.55]
    mine_docs = [[1.0, 1.1, 0.9], [1.2, 1.4, 1.3], [1.0, 1.2, 1.1]]
    reference_docs = [[0.5, 0.4, 0.6], [0.6, 0.7, 0.5], [0.5, 0.6, 0.55]]
    difference = paired(mine, reference, mine_docs, reference_docs)
    assert difference.difference == pytest.approx(statistics.fmean([0.5, 0.7, 0.55]))
    assert difference.ci95_seeds == pytest.approx(student_t.ppf(0.975, 2) * statistics.stdev([0.5, 0.7, 0.55]) / 3**0.5)
    assert difference.documents == 3 and difference.reference_better == 3 and difference.significant
    wide = paired([1.0, 0.0, 1.1], [0.5, 0.6, 0.55])  # the seeds disagree: inside the interval over seeds
    assert not wide.significant and wide.reference_better == 2 and wide.ci95_documents is None
    one = paired([1.0], [0.5], [[1.0, 1.1, 0.9]], [[0.5, 0.4, 0.6]])  # far outside the interval over documents
    assert one.ci95_documents < one.difference and math.isnan(one.ci95_seeds) and not one.significant
    stability = pick_stability(["a", "b", "b"], [2.0, 2.5, 2.25])
    assert (stability.finalist, stability.text(), stability.kl_spread) == ("b", "2 of 3", 0.5)
    family = paired(mine, reference, mine_docs, reference_docs, comparisons=4)  # one of 4 read together: Bonferroni
    assert family.ci95_seeds == pytest.approx(difference.ci95_seeds * student_t.ppf(1 - 0.025 / 4, 2)
                                              / student_t.ppf(0.975, 2))  # fmt: skip
    assert family.ci95_documents > difference.ci95_documents and family.difference == difference.difference


def test_a_chains_run_from_before_the_seeds_is_still_reported(tmp_path):
    run_dir = tmp_path / "chains"  # one seed, its arms in RUN_DIR/ARM, the table of that time
    columns = ["arm", "final student", "params", "KL to the original (evaluation docs)",
               "minus one_shot (95% over documents)", "perplexity", "KD tokens", "correction tokens"]  # fmt: skip
    rows = [dict(zip(columns, values, strict=True)) for values in (
        ["one_shot", "h384-ffn1152-q6-kv2-L20", "53.30M", "2.514 ± 0.039", "", "378 ± 19", "20,480", "0"],
        ["chain", "h576-ffn512-q3-kv1-L20", "51.93M", "3.137 ± 0.048", "+0.623 ± 0.050", "685 ± 41", "20,480", "0"],
    )]  # fmt: skip
    table = {"title": "Chain vs one shot, with and without teacher correction", "columns": columns, "rows": rows,
             "notes": ["one seed"]}  # fmt: skip
    (run_dir / "proof").mkdir(parents=True)
    (run_dir / "proof" / "proof.json").write_text(json.dumps(table))
    (run_dir / "run.json").write_text(json.dumps({"kind": "baselines", "teacher": "smollm2-135m"}))
    assert main(["report", str(run_dir)]) == 0
    page = (run_dir / "report" / "index.html").read_text()
    assert "Chain vs one shot" in page and "+0.623 ± 0.050" in page and "h576-ffn512-q3-kv1-L20" in page


@pytest.mark.parametrize("command", ["pipeline chain=[0.8,0.55]", "chains"])
def test_a_chain_without_its_pick_retrained_is_one_line_before_any_compute(command, teacher, tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = [*command.split(), f"teacher={teacher}", f"run_dir={run_dir}", *PIPELINE, *CHAINS_BUDGETS,
            "retrain.top_k=0", "retrain.references=true"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "retrain.top_k >= 1" in err and len(err.strip().splitlines()) == 1
    assert not run_dir.exists()
