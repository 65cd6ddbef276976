"""A search on a tiny teacher: budget, front, records, halving, failures, bad input."""

import json
import time

import pandas as pd
import pytest
from conftest import load_study, reached_last_rung, search_args
from optuna.trial import TrialState
from transformers import AutoConfig

import slimnas.search.study
from slimnas.cli import main
from slimnas.compress.arch import Architecture, param_count
from slimnas.search.objectives import dominates, pareto_front
from slimnas.search.records import read_records
from slimnas.search.study import promoted


@pytest.fixture(scope="module")
def finished_search(tmp_path_factory):
    """One 6-trial TPE search shared by the tests that only read it."""
    from conftest import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("search")
    teacher = save_tiny_checkpoint(root / "teacher", max_position_embeddings=512)
    run_dir = root / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLIMNAS_CACHE", str(root / "cache"))
        assert main(search_args(teacher, run_dir, "search.n_trials=6", "search.sampler=tpe")) == 0
    return teacher, run_dir


def test_every_candidate_that_reached_the_last_rung_meets_the_budget(finished_search):
    teacher, run_dir = finished_search
    done = reached_last_rung(load_study(run_dir))
    assert len(done) == 6
    config = AutoConfig.from_pretrained(teacher)
    target = 0.7 * param_count(config)
    for trial in done:
        arch = Architecture(**trial.user_attrs["architecture"])
        assert abs(param_count(config, arch) - target) <= 0.3 * target
        assert trial.values[1] == param_count(config, arch)
    assert len({tuple(sorted(t.user_attrs["architecture"].items())) for t in done}) == len(done)


def test_the_rungs_are_points_on_one_kd_run_and_leave_no_checkpoint(finished_search):
    _, run_dir = finished_search
    for record in read_records(run_dir):
        if record.state != "complete":
            continue
        stages = {s["stage"]: s for s in record.stages}
        assert list(stages) == ["prune", "screen", "kd_1", "kd_2", "speed"]
        assert (stages["kd_1"]["kd_tokens"], stages["kd_2"]["kd_tokens"], record.kd_tokens) == (128, 384, 384)
        assert all(stages[name]["heldout"]["split"] == "selection" for name in ("screen", "kd_1", "kd_2"))
        assert not list((run_dir / "trials" / f"{record.trial:04d}").rglob("*.safetensors"))


def test_the_reported_front_is_the_exact_front_of_the_records(finished_search):
    _, run_dir = finished_search
    complete = [r for r in read_records(run_dir) if r.state == "complete"]
    expected = {
        r.trial
        for r in complete
        if not any(
            o.final["quality"] >= r.final["quality"] and o.params <= r.params and o is not r
            and (o.final["quality"], o.params) != (r.final["quality"], r.params)
            for o in complete
        )
    }  # fmt: skip
    assert set(pd.read_csv(run_dir / "pareto.csv").trial) == expected
    study = {t.number: t.values for t in reached_last_rung(load_study(run_dir))}
    assert all(study[r.trial] == [r.final["quality"], r.params] for r in complete)


def test_the_tables_are_derived_from_the_records(finished_search):
    _, run_dir = finished_search
    table = pd.read_csv(run_dir / "trials.csv").set_index("trial")
    for record in read_records(run_dir):
        row = table.loc[record.trial]
        assert row.state == record.state and row.params == record.params and row.kd_tokens == record.kd_tokens
        assert row.quality == pytest.approx(record.final["quality"])
        assert row.heldout_kl_stderr == pytest.approx(record.final["heldout_kl_stderr"])
    assert json.loads((run_dir / "run.json").read_text())["corpus"]["source"] == "builtin"


def test_references_run_to_the_last_rung_with_their_ratios(finished_search):
    _, run_dir = finished_search
    references = [r for r in read_records(run_dir) if r.reference]
    kinds = {kind for r in references for kind in r.reference.split("+")}
    assert {"depth_only", "width_only", "zero_shot"} <= kinds
    assert all(r.state == "complete" for r in references)
    depth = next(r for r in references if "depth_only" in r.reference)
    assert depth.pruning["depth_strategy"] == "contiguous"
    screened = json.loads((run_dir / "zero_shot.json").read_text())["scores"]
    assert len(screened) == 3 and screened == sorted(screened, key=lambda s: s["heldout_kl"])


def test_the_sampler_learns_only_from_evidence(finished_search):
    """Rejected proposals are FAIL (samplers skip them); stopped ones carry their rung values, flagged infeasible."""
    _, run_dir = finished_search
    study = load_study(run_dir)
    for trial in study.trials:
        if "rejected" in trial.user_attrs:
            assert trial.state == TrialState.FAIL
        elif trial.state == TrialState.COMPLETE:
            rung = 0 if trial.user_attrs["stage"] == "screen" else int(trial.user_attrs["stage"].split("_")[1])
            assert trial.constraints["rungs_missed"] == 2 - rung  # 0 for a trial that reached the last rung
            assert trial.values[0] == trial.user_attrs[f"rung_{rung}"]  # its value where it ended


