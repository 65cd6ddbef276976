"""lm-eval's own command line, as `slimnas bench` writes it, gives the scores slimnas computed in memory."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import FAST, needs_data, save_tiny_checkpoint, tiny_tokenizer
from test_heterogeneous_downstream import VOCAB, equivalent_pair

from slimnas.bench.quality import subset
from slimnas.cli import main


def bench_then_lm_eval(teacher: Path, student: Path, tasks: list[str], out: Path, capsys) -> tuple[str, pd.DataFrame]:
    """Bench the student (4 documents a task, batches of 2, a 96-token context: below the model's 128, so a command
    without max_length scores other windows), run the script it wrote, and check every score against lm-eval's.
    Returns the script's text and bench's scores."""
    args = [
        "bench", f"teacher={teacher}", f"model={student}", f"out={out}", f"quality.tasks=[{','.join(tasks)}]",
        "quality.limit=4", "quality.batch_size=2", "quality.max_length=96", "measure_speed=false",
        "measure_memory=false", *FAST,
    ]  # fmt: skip
    assert main(args) == 0
    script = out / "lm_eval_command.sh"
    assert f"sh {script}" in capsys.readouterr().out
    samples = json.loads((out / "lm_eval_samples.json").read_text())
    assert samples["slimnas_piqa"] == subset(1838, 0.3, 0, "evaluation", 4)  # the evaluation pool, seed 0

    venv_bin = Path(sys.executable).parent  # where pip put lm_eval beside this Python
    env = {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}"}
    run = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]

    cli: dict[str, dict] = {}
    for results_file in (out / "lm_eval_cli").rglob("results_*.json"):
        result = json.loads(results_file.read_text())
        for name, metrics in result["results"].items():
            cli[name] = {**metrics, "n": result["n-samples"][name]["effective"]}
    scores = pd.read_parquet(out / "scores.parquet")
    assert set(scores.task) == set(tasks) and set(cli) == {f"slimnas_{task}" for task in tasks}
    for row in scores.itertuples():
        lm_eval = cli[f"slimnas_{row.task}"]
        assert lm_eval["n"] == row.n == 4
        assert lm_eval[f"{row.metric},none"] == pytest.approx(row.value, rel=1e-6, abs=1e-6), (row.task, row.metric)
    return script.read_text(), scores


@needs_data
def test_lm_evals_cli_scores_a_student_on_the_same_documents_as_bench(tmp_path, capsys):
    teacher = save_tiny_checkpoint(tmp_path / "teacher")
    student = save_tiny_checkpoint(tmp_path / "student", seed=1, num_hidden_layers=2)
    script, scores = bench_then_lm_eval(teacher, student, ["piqa", "lambada_openai"], tmp_path / "bench", capsys)
    assert set(scores.metric) == {"acc", "acc_norm", "perplexity"}
    assert script.count("\nlm_eval --model hf") == 2  # one call per task, as bench scores them
    assert f"pretrained={student},dtype=float32,max_length=96" in script and "HF_DATASETS_OFFLINE=1" in script


@needs_data
def test_lm_evals_cli_loads_a_per_layer_student_through_slimnas_models(tmp_path, capsys):
    teacher = save_tiny_checkpoint(tmp_path / "teacher", vocab_size=VOCAB, num_hidden_layers=5)
    student, _ = equivalent_pair()
    student.save_pretrained(tmp_path / "student")
    tiny_tokenizer(VOCAB).save_pretrained(tmp_path / "student")
    script, _ = bench_then_lm_eval(teacher, tmp_path / "student", ["piqa"], tmp_path / "bench", capsys)
    assert "import slimnas.models; from lm_eval.__main__ import cli_evaluate; cli_evaluate()" in script
