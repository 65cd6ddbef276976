"""A search on a tiny teacher: the screen, the race, the KD budget, the front, records, failures, bad input."""

import json
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import SCREENSHOT_DIR, chrome, load_study, reached_last_rung, search_args
from optuna.trial import FrozenTrial, TrialState
from transformers import AutoConfig

import slimnas.search.study
from slimnas.cli import main
from slimnas.compress.arch import Architecture, param_count
from slimnas.compress.heldout import HeldoutMetrics, HeldoutSet
from slimnas.core.rundir import read_front, read_records
from slimnas.search.objectives import dominates, pareto_front
from slimnas.search.race import kd_spent, peers, rung_key, shortfall, verdict


@pytest.fixture(scope="module")
def finished_search(tmp_path_factory):
    """One 6-trial TPE search shared by the tests that only read it."""
    from conftest import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("search")
    teacher = save_tiny_checkpoint(root / "teacher", max_position_embeddings=512)
    run_dir = root / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLIMNAS_CACHE", str(root / "cache"))
        assert main(search_args(teacher, run_dir, "search.n_trials=6")) == 0
    return teacher, run_dir


def screen_lines(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "screen.jsonl").read_text().splitlines()]


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


def test_the_screens_best_are_the_first_trials(finished_search):
    _, run_dir = finished_search
    screened = sorted(screen_lines(run_dir), key=lambda line: (line["kl"], line["label"]))
    records = {r.trial: r for r in read_records(run_dir)}
    assert len(screened) > 4
    for rank in range(4):  # search.screen.top_k
        assert records[rank].architecture == screened[rank]["architecture"]
        assert records[rank].proposed_by == "screen"
        assert records[rank].rungs[0]["heldout"]["kl_per_doc"] == pytest.approx(screened[rank]["kl_per_doc"])
    assert records[0].reference == "zero_shot" and records[0].state == "complete"  # the screen's best: always run


def test_the_sampler_is_told_the_screen_and_learns_only_from_evidence(finished_search):
    """Rejected proposals are FAIL; stopped and screened-only candidates carry their values, flagged infeasible."""
    _, run_dir = finished_search
    study = load_study(run_dir)
    told = [t for t in study.trials if t.user_attrs.get("state") == "screened"]
    assert told and len(told) + sum(t.user_attrs.get("proposed_by") == "screen" for t in study.trials) >= len(
        screen_lines(run_dir)
    )
    for trial in study.trials:
        if "rejected" in trial.user_attrs:
            assert trial.state == TrialState.FAIL
        elif trial.state == TrialState.COMPLETE:
            rung = trial.user_attrs["rung"]
            per_doc = trial.user_attrs[rung_key(rung)]
            assert trial.values[0] == pytest.approx(-sum(per_doc) / len(per_doc))  # its quality where it ended
            assert trial.constraints["rungs_missed"] == pytest.approx(shortfall(2 - rung, trial.values[0]))
            assert (trial.constraints["rungs_missed"] <= 0) == (rung == 2)


def test_the_rungs_are_points_on_one_kd_run_and_leave_no_checkpoint(finished_search):
    _, run_dir = finished_search
    for record in read_records(run_dir):
        assert [r["rung"] for r in record.rungs] == list(range(record.rung + 1))
        assert [r["kd_tokens"] for r in record.rungs] == [0, 128, 384][: record.rung + 1]
        assert all(r["heldout"]["split"] == "selection" and r["heldout"]["documents"] == 8 for r in record.rungs)
        assert not list((run_dir / "trials" / f"{record.trial:04d}").rglob("*.safetensors"))


def test_every_stop_was_the_race_rule_at_the_time(finished_search):
    """A stopped candidate was worse than the best peer then known, with confidence, on the same documents."""
    _, run_dir = finished_search
    stopped = [r for r in read_records(run_dir) if r.state == "stopped"]
    for record in stopped:
        assert record.stop_reason.startswith("worse than trial ") and "one-sided p = " in record.stop_reason
        peer = int(record.stop_reason.split("trial ")[1].split()[0])
        peer_record = next(r for r in read_records(run_dir) if r.trial == peer)
        mine = record.rungs[record.rung]["heldout"]["kl_per_doc"]
        theirs = peer_record.rungs[record.rung]["heldout"]["kl_per_doc"]
        assert sum(mine) > sum(theirs)


def test_the_front_is_optunas_best_trials_stored_once(finished_search):
    _, run_dir = finished_search
    complete = [r for r in read_records(run_dir) if r.state == "complete"]
    expected = pareto_front({r.trial: [r.final["quality"], r.params] for r in complete}, ["maximize", "minimize"])
    front = json.loads((run_dir / "front.json").read_text())
    assert front["trials"] == expected == front["quality_params"] and front["objectives"] == ["quality", "params"]
    assert set(pd.read_csv(run_dir / "pareto.csv").trial) == set(expected)
    assert sorted(t.number for t in load_study(run_dir).best_trials) == expected


