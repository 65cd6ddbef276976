"""Per-layer candidates in the search (search.proposals=per_layer): feasible by construction under the budget,
screened with the caller's seed shapes, raced, picked, retrained to a per-layer checkpoint, resumed after a kill."""

import json
import os
import random
import shutil
import signal
from dataclasses import replace

import optuna
import pandas as pd
import pytest
import torch
from conftest import (
    FAST,
    load_study,
    reached_last_rung,
    save_tiny_checkpoint,
    search_args,
    slimnas_process,
    tiny_config,
    tiny_model,
    tiny_tokenizer,
    wait_until,
)
from omegaconf import open_dict
from optuna.trial import TrialState
from scipy.stats import kendalltau, spearmanr
from transformers import AutoConfig, AutoModelForCausalLM

import slimnas.compress.blocks as blocks_module
from slimnas.cli import main
from slimnas.compress.arch import (
    LayerShape,
    PerLayerArchitecture,
    param_count,
    shape_of,
    validate_target,
)
from slimnas.compress.blocks import BlockVariants
from slimnas.compress.importance import compute_importance
from slimnas.compress.modeling import per_layer_config
from slimnas.compress.settings import ImportanceSettings
from slimnas.config import check, compose
from slimnas.core.errors import SlimnasError
from slimnas.core.rundir import read_records, read_retrained, read_screen, search_pick
from slimnas.core.settings import settings_of
from slimnas.reports.plots import layer_widths
from slimnas.reports.runs import read_runs
from slimnas.search.block_seeds import _proportional, check_blocks, space_variants
from slimnas.search.constraints import Budget
from slimnas.search.layer_space import LayerSpace
from slimnas.search.proposals import PerLayer
from slimnas.search.race import rung_key
from slimnas.search.screen import Screened
from slimnas.search.setup import build_setup
from slimnas.search.space import PerLayerSpaceSettings
from slimnas.search.study import describe, summary_lines

PER_LAYER = ["search.proposals=per_layer", "search.screen.per_layer_samples=8", "search.measure_speed=false"]
TINY = tiny_config(vocab_size=300)  # the search tests' teacher: 142,656 parameters, 4 layers
SMOLLM2 = AutoConfig.for_model(  # SmolLM2-135M's shape (config only): 30 layers, 9 heads in 3 KV groups
    "llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
    head_dim=64, num_hidden_layers=30, tie_word_embeddings=True,
)  # fmt: skip


@pytest.mark.parametrize(
    "config, hidden_sizes, budget",
    [
        (TINY, [48, 64], Budget(params=0.7, window=0.3)),
        (TINY, [48, 64], Budget(params=0.5, window=0.1, cap=True)),
        (TINY, [48, 64], Budget(params=None, weight_memory_mb=0.15)),
        (SMOLLM2, [384, 448, 512, 576], Budget(params=0.6, window=0.1, cap=True)),
        (SMOLLM2, [384, 448, 512, 576], Budget(params=0.4, window=0.05, cap=True, weight_memory_mb=100)),
    ],
)
def test_every_proposal_is_feasible_by_construction(config, hidden_sizes, budget):
    """The screen's sample, the decode of arbitrary proposals and a TPE study's proposals all meet the budget and
    can be cut from the teacher: none is ever rejected or repaired after the fact."""
    space = LayerSpace.of(PerLayerSpaceSettings(), hidden_sizes, config, budget)
    sample = space.stratified_sample(24, seed=0)
    rng = random.Random(1)
    arbitrary = [
        space.decode(rng.choice(hidden_sizes), [(rng.randint(0, 3), rng.randint(0, 1536)) for _ in range(30)])
        for _ in range(100)
    ]
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=5, multivariate=True))
    sampled = []
    for _ in range(15):
        trial = study.ask()
        sampled.append(space.suggest(trial))
        study.tell(trial, float(space.params(sampled[-1])))
    for shape in [*sample, *arbitrary, *sampled]:
        validate_target(shape, config)  # raises for a shape the teacher cannot be cut to
        assert budget.allows(config, shape), (shape.label(), param_count(config, shape))
        assert space.params(shape) == param_count(config, shape)
        assert len(shape.layers) == config.num_hidden_layers and shape.layers[0].num_attention_heads > 0
        assert space.decode(shape.hidden_size, _wanted(space.encode(shape), shape)) == shape  # encode inverts decode
    assert len(set(sample)) == len(sample) == 24 and space.stratified_sample(24, seed=0) == sample  # seeded
    assert space.stratified_sample(24, seed=1) != sample
    assert any(len({layer for layer in shape.layers if layer.kept}) > 1 for shape in sample)  # really per layer
    sizes = sorted(space.params(shape) for shape in sample)
    pool = sorted(space.params(space.random(rng)) for _ in range(200))
    assert sizes[0] <= pool[20] and sizes[-1] >= pool[-21]  # one per stratum by size: both tails are in the sample


