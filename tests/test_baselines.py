"""The search-vs-baselines benchmark end to end on a tiny teacher with tiny budgets."""

import json
import os
import statistics

import optuna
import pytest
from conftest import SEARCH_FAST, SEARCH_SPACE, SHARED_DATA, load_study, storage
from omegaconf import open_dict
from scipy.stats import t as student_t
from transformers import AutoConfig

from slimnas.cli import main
from slimnas.compress.arch import Architecture, PerLayerArchitecture, param_count, shape_of
from slimnas.config import check, compose
from slimnas.core.files import read_jsonl
from slimnas.core.rundir import read_records, read_screen
from slimnas.core.settings import settings_of
from slimnas.recipes.baselines import method_config
from slimnas.recipes.settings import METHODS, PER_LAYER
from slimnas.search.setup import build_setup

HAS_DATA = (SHARED_DATA / "SOURCES.md").is_file()
WITH_DATA = ["quality.tasks=[piqa]", "quality.limit=4"]
WITHOUT_DATA = ["baselines.heldout_text=null", "quality.tasks=[]"]
KD_BUDGET = 3000
POSTGRES = os.environ.get("SLIMNAS_TEST_POSTGRES_URL")


def test_every_method_chooses_under_one_cap_with_one_kd_budget_and_the_table_equals_the_records(
    search_teacher, tmp_path
):
    run_dir = tmp_path / "baselines"
    args = [
        "baselines", f"teacher={search_teacher}", f"run_dir={run_dir}", *SEARCH_SPACE, *SEARCH_FAST,
        "search.budget.params=0.8", "search.budget.window=0.3", "search.budget.cap=true",
        f"search.budget.kd_tokens={KD_BUDGET}", "search.n_trials=4", "retrain.budget_tokens=512",
        "baselines.seeds=[0,1]", "baselines.modelopt_top_k=2", *(WITH_DATA if HAS_DATA else WITHOUT_DATA),
    ]  # fmt: skip
    assert main(args) == 0
    proof = json.loads((run_dir / "proof" / "proof.json").read_text())  # the tables as shown
    methods = json.loads((run_dir / "proof" / "methods.json").read_text())  # the numbers behind them
    paired = json.loads((run_dir / "proof" / "paired.json").read_text())
    config = AutoConfig.from_pretrained(search_teacher)
    cap = 0.8 * param_count(config)
    rows = {row["method"]: row for row in methods}
    assert [row["method"] for row in proof["rows"]] == [row["method"] for row in methods]
    assert {"search", "modelopt", "random", "zero_shot", "depth_only", "width_only"} <= set(rows)
    finalists, records, picks = {}, {}, {}
    screen = sum(line["seconds"] for line in read_screen(run_dir / "seed_0" / "search"))
    for seed in (0, 1):
        for method, pick in json.loads((run_dir / f"seed_{seed}" / "methods.json").read_text()).items():
            path = run_dir / f"seed_{seed}" / "finalists" / pick["finalist"] / "record.json"
            record = json.loads(path.read_text())
            finalists.setdefault(method, {})[seed], records[path] = record, path.stat().st_mtime
            picks.setdefault(method, {})[seed] = pick
            params = param_count(config, Architecture(**record["architecture"]))
            assert 0.7 * cap <= params <= cap  # one cap for every method: nobody wins by being bigger
            if method in ("search", "modelopt", "random"):  # the same KD budget to choose with
                trials = read_records(run_dir / f"seed_{seed}" / method)
                assert sum(r.kd_tokens for r in trials) <= pick["search_kd_tokens"] <= KD_BUDGET
                assert pick["search_seconds"] == pytest.approx(sum(r.seconds for r in trials))
            else:  # neither a rule nor the zero-shot pick searches
                assert pick["search_kd_tokens"] == 0 and pick["search_seconds"] == 0
            # every method that uses the screen is charged it, cached or not: search, modelopt and zero_shot alike
            own = read_screen(run_dir / f"seed_{seed}" / method) if method in ("search", "modelopt") else []
            expected = {"random": 0, "zero_shot": screen}.get(method, sum(line["seconds"] for line in own))
            assert pick["screen_seconds"] == pytest.approx(expected)
    assert screen > 0 and picks["modelopt"][0]["screen_seconds"] == pytest.approx(screen)  # the same cached screen
    modelopt = read_records(run_dir / "seed_0" / "modelopt")
    assert len(modelopt) == 2 and {r.proposed_by for r in modelopt} == {"screen"}  # the screen's top 2, one rung
    assert {r.kd_tokens for r in modelopt} == {KD_BUDGET // 2 // 128 * 128}
    assert {r.proposed_by for r in read_records(run_dir / "seed_0" / "random")} == {"uniform"}
    assert {record["kd_tokens"] for seeds in finalists.values() for record in seeds.values()} == {512}
    for method, seeds in finalists.items():
        kls = [seeds[s]["heldout"]["kl"] for s in (0, 1)]
        assert rows[method]["kl"] == pytest.approx(statistics.fmean(kls))
        names = [picks[method][s]["finalist"] for s in (0, 1)]  # pick stability: the same finalist in both seeds?
        assert rows[method]["same_finalist"] == (2 if names[0] == names[1] else 1)
        assert rows[method]["kl_spread"] == pytest.approx(max(kls) - min(kls))
        shown = next(row for row in proof["rows"] if row["method"] == method)
        assert shown["same finalist (seeds)"] == f"{rows[method]['same_finalist']} of 2"
        seconds = [picks[method][s]["screen_seconds"] + picks[method][s]["search_seconds"]
                   + sum(seeds[s]["seconds"].values()) for s in (0, 1)]  # fmt: skip
        assert rows[method]["seconds"] == pytest.approx(statistics.fmean(seconds))
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
            per_doc = [
                statistics.fmean(finalists[pair["method"]][s]["heldout"]["kl_per_doc"][d] for s in (0, 1))
                - statistics.fmean(finalists["search"][s]["heldout"]["kl_per_doc"][d] for s in (0, 1))
                for d in range(8)
            ]
            half = student_t.ppf(0.975, 7) * statistics.stdev(per_doc) / 8**0.5
            assert pair["documents"] == 8 and pair["ci95_documents"] == pytest.approx(half)
            assert pair["significant"] == (abs(pair["minus_search"]) > max(pair["ci95_seeds"], half))
    assert (run_dir / "proof" / "proof.png").stat().st_size > 0 and (run_dir / "proof" / "proof.md").is_file()
    assert "enumerating all" in " ".join(proof["notes"])

    assert main(args) == 0  # the same command again resumes: nothing is screened, searched or retrained twice
    assert all(path.stat().st_mtime == mtime for path, mtime in records.items())
    assert json.loads((run_dir / "proof" / "methods.json").read_text()) == methods  # costs included
    assert main(["report", str(run_dir)]) == 0  # the report shows the benchmark's table
    assert "Search vs baselines" in (run_dir / "report" / "index.html").read_text()


def test_the_proof_refuses_to_compare_without_a_cap_and_a_kd_budget(search_teacher, tmp_path, capsys):
    args = ["baselines", f"teacher={search_teacher}", f"run_dir={tmp_path / 'b'}", *SEARCH_FAST]
    assert main(args) == 2
    assert "set search.budget.cap=true and search.budget.kd_tokens" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


@pytest.mark.skipif(not POSTGRES, reason="no PostgreSQL server (tests/with_services.sh starts one)")
def test_every_method_of_every_seed_is_a_study_of_its_own_in_one_postgresql_storage(search_teacher, tmp_path):
    run_dir, name = tmp_path / "baselines", f"proof-{tmp_path.name}"
    args = [
        "baselines", f"teacher={search_teacher}", f"run_dir={run_dir}", *SEARCH_SPACE, *SEARCH_FAST,
        "search.budget.params=0.8", "search.budget.window=0.3", "search.budget.cap=true",
        "search.budget.kd_tokens=1536", "search.n_trials=2", "retrain.budget_tokens=256", "baselines.seeds=[0,1]",
        "baselines.methods=[search,modelopt]", "baselines.modelopt_top_k=2", *WITHOUT_DATA,
        f"search.storage.url={POSTGRES}", f"search.study_name={name}",
    ]  # fmt: skip
    assert main(args) == 0
    studies = set(optuna.get_all_study_names(POSTGRES))
    assert name not in studies  # no method searched in the shared name
    for seed in (0, 1):
        for method in ("search", "modelopt"):
            trials = optuna.load_study(study_name=f"{name}-seed_{seed}-{method}", storage=storage(POSTGRES)).trials
            records = read_records(run_dir / f"seed_{seed}" / method)
            labels = {t.number: t.user_attrs.get("label") for t in trials}
            assert records and all(labels[r.trial] == r.label for r in records)
    assert {r.proposed_by for r in read_records(run_dir / "seed_1" / "modelopt")} == {"screen"}


PER_LAYER_METHODS = ["hetero", "mip", "proportional", "search", "uniform"]


def test_per_layer_finalists_are_retrained_alike_and_paired_against_the_reference(search_teacher, tmp_path):
    """hetero, mip and proportional beside the uniform methods, everyone paired against hetero (baselines.reference);
    the block library charged to mip and hetero like a screen."""
    run_dir = tmp_path / "proof-hetero"
    args = [
        "baselines", f"teacher={search_teacher}", f"run_dir={run_dir}", *SEARCH_SPACE, *SEARCH_FAST,
        "search.budget.params=0.8", "search.budget.window=0.3", "search.budget.cap=true",
        "search.budget.kd_tokens=768", "search.n_trials=2", "search.screen.per_layer_samples=2",
        "retrain.budget_tokens=128", "baselines.seeds=[0,1]", f"baselines.methods=[{','.join(PER_LAYER_METHODS)}]",
        "baselines.reference=hetero", "search.references.uniform_tolerance=0.3", *WITHOUT_DATA,
    ]  # fmt: skip
    assert main(args) == 0
    proof = json.loads((run_dir / "proof" / "proof.json").read_text())
    assert sorted(row["method"] for row in proof["rows"]) == sorted(PER_LAYER_METHODS)  # a row per method
    (library,) = (tmp_path / "cache" / "blocks").glob("*.jsonl")
    library_seconds = sum(line["seconds"] for line in read_jsonl(library))
    cfg = compose("baselines", args[1:])
    with open_dict(cfg):
        cfg.command = "slimnas baselines"
    blocks = build_setup(method_config(cfg, "mip", 0, tmp_path / "again", 1)).blocks  # the library from its cache
    assert blocks is not None and blocks.proportional is not None
    config = AutoConfig.from_pretrained(search_teacher)
    cap = 0.8 * param_count(config)
    finalists = {}
    for seed in (0, 1):
        picks = json.loads((run_dir / f"seed_{seed}" / "methods.json").read_text())
        assert sorted(picks) == sorted(PER_LAYER_METHODS)
        seeded = {(t.user_attrs.get("proposed_by"), json.dumps(t.user_attrs.get("architecture")))
                  for t in load_study(run_dir / f"seed_{seed}" / "hetero").trials}  # fmt: skip
        for method, pick in picks.items():
            record = json.loads((run_dir / f"seed_{seed}" / "finalists" / pick["finalist"] / "record.json").read_text())
            finalists.setdefault(method, {})[seed] = record
            shape = shape_of(record["architecture"])
            assert record["kd_tokens"] == 128  # retrained alike
            assert 0.7 * cap <= record["params"] == param_count(config, shape) <= cap  # under one cap
            assert isinstance(shape, PerLayerArchitecture) == (method in PER_LAYER)
            assert pick["finalist"].startswith("per_layer-") == (method in PER_LAYER)  # a label too long for a name
        mip, proportional = blocks.mip[0].as_dict(), blocks.proportional.as_dict()
        assert finalists["mip"][seed]["architecture"] == mip and finalists["proportional"][seed]["architecture"] == (
            proportional
        )
        assert {("mip", json.dumps(mip)), ("proportional", json.dumps(proportional))} <= seeded  # hetero's seeds too
        hetero = read_records(run_dir / f"seed_{seed}" / "hetero")
        assert 0 < picks["hetero"]["search_kd_tokens"] <= 768  # the same KD budget as the uniform search's
        assert picks["hetero"]["search_seconds"] == pytest.approx(sum(r.seconds for r in hetero))
        own_screen = sum(line["seconds"] for line in read_screen(run_dir / f"seed_{seed}" / "hetero"))
        assert picks["hetero"]["screen_seconds"] == pytest.approx(own_screen + library_seconds)
        assert picks["mip"]["screen_seconds"] == pytest.approx(library_seconds) and library_seconds > 0
        assert picks["proportional"]["screen_seconds"] == picks["uniform"]["screen_seconds"] == 0
        assert picks["mip"]["search_kd_tokens"] == picks["proportional"]["search_kd_tokens"] == 0
    paired = json.loads((run_dir / "proof" / "paired.json").read_text())
    assert {p["method"] for p in paired} == set(PER_LAYER_METHODS) - {"hetero"}
    for pair in [p for p in paired if p["metric"] == "kl"]:
        differences = [finalists[pair["method"]][s]["heldout"]["kl"] - finalists["hetero"][s]["heldout"]["kl"]
                       for s in (0, 1)]  # fmt: skip
        assert pair["minus_hetero"] == pytest.approx(statistics.fmean(differences))
        assert pair["wins_for_hetero"] == sum(d > 0 for d in differences)
    assert "minus hetero (95% over seeds)" in proof["paired_columns"]
    assert "Each method minus the hetero, paired:" in (run_dir / "proof" / "proof.md").read_text()


def test_the_hetero_proof_preset_gives_the_per_layer_methods_their_space_and_the_others_the_uniform_one(tmp_path):
    cfg = compose("baselines", ["preset=baselines-hetero-cpu"])
    check(cfg)
    baselines, search = settings_of(cfg, "baselines"), settings_of(cfg, "search")
    assert (baselines.methods, baselines.reference) == (["hetero", "mip", "proportional", "search", "modelopt",
                                                         "uniform"], "hetero")  # fmt: skip
    assert (search.budget.params, search.budget.cap, search.budget.kd_tokens) == (0.6, True, 12288)
    assert (search.blocks.enabled, search.blocks.documents, search.blocks.positions) == (True, 8, 32)  # hetero-cpu's
    for method in baselines.methods:
        method_cfg = method_config(cfg, method, 1, tmp_path / method, baselines.modelopt_top_k)
        own = settings_of(method_cfg, "search")
        assert own.proposals == ("per_layer" if method in PER_LAYER else "screen")
        assert own.budget == search.budget  # one cap, one KD budget
        sampler = own.sampler["_target_"].rsplit(".", 1)[-1]
        assert sampler == ("LevelSwitchSampler" if method == "hetero" else "TPESampler")  # baselines.hetero_sampler
    pipeline = settings_of(compose("pipeline", ["preset=hetero-cpu"]), "search")  # the per-layer demo: the same
    assert pipeline.sampler == settings_of(method_config(cfg, "hetero", 1, tmp_path / "h", 4), "search").sampler
    assert settings_of(compose("baselines", ["preset=baselines-hetero-cpu", "search.budget.params=0.4"]),
                       "search").budget.params == 0.4  # fmt: skip
    uniform = settings_of(compose("baselines", ["preset=baselines-cpu"]), "baselines")  # today's proof, unchanged
    assert uniform.reference == "search" and not set(uniform.methods) & set(PER_LAYER)
    assert set(uniform.methods) == set(METHODS) - set(PER_LAYER)


@pytest.mark.parametrize(
    "override, message",
    [
        ("baselines.methods=[search,puzzle]", "baselines.methods must include search and come from"),
        ("baselines.reference=hetero", "baselines.reference 'hetero' must be one of baselines.methods"),
        ("search.proposals=per_layer", "search.proposals=per_layer would make the uniform methods per-layer"),
        ("search.blocks.enabled=false", "baselines.methods mip and proportional need search.blocks.enabled=true"),
        ("baselines.hetero_sampler=darwin", "baselines.hetero_sampler must be one of cmaes, evolution, gp"),
    ],
)
def test_bad_methods_are_refused_in_one_line(search_teacher, tmp_path, capsys, override, message):
    run_dir = tmp_path / "b"
    args = ["baselines", "preset=baselines-hetero-cpu", f"teacher={search_teacher}", f"run_dir={run_dir}"]
    if override.startswith("baselines.reference"):  # a reference left out of the methods
        args.append("baselines.methods=[search,mip]")
    assert main([*args, override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not run_dir.exists()