def test_the_tables_are_derived_from_the_records(finished_search):
    _, run_dir = finished_search
    table = pd.read_csv(run_dir / "trials.csv").set_index("trial")
    for record in read_records(run_dir):
        row = table.loc[record.trial]
        assert row.state == record.state and row.params == record.params and row.kd_tokens == record.kd_tokens
        assert row.quality == pytest.approx(record.final["quality"]) and row.rung == record.rung
        assert row.heldout_kl_stderr == pytest.approx(record.final["heldout_kl_stderr"])
    run = json.loads((run_dir / "run.json").read_text())
    assert run["corpus"]["source"] == "builtin"
    assert (run["corpus"]["selection_documents"], run["corpus"]["evaluation_documents"]) == (8, 8)


def test_references_run_to_the_last_rung(finished_search):
    _, run_dir = finished_search
    references = [r for r in read_records(run_dir) if r.reference]
    kinds = {kind for r in references for kind in r.reference.split("+")}
    assert {"depth_only", "width_only", "zero_shot"} <= kinds
    assert all(r.state == "complete" for r in references)
    depth = next(r for r in references if "depth_only" in r.reference)
    assert depth.pruning["depth_strategy"] == "contiguous"


def test_every_sampled_architecture_is_feasible(finished_search):
    teacher, run_dir = finished_search
    config = AutoConfig.from_pretrained(teacher)
    target = 0.7 * param_count(config)
    sampled = [t for t in load_study(run_dir).trials if t.user_attrs.get("proposed_by") == "sampler"]
    assert sampled
    for trial in sampled:
        arch = Architecture(**trial.user_attrs["architecture"])
        assert abs(param_count(config, arch) - target) <= 0.3 * target


def test_the_race_separates_the_leaders_or_says_why_not(finished_search):
    _, run_dir = finished_search
    race = json.loads((run_dir / "race.json").read_text())
    complete = sorted((r for r in read_records(run_dir) if r.state == "complete"), key=lambda r: -r.final["quality"])
    assert race["leaders"] == [complete[0].trial, complete[1].trial] and race["winner"] in race["leaders"]
    assert race["why"].startswith(("separated", "not separated"))


def test_rerunning_a_finished_search_changes_nothing(finished_search, monkeypatch):
    teacher, run_dir = finished_search
    monkeypatch.setenv("SLIMNAS_CACHE", str(run_dir.parent / "cache"))
    before = len(load_study(run_dir).trials)
    assert main(search_args(teacher, run_dir, "search.n_trials=6")) == 0
    assert len(load_study(run_dir).trials) == before


def test_the_same_study_with_other_settings_is_refused(finished_search, monkeypatch, capsys):
    teacher, run_dir = finished_search
    monkeypatch.setenv("SLIMNAS_CACHE", str(run_dir.parent / "cache"))
    before = len(load_study(run_dir).trials)
    assert main(search_args(teacher, run_dir, "search.n_trials=6", "distill.lr=1e-3")) == 2
    assert "created with other search settings" in capsys.readouterr().err
    assert len(load_study(run_dir).trials) == before


# The race's rule, on hand-made evidence -------------------------------------------------------------------


def peer(number: int, per_doc: list[float], params: int = 100, rung: int = 1) -> FrozenTrial:
    return FrozenTrial(
        number=number, state=TrialState.COMPLETE, value=None, values=[0.0], datetime_start=None, datetime_complete=None,
        params={}, distributions={}, user_attrs={rung_key(rung): per_doc, "params": params}, system_attrs={},
        intermediate_values={}, trial_id=number,
    )  # fmt: skip


def test_a_candidate_clearly_worse_on_every_document_is_stopped_and_an_equal_one_is_not():
    best = [1.0, 1.2, 0.8, 1.1, 0.9, 1.0]
    trials = [peer(0, best), peer(1, [x + 0.3 for x in best])]
    others = peers(trials, rung=1, number=7, params=100, any_size=True)
    assert sorted(others) == [0, 1]
    worse = [x + 0.2 + 0.01 * i for i, x in enumerate(best)]
    reason = verdict(worse, others, rung=1, looks=1, confidence=0.95)
    assert reason.startswith("worse than trial 0 at rung 1: KL +0.225") and "adjusted over 2 peer(s) x 1 rung" in reason
    assert verdict(list(best), others, rung=1, looks=1, confidence=0.95) is None  # equal on every document: goes on
    noisy = [x + d for x, d in zip(best, [0.1, -0.1, 0.05, -0.05, 0.02, -0.01], strict=True)]
    assert verdict(noisy, others, rung=1, looks=1, confidence=0.95) is None  # within noise: goes on
    assert peers(trials, rung=1, number=7, params=50, any_size=False) == {}  # only a smaller peer can stop it
    assert verdict(worse, {}, rung=1, looks=1, confidence=0.95) is None


