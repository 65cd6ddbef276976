"""slimnas report on real runs of a tiny teacher: values traced back to the records, the Pareto front, several
runs, a search-only run, bad input, and the page opened in a real headless browser."""

import base64
import io
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import SCREENSHOT_DIR, SHARED_DATA, chrome, save_tiny_checkpoint, search_args
from matplotlib.figure import Figure

from slimnas.cli import main
from slimnas.core.rundir import COMPLETE, TrialRecord
from slimnas.reports.plots import FRONT_LABEL, quality_vs_params, quality_vs_speedup
from slimnas.reports.runs import read_runs
from slimnas.search.front import front_trials
from slimnas.search.objectives import objectives_of

HAS_DATA = (SHARED_DATA / "SOURCES.md").is_file()  # without the benchmark files: no lm-eval scores to plot
RETRAIN_FAST = [
    "precision=fp32", "distill.batch_size=4", "retrain.budget_tokens=512", "distill.eval_every=2",
    "quality.tasks=[piqa]" if HAS_DATA else "quality.tasks=[]", "quality.limit=4", "speed.prompt_len=16",
    "speed.new_tokens=4", "speed.repeats=2", "retrain.new_tokens=4", "retrain.top_k=1",
]  # fmt: skip
PROOF = {
    "columns": ["method", "params %", "held-out KL", "trials"],
    "rows": [
        {"method": "slimnas search", "params %": 68.5, "held-out KL": 0.0053, "trials": 4},
        {"method": "random search", "params %": 70.1, "held-out KL": 0.0071, "trials": None},
    ],
    "paired_columns": ["pair", "KL difference"],
    "paired": [{"pair": "search - random", "KL difference": -0.0018}],
    "notes": ["same budget of KD tokens for both methods"],
}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("report")


@pytest.fixture(scope="module")
def searched(root) -> Path:
    """A 4-trial search on a tiny teacher, never retrained."""
    teacher = save_tiny_checkpoint(root / "teacher", max_position_embeddings=512)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLIMNAS_CACHE", str(root / "cache"))
        assert main(search_args(teacher, root / "searched", "search.n_trials=4")) == 0
    return root / "searched"


@pytest.fixture(scope="module")
def retrained(root, searched) -> Path:
    """A copy of the search, retrained (the front's best and the references), scored on piqa; with a proof/."""
    run_dir = root / "retrained"
    shutil.copytree(searched, run_dir)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLIMNAS_CACHE", str(root / "cache"))
        assert main(["retrain", str(run_dir), *RETRAIN_FAST]) == 0
    (run_dir / "proof").mkdir()
    (run_dir / "proof" / "proof.json").write_text(json.dumps(PROOF))
    (run_dir / "proof" / "proof.png").write_bytes(tiny_png())
    return run_dir


def tiny_png() -> bytes:
    figure = Figure(figsize=(3, 2), layout="constrained")
    figure.add_subplot().bar(["search", "random"], [0.0053, 0.0071])
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def trial_records(run_dir: Path) -> dict[int, dict]:
    return {int(p.parent.name): read_json(p) for p in sorted((run_dir / "trials").glob("*/record.json"))}


def retrain_records(run_dir: Path) -> dict[str, dict]:
    return {p.parent.name: read_json(p) for p in sorted((run_dir / "retrain").glob("*/record.json"))}


def leaderboard(run_dir: Path) -> pd.DataFrame:
    return pd.read_csv(run_dir / "report" / "leaderboard.csv", dtype={"name": str})