def _wanted(params: dict, shape: PerLayerArchitecture) -> list[tuple[int, int]]:
    return [(params[f"kv_{i}"], params[f"ffn_{i}"]) for i in range(len(shape.layers))]


def narrowest_space(config, hidden_sizes: list[int], params: float) -> tuple[LayerSpace, Budget]:
    """The per-layer space at the narrowest window it accepts (about one layer's largest variant gap): the budget
    where a proposal sits at an edge most often."""
    accepted = None
    for k in range(40):
        budget = Budget(params=params, window=round(0.3 * 0.85**k, 6))
        try:
            accepted = LayerSpace.of(PerLayerSpaceSettings(), hidden_sizes, config, budget), budget
        except SlimnasError as error:
            assert "too narrow" in str(error)
            return accepted
    raise AssertionError("no window was too narrow")


@pytest.mark.parametrize("config, hidden_sizes", [(TINY, [48, 64]), (SMOLLM2, [384, 448, 512, 576])])
def test_the_space_and_the_budget_share_one_integer_rule_at_a_tight_budget(config, hidden_sizes):
    """At the narrowest window, thousands of proposals (random, decoded from arbitrary values, TPE's) all pass
    Budget.allows; a shape built without the budget passes it exactly when the space's bounds (Budget.param_bounds)
    hold; at an edge where float arithmetic rounds below the integer, the budget keeps the decimal's integer."""
    space, budget = narrowest_space(config, hidden_sizes, 0.6)
    assert (space.low, space.high) == budget.param_bounds(config) and space.high - space.low < 0.2 * space.low
    rng = random.Random(0)
    proposals = [space.random(rng) for _ in range(1500)] + space.stratified_sample(40, seed=0)
    proposals += [
        space.decode(rng.choice(hidden_sizes), [(rng.randint(0, 3), rng.randint(0, 1536)) for _ in range(30)])
        for _ in range(300)
    ]
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=5))
    for _ in range(20):
        trial = study.ask()
        proposals.append(space.suggest(trial))
        study.tell(trial, float(space.params(proposals[-1])))
    for shape in proposals:
        assert budget.allows(config, shape), (shape.label(), param_count(config, shape), space.low, space.high)

    unconstrained = [
        PerLayerArchitecture(rng.choice(space.reachable), (rng.choice(space.options(0)),) + tuple(
            rng.choice(space.variants) for _ in range(space.layers - 1)))
        for _ in range(2000)
    ]  # fmt: skip
    verdicts = {budget.allows(config, s) == (space.low <= space.params(s) <= space.high) for s in unconstrained}
    assert verdicts == {True}
    assert {budget.allows(config, s) for s in unconstrained} == {True, False}

    # the edge itself: a candidate of exactly 1.15 x the target's parameters, where the float product falls short
    shape = next(
        s for s in unconstrained if space.params(s) % 23 == 0 and space.params(s) * 20 // 23 * 1.15 < space.params(s)
    )
    at_edge = Budget(params=space.params(shape) * 20 // 23, window=0.15)
    assert at_edge.param_bounds(config)[1] == space.params(shape) and at_edge.allows(config, shape)
    assert not replace(at_edge, params=at_edge.params - 1).allows(config, shape)


@pytest.mark.parametrize("ffn, kv_groups", [([0, 40, 96], [1, 2]), ([24, 56, 80], [1])])
def test_the_proportional_seed_is_a_point_of_the_space_within_the_budget(ffn, kv_groups):
    """The importance-proportional allocation steps along the space's FFN widths (no width between them, none
    narrower than its narrowest) with the space's most KV groups: a seed the space itself could propose."""
    teacher = tiny_model(vocab_size=300)
    calibration = torch.randint(3, 300, (16, 24), generator=torch.Generator().manual_seed(1))
    importance = compute_importance(
        teacher, calibration, ImportanceSettings(n_samples=16, batch_size=8, precision="fp32")
    )
    budget = Budget(params=0.6, window=0.15)
    space = LayerSpace.of(PerLayerSpaceSettings(ffn=ffn, kv_groups=kv_groups), [64], TINY, budget)
    shape = _proportional(TINY, importance, space, budget, context=24)
    assert shape is not None and shape.hidden_size == 64 and budget.allows(TINY, shape)
    assert all(layer in space.options(i) for i, layer in enumerate(shape.layers)), shape.label()
    assert {layer.num_key_value_heads for layer in shape.layers} == {max(kv_groups)}
    assert len({layer.intermediate_size for layer in shape.layers}) > 1  # in proportion to the layers' importance


def test_bad_per_layer_spaces_are_one_line():
    settings = PerLayerSpaceSettings()
    with pytest.raises(SlimnasError, match="budget unreachable: no per-layer candidate"):
        LayerSpace.of(settings, [48, 64], TINY, Budget(params=0.05))
    with pytest.raises(SlimnasError, match="window is too narrow for per-layer proposals"):
        LayerSpace.of(settings, [48, 64], TINY, Budget(params=0.6, window=0.01))
    with pytest.raises(SlimnasError, match="kv_groups needs a value above 0"):
        LayerSpace.of(PerLayerSpaceSettings(kv_groups=[0]), [64], TINY, Budget(params=0.6))
    assert LayerSpace.of(settings, [48, 64], TINY, Budget(params=0.15)).reachable == (48,)  # 64: embeddings too big
    space = LayerSpace.of(PerLayerSpaceSettings(ffn=[0, 48, 96, 4096], kv_groups=[2, 1, 9]), [64], TINY, Budget())
    assert sorted({v.intermediate_size for v in space.variants}) == [0, 48, 96]  # above the teacher's: left out
    assert sorted({(v.num_attention_heads, v.num_key_value_heads) for v in space.variants}) == [(2, 1), (4, 2)]


@pytest.mark.parametrize(
    "override, message",
    [
        ("search.budget.params=0.05", "budget unreachable: no per-layer candidate"),
        ("search.budget.window=0.01", "search.budget.window is too narrow for per-layer proposals"),
        ("search.space.per_layer.kv_groups=[0]", "kv_groups needs a value above 0"),
        ("search.screen.per_layer_samples=0", "per_layer_samples must be at least 1"),
    ],
)
def test_impossible_per_layer_settings_fail_before_anything_is_written(
    search_teacher, tmp_path, capsys, override, message
):
    run_dir = tmp_path / "run"
    assert main([*search_args(search_teacher, run_dir, *PER_LAYER), override]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("slimnas: error:") and message in err
    assert not run_dir.exists()


def test_a_per_layer_teacher_is_refused_in_one_line(tmp_path, capsys):
    teacher = tmp_path / "per-layer"
    shape = PerLayerArchitecture(64, (LayerShape(96, 4, 2), LayerShape(48, 2, 1), LayerShape(0, 4, 2)))
    AutoModelForCausalLM.from_config(per_layer_config(tiny_config(num_hidden_layers=3), shape)).save_pretrained(teacher)
    tiny_tokenizer().save_pretrained(teacher)
    assert main(["search", f"teacher={teacher}", f"run_dir={tmp_path / 'x'}", *FAST, *PER_LAYER]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "per-layer model (slimnas_llama) cannot be the teacher" in err[0]
    assert not (tmp_path / "x").exists()


# A tiny per-layer search, retrained and reported -------------------------------------------------------------


@pytest.fixture(scope="module")
def per_layer_search(tmp_path_factory):
    """8 trials to the last rung: the screen's best 4, one reference (width-only), then the level switches'
    proposals (search/sampler=evolution, the per-layer presets' sampler)."""
    root = tmp_path_factory.mktemp("per-layer")
    teacher = save_tiny_checkpoint(root / "teacher", max_position_embeddings=512)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLIMNAS_CACHE", str(root / "cache"))
        args = search_args(
            teacher,
            root / "run",
            "search.n_trials=8",
            "search.references.kinds=[width_only]",
            *PER_LAYER,
            "search/sampler=evolution",
        )
        assert main(args) == 0
    return root


def test_a_per_layer_search_screens_races_and_picks_a_per_layer_candidate(per_layer_search):
    run_dir = per_layer_search / "run"
    config = AutoConfig.from_pretrained(per_layer_search / "teacher")
    budget = Budget(params=0.7, window=0.3)
    screened = read_screen(run_dir)
    seeds = seeds_of(load_study(run_dir))  # the MIP's picks and the proportional allocation (search.blocks)
    assert set(seeds.values()) == {"mip", "proportional"}
    assert 8 < len(screened) <= 8 + len(seeds)  # the sample and the seeds (one may also be drawn by the sample)
    assert all(isinstance(shape_of(line["architecture"]), PerLayerArchitecture) for line in screened)
    records = {r.trial: r for r in read_records(run_dir)}
    best = sorted(screened, key=lambda line: (line["kl"], line["label"]))
    assert [records[n].architecture for n in range(4)] == [line["architecture"] for line in best[:4]]
    for n in range(4):  # who proposed each of the screen's best: a seed's origin, else the screen
        assert records[n].proposed_by == seeds.get(json.dumps(records[n].architecture), "screen")
    for record in records.values():
        shape = shape_of(record.architecture)
        assert record.label == shape.label() and record.params == param_count(config, shape)
        assert budget.allows(config, shape)
    proposed = {r.proposed_by for r in records.values()}
    assert {"reference", "sampler"} <= proposed and proposed & {"screen", "mip", "proportional"}
    study = load_study(run_dir)
    names = {"hidden_size"} | {f"{kind}_{i}" for kind in ("kv", "ffn") for i in range(4)}
    assert all(set(t.params) == names for t in study.trials if t.state == TrialState.COMPLETE)  # the reference too
    assert len(reached_last_rung(study)) >= 8

    pick = search_pick(run_dir, list(records.values()))
    shape = shape_of(pick.architecture)
    assert isinstance(shape, PerLayerArchitecture)
    assert len({layer for layer in shape.layers if layer.kept}) > 1  # layers of different widths
    assert (run_dir / "race.json").is_file()
    table = pd.read_csv(run_dir / "trials.csv").set_index("trial")
    row = table.loc[pick.trial]
    assert row.label == pick.label and row.hidden_size == shape.hidden_size and pd.isna(row.intermediate_size)
    assert row.num_hidden_layers == sum(layer.kept for layer in shape.layers)


def seeds_of(study: optuna.Study) -> dict[str, str]:
    """The study's seed shapes (queued first or told to the sampler) and who proposed each."""
    return {json.dumps(t.user_attrs["architecture"]): t.user_attrs["proposed_by"] for t in study.trials
            if t.user_attrs.get("proposed_by") in ("mip", "proportional")}  # fmt: skip


def search_config(teacher, run_dir, *extra):
    cfg = compose("search", search_args(teacher, run_dir, *PER_LAYER, *extra)[1:])
    with open_dict(cfg):
        cfg.command = "slimnas search"
    return cfg


def test_the_block_library_seeds_the_screen_within_the_budget_and_a_second_search_reads_it_back(
    per_layer_search, tmp_path, monkeypatch, capsys
):
    """search.blocks: the library is measured once (the fixture's search); another study with other settings reads
    it from the cache, measures nothing, and gets the same MIP picks, every one within the budget and screened."""
    run_dir = per_layer_search / "run"
    config = AutoConfig.from_pretrained(per_layer_search / "teacher")
    seeds = seeds_of(load_study(run_dir))
    screened = {json.dumps(line["architecture"]) for line in read_screen(run_dir)}
    assert set(seeds) <= screened and len([who for who in seeds.values() if who == "mip"]) == 4  # mip_solutions
    for arch in seeds:
        shape = shape_of(json.loads(arch))
        assert Budget(params=0.7, window=0.3).allows(config, shape) and shape.hidden_size == config.hidden_size
    (library,) = (per_layer_search / "cache" / "blocks").glob("*.jsonl")
    cuts = len(library.read_text().splitlines())
    assert cuts == 4 * 4 + 4 + 3  # FFN 0, 24, 48, 72 in every layer; 1 KV group in every layer, 0 in layers 1-3

    monkeypatch.setenv("SLIMNAS_CACHE", str(per_layer_search / "cache"))
    monkeypatch.setattr(blocks_module, "prune_model", lambda *args: pytest.fail("a cut was measured again"))
    capsys.readouterr()
    setup = build_setup(search_config(per_layer_search / "teacher", tmp_path / "other", "search.seed=7"))
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("block library:"))
    assert f"{cuts} single-block cuts (0 measured now, {cuts} cached) on 8 selection documents (the last 32 of" in line
    assert "MIP: 4 picks, the best predicted KL" in line
    assert {json.dumps(a.as_dict()): who for a, who in setup.seeds.items()} == seeds
    assert len(list((per_layer_search / "cache" / "blocks").glob("*.jsonl"))) == 1
    assert describe(setup)[0].startswith("uniform space (the reference cuts only): ")  # not the per-layer space

    # every trial's predicted KL: the sum of its blocks' KL in the cache (the teacher's own blocks: 0), or none
    measured = {(b["layer"], b["kind"], b["size"]): b["kl"] for b in map(json.loads, library.read_text().splitlines())}
    records = read_records(run_dir)
    for record in records:
        shape = shape_of(record.architecture)
        if not isinstance(shape, PerLayerArchitecture) or shape.hidden_size != 64:
            assert record.predicted_kl is None, record.label
            continue
        sizes = [(layer.num_key_value_heads, layer.intermediate_size) for layer in shape.layers]
        blocks = [block for i, (kv, ffn) in enumerate(sizes) for block in ((i, "attention", kv), (i, "ffn", ffn))]
        assert record.predicted_kl == pytest.approx(sum(measured.get(block, 0.0) for block in blocks), rel=1e-12)
        assert all(block in measured or block[2] in (2, 96) for block in blocks)
    final = [r for r in records if r.state == "complete" and r.predicted_kl is not None]
    assert len(final) >= 3 and any(r.predicted_kl is None for r in records)  # the width-only reference: uniform
    early, late = [r.predicted_kl for r in final], [r.final["heldout_kl"] for r in final]
    line = (
        "rank agreement of the block library's predicted KL (summed block costs, no KD) with the last rung: Spearman "
        f"{spearmanr(early, late).statistic:.2f}, Kendall {kendalltau(early, late).statistic:.2f} over {len(final)} "
        "trials"
    )
    assert line in [text.strip() for text in summary_lines(load_study(run_dir), setup)]


def test_the_library_on_fewer_documents_and_positions_is_another_cache_and_bad_block_settings_are_one_line(
    search_teacher, tmp_path, capsys
):
    setup = build_setup(search_config(search_teacher, tmp_path / "run", "search.blocks.documents=3",
                                      "search.blocks.positions=5", "search.blocks.mip_solutions=2",
                                      "search.blocks.proportional=false"))  # fmt: skip
    assert "on 3 selection documents (the last 5 of their 32 positions scored)" in capsys.readouterr().out
    assert list(setup.seeds.values()) == ["mip", "mip"]
    (library,) = (tmp_path / "cache" / "blocks").glob("*.jsonl")
    assert all(len(json.loads(line)["kl_per_doc"]) == 3 for line in library.read_text().splitlines())
    for override, message in [
        ("search.blocks.positions=0", "search.blocks.documents and positions must be at least 1"),
        ("search.blocks.differ_by=0", "search.blocks.mip_solutions and differ_by must be at least 1"),
        ("search.space.hidden_size={choices:[48]}", "search.blocks needs the teacher's hidden size 64"),
    ]:
        assert main([*search_args(search_teacher, tmp_path / "bad", *PER_LAYER), override]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not (tmp_path / "bad").exists()


def test_the_hetero_cpu_preset_composes_on_the_cpu_preset_and_its_space_suits_the_block_library(tmp_path, capsys):
    cfg = compose("pipeline", ["preset=hetero-cpu"])
    check(cfg)
    search = settings_of(cfg, "search")
    assert (search.proposals, search.budget.params, search.blocks.enabled) == ("per_layer", 0.6, True)
    assert (search.blocks.documents, search.blocks.positions) == (8, 32)
    assert (cfg.data.selection_docs, search.budget.window, search.n_trials) == (64, 0.05, 8)  # the cpu preset's
    for params in (0.6, 0.4):  # the default teacher's shape, at both budgets of the issue
        budget = replace(search.budget, params=params)
        space = LayerSpace.of(search.space.per_layer, search.space.hidden_size.choices, SMOLLM2, budget)
        check_blocks(space, SMOLLM2)  # the teacher's hidden size is reachable: the library's picks are candidates
        assert space_variants(space) == BlockVariants(ffn=(0, 384, 768, 1152, 1536), kv_groups=(0, 1, 2, 3))
    run_dir = tmp_path / "hetero"
    assert main(["pipeline", "preset=hetero-cpu", f"run_dir={run_dir}", "search.blocks.positions=0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["slimnas: error: search.blocks.documents and positions must be at least 1, or null for all"]
    assert not run_dir.exists()


RETRAIN = [
    "precision=fp32", "distill.batch_size=4", "quality.tasks=[]", "speed.prompt_len=16", "speed.new_tokens=4",
    "speed.repeats=2", "retrain.new_tokens=4", "retrain.top_k=1", "retrain.references=false",
    "retrain.budget_tokens=512",
]  # fmt: skip


def test_the_per_layer_pick_retrains_to_a_checkpoint_transformers_loads(per_layer_search, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    shutil.copytree(per_layer_search / "run", run_dir)
    monkeypatch.setenv("SLIMNAS_CACHE", str(per_layer_search / "cache"))
    assert main(["retrain", str(run_dir), *RETRAIN]) == 0
    pick = search_pick(run_dir, read_records(run_dir))
    (retrained,) = [r for r in read_retrained(run_dir) if r.name != "teacher"]
    assert retrained.trial == pick.trial and retrained.architecture == pick.architecture
    model_dir = run_dir / "retrain" / f"{pick.trial:04d}" / "model"
    kept = [layer for layer in shape_of(pick.architecture).layers if layer.kept]
    assert len(set(kept)) > 1  # so it is saved in the per-layer format
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == "slimnas_llama" and config["per_layer_config"]  # transformers' per-layer format
    import slimnas.models  # noqa: F401 (registers the per-layer model types with transformers)

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert list(PerLayerArchitecture.of(model.config).layers) == kept
    assert sum(p.numel() for p in model.parameters()) == retrained.params == pick.params
    with torch.no_grad():
        logits = model(torch.tensor([[5, 6, 7, 8]])).logits
    assert logits.shape == (1, 4, 300) and torch.isfinite(logits).all()

    out = tmp_path / "report"
    assert main(["report", str(run_dir), f"out={out}"]) == 0
    board = pd.read_csv(out / "leaderboard.csv")
    assert "retrained" in set(board[board.label == pick.label].stage)

    # the finalists' per-layer widths: a heat map beside the front, its cells the records' sizes
    assert {p.name for p in (out / "plots" / "run").glob("layer_widths.*")} == {"layer_widths.png", "layer_widths.svg"}
    page = (out / "index.html").read_text()
    front, plots = page.index("<h2>Front and rank fidelity"), page.index("<h2>Plots")
    assert front < page.index('alt="Per-layer widths of the finalists"') < plots
    figure = layer_widths(read_runs([run_dir])[0])
    ffn, kv = (ax.images[0].get_array() for ax in figure.axes if ax.images)
    assert ffn.tolist() == [[width / 96 if width else None for width in pick.architecture["intermediate_size"]]]
    assert kv.tolist() == [[groups or None for groups in pick.architecture["num_key_value_heads"]]]  # None: masked
    crosses = sum(text.get_text() == "×" for ax in figure.axes for text in ax.texts)
    assert crosses == sum(not width for width in pick.architecture["intermediate_size"]) + sum(
        not groups for groups in pick.architecture["num_key_value_heads"]
    )


def test_seed_shapes_are_screened_with_the_sample_and_one_outside_the_budget_is_refused(search_teacher, tmp_path):
    """The hook an optimiser fills (SearchSetup.seeds): its shapes join the screen, and lead as proposed by "seed"."""
    setup = build_setup(search_config(search_teacher, tmp_path / "run", "search.blocks.enabled=false"))
    assert setup.seeds == {}
    seed = setup.layer_space.random(random.Random(123))
    seeded = replace(setup, seeds={seed: "seed"})
    screened = PerLayer().screen(seeded)
    assert seed in [s.arch for s in screened] and len(screened) in (8, 9)
    others = [s for s in screened if s.arch != seed]
    first = PerLayer().first(seeded, [Screened(seed, 0.0, 0.0, [0.0], 0.0), *others])  # the seed screened best
    assert [who for _, who in first] == ["seed", "screen", "screen", "screen"]  # search.screen.top_k
    too_big = PerLayerArchitecture(64, (LayerShape(96, 4, 2),) * 4)  # the teacher itself
    with pytest.raises(SlimnasError, match="outside the budget"):
        PerLayer().screen(replace(setup, seeds={too_big: "seed"}))


def test_a_killed_per_layer_search_resumes_and_completes_the_killed_candidate(search_teacher, tmp_path):
    run_dir = tmp_path / "run"
    args = search_args(
        search_teacher, run_dir, *PER_LAYER, "search.n_trials=2", "search.screen.top_k=1", "search.references.kinds=[]",
        "search/sampler=random", "search.race.rung_tokens=[1024,4096]",
    )  # fmt: skip
    process = slimnas_process(*args)
    wait_until(lambda: [t for t in load_study(run_dir).get_trials(states=(TrialState.RUNNING,))
                        if rung_key(0) in t.user_attrs], process)  # fmt: skip
    os.kill(process.pid, signal.SIGKILL)
    process.finish()
    (killed,) = load_study(run_dir).get_trials(states=(TrialState.RUNNING,))
    assert isinstance(shape_of(killed.user_attrs["architecture"]), PerLayerArchitecture)

    returncode, output = slimnas_process(*args).finish()
    assert returncode == 0, output
    study = load_study(run_dir)
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
    assert study.trials[killed.number].state == TrialState.FAIL
    (retry,) = [t for t in study.trials if t.user_attrs.get("retry_of") == killed.number]
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["state"] == "complete"
    assert retry.user_attrs["architecture"] == killed.user_attrs["architecture"] and retry.params == killed.params
    ran = [t for t in study.trials if t.user_attrs.get("architecture") == killed.user_attrs["architecture"]
           and t.state == TrialState.COMPLETE and t.user_attrs.get("state") != "screened"]  # fmt: skip
    assert ran == [retry] and len(reached_last_rung(study)) >= 2
    records = {r.trial: r for r in read_records(run_dir)}
    assert (
        records[killed.number].state == "failed"
        and records[retry.number].architecture == retry.user_attrs["architecture"]
    )