def test_two_candidates_equal_on_every_document_both_reach_the_last_rung(search_teacher, tmp_path, monkeypatch):
    """The race only stops what the evidence separates: with equal per-document KL everywhere, nothing stops."""

    def equal(self, student):
        return HeldoutMetrics(
            self.split, len(self.rows), self.rows.numel(), 0.5, 0.1, 2.0, 0.1, [0.4, 0.6] * 4, [0.7] * 8
        )

    monkeypatch.setattr(HeldoutSet, "evaluate", equal)
    run_dir = tmp_path / "run"
    assert main(search_args(search_teacher, run_dir, "search.n_trials=5", "search.references.kinds=[]")) == 0
    records = read_records(run_dir)
    assert len(records) >= 5 and all(r.state == "complete" and r.rung == 2 for r in records)
    race = json.loads((run_dir / "race.json").read_text())
    assert race["why"] == "not separated after 2 extension(s)" and len(race["rounds"]) == 2  # more KD, still equal


def test_the_study_never_exceeds_its_kd_token_budget(search_teacher, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(search_args(search_teacher, run_dir, "search.n_trials=20", "search.budget.kd_tokens=2000")) == 0
    study = load_study(run_dir)
    records = read_records(run_dir)
    extension = sum(v for k, v in study.user_attrs.items() if k.startswith("extension_kd_tokens"))
    assert sum(r.kd_tokens for r in records) + extension <= kd_spent(study) <= 2000
    out = capsys.readouterr().out
    assert any(r.stop_reason and "KD budget" in r.stop_reason for r in records) or "KD budget is spent" in out
    # 20 trials at the last rung cannot fit in 2,000 tokens: the plan line does not promise the extension
    assert "no extension of the leaders' last rung" in out


def test_the_enumeration_runs_every_feasible_candidate_to_the_last_rung(search_teacher, tmp_path):
    space = [
        "search.space.hidden_size={choices:[64]}", "search.space.intermediate_size={choices:[64,80,96]}",
        "search.space.num_attention_heads={choices:[4]}", "search.space.num_key_value_heads={choices:[2]}",
        "search.space.num_hidden_layers={choices:[3,4]}", "search.budget.params=0.85", "search.budget.window=0.2",
    ]  # fmt: skip
    run_dir = tmp_path / "run"
    assert (
        main(search_args(search_teacher, run_dir, *space, "search.proposals=enumerate", "search.references.kinds=[]"))
        == 0
    )
    records = read_records(run_dir)
    assert len(records) == len(screen_lines(run_dir)) >= 3 and all(r.state == "complete" for r in records)
    assert not (run_dir / "race.json").exists()


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
    assert main(search_args(search_teacher, run_dir, "search.n_trials=4")) == 0
    failed = [r for r in read_records(run_dir) if r.state == "failed"]
    assert len(failed) == 1 and failed[0].fail_reason == "RuntimeError: simulated out of memory"
    assert failed[0].params > 0 and failed[0].architecture  # the same shape as every record
    assert len(reached_last_rung(load_study(run_dir))) >= 4  # every queued first trial runs, then the sampler's
    trials = pd.read_csv(run_dir / "trials.csv")
    assert trials[trials.state == "failed"].fail_reason.tolist() == ["RuntimeError: simulated out of memory"]


def test_a_search_whose_every_trial_fails_ends_with_one_line(search_teacher, tmp_path, monkeypatch, capsys):
    def broken(setup, number, arch, *args, **kwargs):
        raise ValueError("misconfigured")

    monkeypatch.setattr(slimnas.search.study, "run_trial", broken)
    run_dir = tmp_path / "run"
    assert main(search_args(search_teacher, run_dir, "search.n_trials=4")) == 2
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
        search_teacher, run_dir, *space, "search.n_trials=3", "search.max_attempts=2",
        "search.references.kinds=[]", "search.max_failures_in_a_row=10",
    )  # fmt: skip
    assert main(args) == 0
    records = read_records(run_dir)
    assert [r.state for r in records if r.architecture == cursed.as_dict()] == ["failed", "failed"]
    assert all(0.2 <= r.seconds < 30 for r in records if r.state == "failed")
    assert sorted(r.architecture["intermediate_size"] for r in records if r.state == "complete") == [64, 96]