def test_the_leaderboard_values_are_the_records_values(retrained, capsys):
    assert main(["report", str(retrained)]) == 0
    assert capsys.readouterr().out.strip().endswith(str(retrained / "report" / "index.html"))
    table = leaderboard(retrained)
    trials, retrain = trial_records(retrained), retrain_records(retrained)
    run = read_json(retrained / "run.json")
    teacher = retrain.pop("teacher")
    assert table.name.tolist()[0] == "teacher" and len(table) == 1 + len(trials)  # no trial failed in this run

    row = table.iloc[0]
    assert row.params == run["teacher_params"] == teacher["params"] and row.heldout_kl == 0.0
    assert (row.heldout_split, row.perplexity) == ("evaluation", pytest.approx(teacher["heldout"]["perplexity"]))
    assert row.peak_memory_bytes == teacher["memory"]["peak_bytes"]

    retrained_rows = table[table.stage == "retrained"]
    assert retrained_rows.index.tolist() == list(range(1, 1 + len(retrain)))  # right after the teacher
    assert retrained_rows.heldout_kl.is_monotonic_increasing
    for _, row in retrained_rows.iterrows():
        record = retrain[f"{int(row['name']):04d}"]
        assert row.heldout_split == record["heldout"]["split"] == "evaluation"
        assert row.heldout_kl == pytest.approx(record["heldout"]["kl"], rel=1e-12)
        assert row.heldout_kl_stderr == pytest.approx(record["heldout"]["kl_stderr"], rel=1e-12)
        assert row.perplexity == pytest.approx(record["heldout"]["perplexity"], rel=1e-12)
        assert (row.params, row.kd_tokens) == (record["params"], record["kd_tokens"])
        assert row.decode_speedup == pytest.approx(record["speed"]["decode_speedup"], rel=1e-12)
        assert row.flops_ratio == pytest.approx(teacher["flops_per_token"] / record["flops_per_token"], rel=1e-12)
        assert row.peak_memory_bytes == record["memory"]["peak_bytes"]
        assert row.summary == pytest.approx(record["summary"]["value"], rel=1e-12)
        kept = 100 * record["summary"]["value"] / teacher["summary"]["value"]
        assert row.teacher_score_kept_pct == pytest.approx(kept, rel=1e-12)
        for score in record["scores"]:
            assert row[f"{score['task']}/{score['metric']}"] == pytest.approx(score["value"], rel=1e-12)
            assert row[f"{score['task']}/{score['metric']}_stderr"] == pytest.approx(score["stderr"], rel=1e-12)
            assert row[f"{score['task']}/split"] == f"{score['split']}, evaluation pool"

    searched_rows = table[~table.stage.isin(["teacher", "retrained"])]
    assert {int(n) for n in searched_rows.name} == set(trials) - {r["trial"] for r in retrain.values()}
    for _, row in searched_rows.iterrows():
        record = trials[int(row["name"])]
        assert (row.stage, row.kd_tokens, row.heldout_split) == (
            f"rung {record['rung']}",
            record["kd_tokens"],
            "selection",
        )
        assert row.heldout_kl == pytest.approx(record["final"]["heldout_kl"], rel=1e-12)
        if record["state"] == "complete":  # stopped trials are not timed (speed is not an objective here)
            assert row.decode_speedup == pytest.approx(record["final"]["decode_speedup"], rel=1e-12)
        else:
            assert np.isnan(row.decode_speedup) and "decode_speedup" not in record["final"]
        assert np.isnan(row.summary) and np.isnan(row.peak_memory_bytes)  # blank: not measured by the search

    markdown = (retrained / "report" / "leaderboard.md").read_text()
    assert "evaluation" in markdown and "selection" in markdown and "±" in markdown and "nan" not in markdown


def test_vs_best_pairs_only_rows_of_the_same_documents_and_kd_budget(retrained):
    table = leaderboard(retrained)
    for stage in ("retrained", "rung 2"):
        rows = table[table.stage == stage]
        assert (rows.kl_vs_best == 0).sum() == 1 and rows.kl_vs_best.notna().all()  # one best per group
    assert table[table.stage.isin(["teacher", "rung 0", "rung 1"])].kl_vs_best.isna().all()


def test_the_front_line_is_the_front_the_search_stored(retrained, tmp_path):
    figure = quality_vs_params(read_runs([retrained])[0])
    (line,) = [line for line in figure.axes[0].get_lines() if line.get_label().startswith(FRONT_LABEL)]
    pareto = pd.read_csv(retrained / "pareto.csv").sort_values("params")
    np.testing.assert_allclose(line.get_xydata(), pareto[["params", "quality"]].to_numpy(), rtol=1e-12)
    # with a third objective the plot draws the stored two-dimensional subset, never a front of its own
    run_dir = shutil.copytree(retrained, tmp_path / "three", ignore=shutil.ignore_patterns("report", "retrain"))
    front = read_json(run_dir / "front.json")
    front |= {"objectives": ["quality", "params", "throughput"], "quality_params": front["trials"][:1]}
    (run_dir / "front.json").write_text(json.dumps(front))
    figure = quality_vs_params(read_runs([run_dir])[0])
    (line,) = [line for line in figure.axes[0].get_lines() if line.get_label().startswith(FRONT_LABEL)]
    assert len(line.get_xydata()) == 1 and "of the front over quality, params, throughput" in line.get_label()