def test_proposals_are_feasible_by_construction(finished_search):
    """The sampler picks a position in the band of FFN sizes the budget leaves: few proposals are wasted."""
    _, run_dir = finished_search
    study = load_study(run_dir)
    proposed = [t for t in study.trials if t.user_attrs.get("proposed_by") == "sampler"]
    infeasible = [t for t in proposed if t.user_attrs.get("rejected") == "infeasible under the budget"]
    assert proposed and len(infeasible) <= len(proposed) // 2


def test_rerunning_a_finished_search_changes_nothing(finished_search, monkeypatch):
    teacher, run_dir = finished_search
    monkeypatch.setenv("SLIMNAS_CACHE", str(run_dir.parent / "cache"))
    before = len(load_study(run_dir).trials)
    assert main(search_args(teacher, run_dir, "search.n_trials=6", "search.sampler=tpe")) == 0
    assert len(load_study(run_dir).trials) == before


def test_the_same_study_with_other_settings_is_refused(finished_search, monkeypatch, capsys):
    teacher, run_dir = finished_search
    monkeypatch.setenv("SLIMNAS_CACHE", str(run_dir.parent / "cache"))
    before = len(load_study(run_dir).trials)
    assert main(search_args(teacher, run_dir, "search.n_trials=6", "search.sampler=tpe", "distill.lr=1e-3")) == 2
    assert "created with other search settings" in capsys.readouterr().err
    assert len(load_study(run_dir).trials) == before


def test_promotion_keeps_the_top_1_over_eta_of_the_peers():
    assert promoted(0.5, [], eta=2, min_peers=2)  # too few peers: always
    assert promoted(0.9, [0.1, 0.2, 0.3], eta=2, min_peers=2)
    assert not promoted(0.0, [0.1, 0.2, 0.3], eta=2, min_peers=2)
    assert promoted(0.25, [0.1, 0.2, 0.3], eta=2, min_peers=2)  # rank 1 of 4: top half
    assert not promoted(0.15, [0.1, 0.2, 0.3], eta=2, min_peers=2)  # rank 2 of 4


def test_every_stopped_trial_ranked_below_the_cut_when_it_was_stopped(search_teacher, tmp_path):
    run_dir = tmp_path / "run"
    args = search_args(
        search_teacher, run_dir, "search.n_trials=6", "search.sampler=random", "search.fidelity.screen=stop"
    )
    assert main(args) == 0
    trials = sorted(load_study(run_dir).trials, key=lambda t: t.number)
    stopped = 0
    for trial in trials:
        if trial.state != TrialState.COMPLETE or trial.user_attrs.get("reference"):
            continue
        for rung in (0, 1):
            if f"rung_{rung}" not in trial.user_attrs:
                continue
            peers = [
                p.user_attrs[f"rung_{rung}"]
                for p in trials
                if p.number < trial.number and f"rung_{rung}" in p.user_attrs
            ]
            reached = 0 if trial.user_attrs["stage"] == "screen" else int(trial.user_attrs["stage"].split("_")[1])
            went_on = reached > rung
            assert went_on == promoted(trial.user_attrs[f"rung_{rung}"], peers, eta=2, min_peers=2), trial.number
            stopped += not went_on
    assert stopped >= 1