def test_an_nsga2_search_by_configuration_alone(search_teacher, tmp_path):
    run_dir = tmp_path / "run"
    assert main(search_args(search_teacher, run_dir, "search.n_trials=5", "search/sampler=nsga2")) == 0
    assert len(reached_last_rung(load_study(run_dir))) == 5
    assert (
        "NSGAIISampler" in json.loads((run_dir / "run.json").read_text())["settings"]["search"]["sampler"]["_target_"]
    )


def test_hidden_state_loss_works_for_width_pruned_candidates(search_teacher, tmp_path):
    run_dir = tmp_path / "run"
    args = search_args(
        search_teacher, run_dir, "search.n_trials=2", "distill.teacher_mode=live", "distill.hidden_weight=1.0",
        "distill.hidden_layers=[-1]", "search.measure_speed=false",
    )  # fmt: skip
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
        ("search.race.rung_tokens=[128,200]", "at least one KD step (128 tokens)"),
        ("search/sampler=bogus", "Could not find 'search/sampler/bogus'"),
        ("search.race.confidence=1.5", "search.race.confidence must be in"),
        ("search.proposals=everything", "search.proposals must be one of"),
        ("precision=bogus", "precision must be one of"),
        ("distill.top_k=0", "distill.top_k must be at least 1"),
        ("search.references.kinds=[uniform,fancy]", "unknown reference kind"),
        ("search.n_trials=many", "search.n_trials"),
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


def test_optuna_dashboards_own_page_puts_only_last_rung_candidates_on_its_pareto_front(finished_search):
    """optuna-dashboard's server and page in headless Chromium: its Pareto front is the search's front, and no plot
    trace mixes candidates that reached the last rung with stopped or screened-only ones (stopped candidates are
    COMPLETE trials made infeasible by their constraints, which the dashboard must read)."""
    import re
    import threading
    import time
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    import optuna_dashboard

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args):
            pass

    _, run_dir = finished_search
    driver = chrome()
    app = optuna_dashboard.wsgi(f"sqlite:///{run_dir / 'study.db'}")
    server = make_server("127.0.0.1", 0, app, handler_class=Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    script = """const g = document.getElementById('graph-pareto-front');
                return g && g.data ? g.data.map(t => (t.hovertext || t.text || []).join(' ')) : null"""
    try:
        driver.get(f"http://127.0.0.1:{server.server_port}/dashboard/studies/{load_study(run_dir)._study_id}")
        traces, deadline = None, time.time() + 60
        while not traces and time.time() < deadline:
            traces = driver.execute_script(script)
            time.sleep(0.5)
        if SCREENSHOT_DIR:
            driver.save_screenshot(str(Path(SCREENSHOT_DIR) / "optuna-dashboard.png"))
    finally:
        driver.quit()
        server.shutdown()
    assert traces, "the dashboard drew no Pareto front"
    members = [{int(n) for n in re.findall(r'number": (\d+)', text)} for text in traces]
    last_rung = {t.number for t in reached_last_rung(load_study(run_dir))}
    assert set(read_front(run_dir)["trials"]) in members  # one trace is exactly the search's front
    for trace in members:
        assert trace <= last_rung or not trace & last_rung, trace  # never last-rung and stopped candidates together


def test_the_study_opens_in_optuna_dashboard_with_named_objectives_and_readable_attributes(finished_search):
    """Through optuna-dashboard's own WSGI entry point, as its server would serve the study."""
    from wsgiref.util import setup_testing_defaults

    import optuna_dashboard

    _, run_dir = finished_search
    app = optuna_dashboard.wsgi(f"sqlite:///{run_dir / 'study.db'}")

    def get(path: str) -> dict:
        environ = {"PATH_INFO": path, "REQUEST_METHOD": "GET"}
        setup_testing_defaults(environ)
        status = []
        body = b"".join(app(environ, lambda code, headers, exc_info=None: status.append(code)))
        assert status == ["200 OK"], (path, status, body[:200])
        return json.loads(body)

    (summary,) = get("/api/studies")["study_summaries"]
    study = get(f"/api/studies/{summary['study_id']}")
    assert study["objective_names"] == ["quality", "params"]
    records = {r.trial: r for r in read_records(run_dir)}
    for trial in study["trials"]:
        attrs = {a["key"]: a["value"] for a in trial["user_attrs"]}
        if trial["number"] in records:  # a candidate that ran: what it is, how far it got, why it stopped
            record = records[trial["number"]]
            assert attrs["label"] == record.label and attrs["state"] == record.state
            assert float(attrs[f"rung_{record.rung}_kl"]) == pytest.approx(record.final["heldout_kl"], abs=1e-6)
            assert attrs.get("stop_reason") == record.stop_reason