UNSTABLE = (
    "decode speed-up 3.18x unstable: its error bar 1.51 is over 25% of it and it is over 1.3 x the FLOPs ratio 1.60"
)


def hollow_points(figure: Figure) -> list[tuple[float, float]]:
    """The points of the speed plot's hollow markers (no face colour)."""
    collections = [c for c in figure.axes[0].collections if len(c.get_offsets()) and not len(c.get_facecolor())]
    return [tuple(point) for c in collections for point in c.get_offsets().tolist()]


def test_an_unstable_speedup_is_marked_in_the_tables_hollow_in_the_plot_and_off_the_speed_front(retrained, tmp_path):
    run_dir = shutil.copytree(retrained, tmp_path / "unstable", ignore=shutil.ignore_patterns("report"))
    trials, retrain = trial_records(run_dir), retrain_records(run_dir)
    front = read_json(run_dir / "front.json")["trials"]
    trial = next(n for n in front if "decode_speedup" in trials[n]["final"])  # a front member, timed
    record = trials[trial]
    record["speed"] |= {"unstable": UNSTABLE, "measurements": 2}
    record["final"] |= {"decode_speedup": 3.18, "decode_speedup_stderr": 1.51}
    (run_dir / "trials" / f"{trial:04d}" / "record.json").write_text(json.dumps(record))
    name = next(n for n in retrain if n != "teacher")
    retrain[name]["speed"] |= {"unstable": UNSTABLE, "measurements": 2}
    (run_dir / "retrain" / name / "record.json").write_text(json.dumps(retrain[name]))
    assert main(["report", str(run_dir)]) == 0

    table = leaderboard(run_dir)
    unstable = table[table.decode_speedup_unstable.notna()]
    marked = {(stage == "retrained", int(name)) for stage, name in zip(unstable.stage, unstable.name, strict=True)}
    retrained_trials = {r["trial"] for n, r in retrain.items() if n != "teacher"}
    expected = {(True, retrain[name]["trial"])} | ({(False, trial)} if trial not in retrained_trials else set())
    assert marked == expected and set(table.decode_speedup_unstable.dropna()) == {UNSTABLE}
    assert (run_dir / "report" / "leaderboard.md").read_text().count("x (unstable)") == len(expected)
    page = (run_dir / "report" / "index.html").read_text()
    assert f"Trial {trial}: {UNSTABLE} (2 timings). Marked (unstable) in the tables" in page
    assert f"Retrained trial {retrain[name]['trial']}: {UNSTABLE} (2 timings)" in page

    figure = quality_vs_speedup(read_runs([run_dir])[0])
    labels = [c.get_label() for c in figure.axes[0].collections]
    assert any(label.startswith("speed-up unstable after 2 timings (error bar over 25% of it") for label in labels)
    hollow = hollow_points(figure)
    assert (3.18, record["final"]["quality"]) in hollow
    assert (retrain[name]["speed"]["decode_speedup"], -retrain[name]["heldout"]["kl"]) in hollow
    (on_front,) = [line for line in figure.axes[0].get_lines() if line.get_label().startswith(f"on the {FRONT_LABEL}")]
    assert 3.18 not in on_front.get_xdata() and len(on_front.get_xdata()) == len(front) - 1


def timed_record(trial: int, quality: float, params: int, speedup: float, unstable: str | None) -> TrialRecord:
    final = {"quality": quality, "params": params, "decode_speedup": speedup}
    return TrialRecord(
        trial, {}, str(trial), params, 0.5, 0, {}, state=COMPLETE, final=final, speed={"unstable": unstable}
    )


