"""The search-vs-baselines benchmark end to end on a tiny teacher with tiny budgets."""

import json
import statistics

import pytest
from conftest import SEARCH_FAST, SEARCH_SPACE, SHARED_DATA
from scipy.stats import t as student_t
from transformers import AutoConfig

from slimnas.cli import main
from slimnas.compress.arch import Architecture, param_count
from slimnas.search.records import read_records

HAS_DATA = (SHARED_DATA / "SOURCES.md").is_file()
WITH_DATA = ["baselines.heldout_text_rows=4", "quality.tasks=[piqa]", "quality.limit=4"]
WITHOUT_DATA = ["baselines.heldout_text=null", "quality.tasks=[]"]


def test_every_method_meets_the_budget_gets_equal_retraining_and_the_table_equals_the_records(search_teacher, tmp_path):
    run_dir = tmp_path / "baselines"
    args = [
        "baselines", f"teacher={search_teacher}", f"run_dir={run_dir}", *SEARCH_SPACE, *SEARCH_FAST,
        "search.budget.params=0.7", "search.budget.window=0.3", "search.n_trials=3", "retrain.budget_tokens=512",
        "baselines.seeds=[0,1]", "search.measure_speed=false", *(WITH_DATA if HAS_DATA else WITHOUT_DATA),
    ]  # fmt: skip
    assert main(args) == 0
    proof = json.loads((run_dir / "proof" / "proof.json").read_text())  # the tables as shown
    methods = json.loads((run_dir / "proof" / "methods.json").read_text())  # the numbers behind them
    paired = json.loads((run_dir / "proof" / "paired.json").read_text())
    config = AutoConfig.from_pretrained(search_teacher)
    target = 0.7 * param_count(config)
    rows = {row["method"]: row for row in methods}
    assert [row["method"] for row in proof["rows"]] == [row["method"] for row in methods]
    for shown, row in zip(proof["rows"], methods, strict=True):
        assert shown["KL (eval rows)"] == f"{row['kl']:.3f} ± {row['kl_ci95']:.3f}"
    assert {"search", "random", "zero_shot", "depth_only", "width_only"} <= set(rows)
    finalists, records = {}, {}
    for seed in (0, 1):
        for method, pick in json.loads((run_dir / f"seed_{seed}" / "methods.json").read_text()).items():
            path = run_dir / f"seed_{seed}" / "finalists" / pick["finalist"] / "record.json"
            record = json.loads(path.read_text())
            finalists.setdefault(method, {})[seed], records[path] = record, path.stat().st_mtime
            assert abs(param_count(config, Architecture(**record["architecture"])) - target) <= 0.3 * target
            if method in ("search", "random"):  # what the search spent: every KD token and second of every trial
                trials = read_records(run_dir / f"seed_{seed}" / method)
                assert pick["search_kd_tokens"] == sum(r.kd_tokens for r in trials) > 0
                assert pick["search_seconds"] == pytest.approx(sum(r.seconds for r in trials))
            else:  # a rule costs nothing; the zero-shot pick costs its screen
                screen = json.loads((run_dir / "seed_0" / "search" / "zero_shot.json").read_text())
                assert pick["search_kd_tokens"] == 0
                assert pick["search_seconds"] == (screen["seconds"] if method == "zero_shot" else 0) >= 0
    assert {record["kd_tokens"] for seeds in finalists.values() for record in seeds.values()} == {512}
    for method, seeds in finalists.items():
        kls = [seeds[s]["heldout"]["kl"] for s in (0, 1)]
        assert rows[method]["kl"] == pytest.approx(statistics.fmean(kls))
        assert rows[method]["kl_ci95"] == pytest.approx(student_t.ppf(0.975, 1) * statistics.stdev(kls) / 2**0.5)
        if HAS_DATA:
            texts = [seeds[s]["heldout_other"]["wiki.valid"]["perplexity"] for s in (0, 1)]
            assert rows[method]["text_perplexity"] == pytest.approx(statistics.fmean(texts))
    assert len(proof["paired"]) == len(paired)
    for pair in paired:
        if pair["metric"] == "kl":
            differences = [finalists[pair["method"]][s]["heldout"]["kl"] - finalists["search"][s]["heldout"]["kl"]
                           for s in (0, 1)]  # fmt: skip
            assert pair["minus_search"] == pytest.approx(statistics.fmean(differences))
            assert pair["significant"] == (abs(pair["minus_search"]) > pair["ci95"])
    assert (run_dir / "proof" / "proof.png").stat().st_size > 0 and (run_dir / "proof" / "proof.md").is_file()

    screen = run_dir / "seed_0" / "search" / "zero_shot.json"
    records[screen] = screen.stat().st_mtime
    assert main(args) == 0  # the same command again resumes: nothing is screened, searched or retrained twice
    assert all(path.stat().st_mtime == mtime for path, mtime in records.items())
    assert json.loads((run_dir / "proof" / "methods.json").read_text()) == methods  # costs included
    assert main(["report", str(run_dir)]) == 0  # the report shows the benchmark's table
    assert "Search vs baselines" in (run_dir / "report" / "index.html").read_text()