def test_a_failing_trial_is_recorded_with_its_reason_and_the_search_completes(search_teacher, tmp_path, monkeypatch):
    real_run_trial = slimnas.search.study.run_trial
    calls = {"n": 0}

    def flaky(setup, number, arch, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated out of memory")
        return real_run_trial(setup, number, arch, *args, **kwargs)

    monkeypatch.setattr(slimnas.search.study, "run_trial", flaky)
    run_dir = tmp_path / "run"
    assert main(search_args(search_teacher, run_dir, "search.n_trials=4", "search.sampler=random")) == 0
    failed = [r for r in read_records(run_dir) if r.state == "failed"]
    assert len(failed) == 1 and failed[0].fail_reason == "RuntimeError: simulated out of memory"
    assert failed[0].params > 0 and failed[0].architecture  # the same shape as every record
    assert len(reached_last_rung(load_study(run_dir))) == 4
    trials = pd.read_csv(run_dir / "trials.csv")
    assert trials[trials.state == "failed"].fail_reason.tolist() == ["RuntimeError: simulated out of memory"]


def test_a_search_whose_every_trial_fails_ends_with_one_line(search_teacher, tmp_path, monkeypatch, capsys):
    def broken(setup, number, arch, *args, **kwargs):
        raise ValueError("misconfigured")

    monkeypatch.setattr(slimnas.search.study, "run_trial", broken)
    run_dir = tmp_path / "run"
    assert main(search_args(search_teacher, run_dir, "search.n_trials=4", "search.sampler=random")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "3 trials in a row failed, the last with: ValueError: misconfigured" in err
    assert len(read_records(run_dir)) == 3


def test_a_candidate_that_keeps_failing_is_given_up_after_max_attempts(search_teacher, tmp_path, monkeypatch):
    """Three candidates, one of which always fails: it is tried max_attempts times, then counts as evaluated."""
    real_run_trial = slimnas.search.study.run_trial
    cursed = Architecture(64, 80, 4, 2, 4)

    def fails_for_one(setup, number, arch, *args, **kwargs):
        if arch == cursed:
            time.sleep(0.2)  # work done before failing: the record counts it
            raise RuntimeError("always fails")
        return real_run_trial(setup, number, arch, *args, **kwargs)

    monkeypatch.setattr(slimnas.search.study, "run_trial", fails_for_one)
    run_dir = tmp_path / "run"
    space = [
        "search.space.hidden_size={choices:[64]}", "search.space.intermediate_size={choices:[64,80,96]}",
        "search.space.num_attention_heads={choices:[4]}", "search.space.num_key_value_heads={choices:[2]}",
        "search.space.num_hidden_layers={choices:[4]}", "search.budget.params=0.9", "search.budget.window=0.15",
    ]  # fmt: skip
    args = search_args(
        search_teacher, run_dir, *space, "search.n_trials=3", "search.sampler=random", "search.max_attempts=2",
        "search.references.kinds=[]", "search.max_failures_in_a_row=10",
    )  # fmt: skip
    assert main(args) == 0
    records = read_records(run_dir)
    assert [r.state for r in records if r.architecture == cursed.as_dict()] == ["failed", "failed"]
    assert all(0.2 <= r.seconds < 30 for r in records if r.state == "failed")
    assert sorted(r.architecture["intermediate_size"] for r in records if r.state == "complete") == [64, 96]


def test_hidden_state_loss_works_for_width_pruned_candidates(search_teacher, tmp_path):
    run_dir = tmp_path / "run"
    args = search_args(search_teacher, run_dir, "search.n_trials=2", "search.sampler=random",
                       "distill.teacher_mode=live", "distill.hidden_weight=1.0", "distill.hidden_layers=[-1]",
                       "search.measure_speed=false")  # fmt: skip
    assert main(args) == 0
    complete = [r for r in read_records(run_dir) if r.state == "complete"]
    assert len(complete) >= 2 and any(r.architecture["hidden_size"] < 64 for r in complete)


@pytest.mark.parametrize(
    "override, message",
    [
        ("search.budget.params=0.05", "budget unreachable"),
        ("search.space.hidden_size={choices:[1000]}", "invalid search space"),
        ("search.space.num_hidden_layers={choices:null,max_prune:1.5}", "invalid search space"),
        ("search.objectives=[speediness]", "unknown objective"),
        ("search.fidelity.rung_tokens=[128,200]", "at least one KD step (128 tokens)"),
        ("search.sampler=bogus", "unknown sampler"),
        ("search.fidelity.screen=halve", "rank or stop"),
        ("precision=bogus", "precision must be one of"),
        ("distill.top_k=0", "distill.top_k must be at least 1"),
        ("search.references.kinds=[uniform,fancy]", "unknown reference kind"),
    ],
)
def test_invalid_settings_fail_before_anything_is_written(search_teacher, tmp_path, capsys, override, message):
    run_dir = tmp_path / "run"
    assert main([*search_args(search_teacher, run_dir), override]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("slimnas: error:") and message in err
    assert not run_dir.exists()


def test_a_storage_nobody_listens_on_fails_before_any_compute(search_teacher, tmp_path, capsys):
    url = "postgresql://nobody@127.0.0.1:9/none"
    assert main([*search_args(search_teacher, tmp_path / "run"), f"search.storage.url={url}"]) == 2
    assert "cannot open study storage" in capsys.readouterr().err
    assert not (tmp_path / "cache" / "importance").exists()


def test_pareto_front_helper():
    points = {0: [1.0, 10.0], 1: [2.0, 20.0], 2: [0.5, 15.0], 3: [2.0, 20.0]}
    assert pareto_front(points, ["maximize", "minimize"]) == [0, 1, 3]
    assert dominates([2.0, 5.0], [1.0, 5.0], ["maximize", "minimize"])
    assert not dominates([2.0, 5.0], [2.0, 5.0], ["maximize", "minimize"])