def test_an_unstable_timing_is_no_point_of_a_front_over_measured_objectives():
    import optuna

    values = {0: [-0.1, 100, 5.0], 1: [-0.1, 100, 2.0], 2: [-0.2, 80, 1.5]}  # 0 dominates 1 by its timing alone
    records = {n: timed_record(n, *v, UNSTABLE if n == 0 else None) for n, v in values.items()}
    study = optuna.create_study(directions=["maximize", "minimize", "maximize"])
    for v in values.values():
        study.add_trial(optuna.trial.create_trial(values=v))
    assert sorted(t.number for t in study.best_trials) == [0, 2]
    assert front_trials(study, records, objectives_of(["quality", "params", "throughput"])) == [1, 2]
    two = optuna.create_study(directions=["maximize", "minimize"])  # no timing among the objectives: Optuna's front
    for v in values.values():
        two.add_trial(optuna.trial.create_trial(values=v[:2]))
    assert front_trials(two, records, objectives_of(["quality", "params"])) == [0, 1, 2]


def test_several_runs_give_one_leaderboard_tagged_by_run(searched, retrained, tmp_path):
    out = tmp_path / "sweep"
    assert main(["report", str(retrained), str(searched), f"out={out}"]) == 0
    table = pd.read_csv(out / "leaderboard.csv", dtype={"name": str})
    assert table.run.unique().tolist() == ["retrained", "searched"]
    for run_dir in (retrained, searched):
        rows = table[table.run == run_dir.name]
        assert rows.name.iloc[0] == "teacher" and len(rows) == 1 + len(trial_records(run_dir))
    assert (out / "plots" / "retrained" / "kd_curves.png").is_file()
    assert not (out / "plots" / "searched" / "kd_curves.png").exists()
    assert (out / "leaderboard.md").read_text().startswith("| run ")


def test_a_search_only_run_says_so_and_leaves_failed_trials_out(searched, tmp_path):
    run_dir = shutil.copytree(searched, tmp_path / "search_only")
    failed = {**read_json(run_dir / "trials" / "0000" / "record.json"), "trial": 99, "state": "failed"}
    failed |= {"rung": -1, "rungs": [], "final": {}, "fail_reason": "OutOfMemoryError: hand-written for this test"}
    (run_dir / "trials" / "0099").mkdir()
    (run_dir / "trials" / "0099" / "record.json").write_text(json.dumps(failed))
    assert main(["report", str(run_dir)]) == 0
    table = leaderboard(run_dir)
    assert "99" not in table.name.tolist() and len(table) == len(trial_records(searched)) + 1
    teacher = table.iloc[0]
    run = read_json(run_dir / "run.json")
    assert (teacher["name"], teacher.params, teacher.heldout_kl) == ("teacher", run["teacher_params"], 0.0)
    page = (run_dir / "report" / "index.html").read_text()
    assert "This run was never retrained: search-only report." in page
    assert "1 failed trial(s) left out of the leaderboard (trial 99: OutOfMemoryError" in page
    assert "KD curves of the retrained candidates: not drawn" in page
    assert not (run_dir / "report" / "plots" / "search_only" / "kd_curves.png").exists()
    assert (run_dir / "report" / "plots" / "search_only" / "quality_vs_params.svg").is_file()


def not_a_run(tmp_path: Path, searched: Path) -> Path:
    (tmp_path / "bad").mkdir()
    return tmp_path / "bad"


def no_records(tmp_path: Path, searched: Path) -> Path:
    (tmp_path / "bad").mkdir()
    shutil.copy(searched / "run.json", tmp_path / "bad" / "run.json")
    return tmp_path / "bad"


def corrupt_record(tmp_path: Path, searched: Path) -> Path:
    run_dir = shutil.copytree(searched, tmp_path / "bad")
    path = run_dir / "trials" / "0001" / "record.json"
    path.write_text(path.read_text()[:200])
    return run_dir


