"""Installable: a built wheel, installed outside the checkout, runs a tiny pipeline from another directory."""

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from conftest import FAST, SEARCH_SPACE

ROOT = Path(__file__).resolve().parents[1]


def run(command: list[str], cwd: Path, env: dict | None = None) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_the_wheel_installs_one_import_name_and_runs_a_pipeline_from_anywhere(search_teacher, tmp_path):
    wheel_dir = tmp_path / "dist"
    run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(wheel_dir)], cwd=ROOT)
    (wheel,) = wheel_dir.glob("slimnas-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"slimnas"}  # one import name: no compress, search, bench or reports at the top
    assert "slimnas/conf/search.yaml" in names and "slimnas/reports/templates/report.html.j2" in names

    # A fresh environment: the dependencies come from this one's site-packages (no network here), the project
    # only from the wheel; the editable install's finder is not loaded there.
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    site = next((venv / "lib").glob("python*/site-packages"))
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], cwd=tmp_path)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    located = run([str(venv / "bin" / "python"), "-c", "import slimnas; print(slimnas.__file__)"], elsewhere, env)
    assert located.strip().startswith(str(site))
    for name in ("compress", "search", "bench", "reports"):
        missing = subprocess.run([str(venv / "bin" / "python"), "-c", f"import {name}"], cwd=elsewhere, env=env)
        assert missing.returncode != 0, f"{name} is importable after installing the wheel"

    args = [
        str(venv / "bin" / "slimnas"), "pipeline", f"teacher={search_teacher}", "run_dir=run", *SEARCH_SPACE, *FAST,
        "distill.batch_size=4", "search.race.rung_tokens=[128,384]", "search.n_trials=2", "search.measure_speed=false",
        "search.budget.params=0.7", "search.budget.window=0.3", "retrain.budget_tokens=256", "retrain.top_k=1",
        "retrain.references=false", "quality.tasks=[]", "speed.prompt_len=16", "speed.new_tokens=4", "speed.repeats=2",
        "retrain.new_tokens=4",
    ]  # fmt: skip
    output = run(args, cwd=elsewhere, env=env)
    assert "pipeline wall time" in output and (elsewhere / "run" / "report" / "index.html").is_file()