@pytest.mark.parametrize(
    "make, message",
    [
        (not_a_run, "is not a slimnas run directory (no run.json)"),
        (no_records, "has no trial records"),
        (corrupt_record, "corrupt JSON file"),
    ],
)
def test_bad_input_ends_in_one_line_and_writes_nothing(searched, tmp_path, capsys, make, message):
    run_dir = make(tmp_path, searched)
    out = tmp_path / "out"
    out.mkdir()
    (out / "index.html").write_text("an earlier report")
    assert main(["report", str(run_dir), f"out={out}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("slimnas: error: ") and message in err
    assert [p.name for p in out.iterdir()] == ["index.html"] and (out / "index.html").read_text() == "an earlier report"
    assert not (run_dir / "report").exists()


def test_a_retrained_candidate_without_its_trial_record_is_refused(retrained, tmp_path, capsys):
    run_dir = shutil.copytree(retrained, tmp_path / "bad", ignore=shutil.ignore_patterns("report", "model"))
    trial = next(r["trial"] for name, r in retrain_records(run_dir).items() if name != "teacher")
    (run_dir / "trials" / f"{trial:04d}" / "record.json").unlink()
    assert main(["report", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"is of trial {trial}, which has no trial record" in err
    assert not (run_dir / "report").exists()


def test_the_proof_tables_notes_and_image_are_on_the_page(retrained):
    assert main(["report", str(retrained)]) == 0
    page = (retrained / "report" / "index.html").read_text()
    section = page[page.index("<h2>Search vs baselines") :]
    for header in PROOF["columns"] + PROOF["paired_columns"]:
        assert f"<th>{header}</th>" in section
    assert "<td>random search</td><td>70.1</td><td>0.0071</td><td></td>" in section  # None is a blank cell
    assert "<td>search - random</td><td>-0.0018</td>" in section
    assert PROOF["notes"][0] in section and 'alt="Search vs baselines (retrained)"' in section


# The page in a real browser ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Loaded:
    console_errors: list[str]
    requests: list[str]  # every URL the page asked for, except data: URIs
    images: list[dict]  # alt, naturalWidth
    leaderboard_rows: int


def load(driver, page: Path) -> Loaded:
    driver.get(page.as_uri())  # returns once the load event fired: every image loaded or failed
    events = [json.loads(entry["message"])["message"] for entry in driver.get_log("performance")]
    requests = [e["params"]["request"]["url"] for e in events if e["method"] == "Network.requestWillBeSent"]
    return Loaded(
        console_errors=[e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"],
        requests=[url for url in requests if not url.startswith("data:")],
        images=driver.execute_script("return [...document.images].map(i => ({alt: i.alt, width: i.naturalWidth}))"),
        leaderboard_rows=driver.execute_script("return document.querySelectorAll('table.leaderboard tbody tr').length"),
    )


def screenshot(driver, path: Path) -> None:
    """The whole page, not only the window: the viewport made as tall as the content."""
    height = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]["height"]
    size = {"width": 1400, "height": math.ceil(height), "deviceScaleFactor": 1, "mobile": False}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", size)
    path.write_bytes(base64.b64decode(driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png"})["data"]))


def test_the_page_opens_offline_in_a_browser_with_every_image(retrained, tmp_path):
    assert main(["report", str(retrained)]) == 0
    page = retrained / "report" / "index.html"
    driver = chrome()
    try:
        loaded = load(driver, page)
        screenshot(driver, tmp_path / "report.png")
    finally:
        driver.quit()
    assert loaded.console_errors == []
    assert loaded.requests == [page.as_uri()]
    plots = 5 if HAS_DATA else 4  # the per-task plot needs lm-eval scores
    assert len(loaded.images) == plots + 1 and all(image["width"] > 0 for image in loaded.images)  # + the proof's
    assert loaded.leaderboard_rows == 1 + len(trial_records(retrained))
    if SCREENSHOT_DIR:
        shutil.copy(tmp_path / "report.png", Path(SCREENSHOT_DIR) / "report.png")


def test_the_browser_checks_see_requests_console_errors_and_broken_images(tmp_path):
    page = tmp_path / "bad.html"
    page.write_text(
        '<!DOCTYPE html><html><head><link rel="icon" href="data:,"></head><body>'
        '<img src="http://127.0.0.1:9/x.png" alt="remote"><script>console.error("broken")</script></body></html>'
    )
    driver = chrome()
    try:
        loaded = load(driver, page)
    finally:
        driver.quit()
    assert "http://127.0.0.1:9/x.png" in loaded.requests
    assert any("broken" in message for message in loaded.console_errors)
    assert loaded.images == [{"alt": "remote", "width": 0}]


def test_the_page_shows_the_front_rank_fidelity_the_race_and_why_candidates_stopped(retrained):
    assert main(["report", str(retrained)]) == 0
    page = (retrained / "report" / "index.html").read_text()
    assert "Rank fidelity against retraining" in page and "The race&#39;s leaders" in page
    assert "The screen:" in page and "screened" in page
    race = json.loads((retrained / "race.json").read_text())
    first = page.index("<p>", page.index("<h1>"))  # the first paragraph says whether the pick stands out
    verdict = "is separated from" if race["why"].startswith("separated") else "is NOT separated from"
    assert f"The pick, trial {race['winner']}, {verdict} the runner-up" in page[first : first + 2000]
    stopped = [r for r in trial_records(retrained).values() if r["state"] == "stopped"]
    assert all(r["stop_reason"].replace("±", "&#177;")[:20] in page or r["stop_reason"][:20] in page for r in stopped)
    # uniform candidates: no per-layer heat map, no block library
    assert "Per-layer widths" not in page and "block library" not in page
    assert not list((retrained / "report" / "plots").glob("*/layer_widths.*"))


def fidelity_cells(page: str, name: str) -> list[str]:
    """The Spearman and Kendall cells of a rank-fidelity row of the page."""
    row = page[page.index(f"<td>{name}</td>") :]
    return [cell.split("</td>")[0] for cell in row.split("<td>")[2:5]]


def test_the_block_librarys_predicted_order_is_scored_against_the_last_rung_and_retraining(retrained, tmp_path):
    """Records with the block library's predicted KL (search.blocks): the page states its Spearman and Kendall
    against the retrained KL (in the rank-fidelity table, like the rungs) and against the last rung, scipy's values
    over exactly the candidates that have both."""
    from scipy.stats import kendalltau, spearmanr

    run_dir = shutil.copytree(retrained, tmp_path / "library", ignore=shutil.ignore_patterns("report"))
    trials = trial_records(run_dir)
    rng = np.random.default_rng(0)
    for number, record in trials.items():  # a noisy prediction of the screen's KL; one trial without any
        record["predicted_kl"] = None if number == 1 else record["rungs"][0]["heldout"]["kl"] * rng.uniform(0.5, 2)
        (run_dir / "trials" / f"{number:04d}" / "record.json").write_text(json.dumps(record))
    assert main(["report", str(run_dir)]) == 0
    page = (run_dir / "report" / "index.html").read_text()

    retrain = [r for name, r in retrain_records(run_dir).items() if name != "teacher"]
    pairs = [(trials[r["trial"]]["predicted_kl"], r["heldout"]["kl"]) for r in retrain if r["trial"] != 1]
    last = [
        (r["predicted_kl"], r["final"]["heldout_kl"]) for n, r in trials.items() if r["state"] == COMPLETE and n != 1
    ]
    assert len(pairs) >= 3 and len(last) >= 3
    name = "block library (summed block KL, no KD)"
    for cells, found in (
        (fidelity_cells(page, name), pairs),
        (fidelity_cells(page[page.index("against the last rung") :], name), last),
    ):
        early, late = zip(*found, strict=True)
        assert cells == [
            str(len(found)),
            f"{spearmanr(early, late).statistic:.2f}",
            f"{kendalltau(early, late).statistic:.2f}",
        ]


def test_text_from_the_records_is_escaped_on_the_page(retrained, tmp_path):
    run_dir = shutil.copytree(retrained, tmp_path / "escaped", ignore=shutil.ignore_patterns("report"))
    record = read_json(run_dir / "trials" / "0000" / "record.json")
    record["reference_note"] = "<script>alert(1)</script>"
    (run_dir / "trials" / "0000" / "record.json").write_text(json.dumps(record))
    assert main(["report", str(run_dir)]) == 0
    page = (run_dir / "report" / "index.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_an_empty_table_is_written_as_valid_files(tmp_path):
    from slimnas.core.tables import save_records

    csv, table_json, parquet = save_records([], tmp_path / "trials")
    assert pd.read_parquet(parquet).empty and json.loads(table_json.read_text()) == []
    assert csv.read_text().strip() == ""
