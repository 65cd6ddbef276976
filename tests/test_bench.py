import json
import socket
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
from conftest import FAST, SHARED_DATA, needs_data, tiny_model, tiny_tokenizer

from slimnas.bench.memory import measure_memory
from slimnas.bench.quality import ScoreRecord, pool, score_model, subset, summary_score
from slimnas.bench.settings import QualitySettings, SpeedSettings
from slimnas.bench.speed import compare_speed, measure_speed
from slimnas.bench.tasks import SUITE, lm_eval_tasks_dir, prepare_suite
from slimnas.cli import main
from slimnas.core.errors import SlimnasError

MULTIPLE_CHOICE = ["piqa", "arc_easy_dev", "arc_challenge_dev", "hellaswag"]


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    if not (SHARED_DATA / "SOURCES.md").is_file():
        pytest.skip(f"benchmark data not found at {SHARED_DATA}")
    return prepare_suite(list(SUITE), str(SHARED_DATA))


def test_prepared_local_data_matches_the_published_splits(suite):
    assert suite.sizes == {
        "lambada_openai": 5153, "piqa": 1838, "arc_easy_dev": 570, "arc_challenge_dev": 299, "hellaswag": 10042,
        "wikitext": 62,
    }  # fmt: skip
    assert suite.splits["arc_easy_dev"] == "validation" and suite.splits["lambada_openai"] == "test"
    assert suite.lm_eval_names["piqa"] == "slimnas_piqa" and suite.source == str(SHARED_DATA)


def test_local_tasks_are_lm_evals_own_definitions(suite):
    """Prompt, target, choices, preprocessing and metrics come from the installed lm-eval's YAML."""
    from pathlib import Path

    from lm_eval.tasks._yaml_loader import load_yaml

    for task in SUITE:
        local = load_yaml(Path(suite.manager.include_path) / f"{task}.yaml", resolve_func=False)
        official = load_yaml(lm_eval_tasks_dir() / SUITE[task].lm_eval_yaml, resolve_func=False)
        for key in ("doc_to_text", "doc_to_target", "doc_to_choice", "metric_list", "output_type", "process_docs"):
            assert local.get(key) == official.get(key), (task, key)
        assert local["dataset_path"] == "json" and official["dataset_path"] != "json"


def test_a_local_document_reads_as_lm_evals_template_renders_it(suite):
    """What lm-eval builds from our ARC file equals its own template applied to the same document."""
    from lm_eval.tasks._yaml_loader import load_yaml
    from lm_eval.utils import apply_template

    name = suite.lm_eval_names["arc_easy_dev"]
    task = suite.manager.load([name])["tasks"][name]
    doc = next(iter(task.test_docs()))
    official = load_yaml(lm_eval_tasks_dir() / SUITE["arc_easy_dev"].lm_eval_yaml, resolve_func=False)
    assert task.doc_to_text(doc) == apply_template(official["doc_to_text"], doc)
    assert task.doc_to_choice(doc) == doc["choices"]["text"]
    assert task.doc_to_target(doc) == doc["choices"]["label"].index(doc["answerKey"])


def test_hellaswag_documents_become_lm_evals_queries(suite):
    task = suite.manager.load([suite.lm_eval_names["hellaswag"]])["tasks"][suite.lm_eval_names["hellaswag"]]
    first = next(iter(task.test_docs()))
    assert first["query"] == "Roof shingle removal: A man is sitting on a roof. He"
    assert first["choices"][3] == "starts pulling up roofing on a roof." and int(first["gold"]) == 3


def test_whole_suite_scores_a_tiny_model_with_sockets_blocked(suite, tmp_path, no_network):
    model = tiny_model(vocab_size=300, max_position_embeddings=4096)
    quality = QualitySettings(limit=3)
    records = score_model(model, tiny_tokenizer(300), suite, quality, "evaluation", "tiny", log_to=tmp_path / "log")
    by_key = {(r.task, r.metric): r for r in records}
    for task in MULTIPLE_CHOICE:
        for metric in ("acc", "acc_norm"):
            record = by_key[(task, metric)]
            assert 0 <= record.value <= 1 and record.n == 3 and record.stderr is not None and record.seconds > 0
            assert record.split == suite.splits[task] and record.pool == "evaluation"
    assert by_key[("lambada_openai", "perplexity")].value > 1
    assert by_key[("wikitext", "word_perplexity")].value > 1 and by_key[("wikitext", "bits_per_byte")].value > 0
    assert (tmp_path / "log").stat().st_size > 0  # lm-eval's own output went to the log, not the screen


def test_no_document_is_in_both_pools_and_subsets_are_fixed_by_seed():
    for n_docs in (570, 1838, 7):
        selection, evaluation = pool(n_docs, 0.3, 0, "selection"), pool(n_docs, 0.3, 0, "evaluation")
        assert not set(selection) & set(evaluation) and sorted(selection + evaluation) == list(range(n_docs))
        assert len(selection) == round(0.3 * n_docs)
    trial, final = subset(570, 0.3, 0, "selection", 40), subset(570, 0.3, 0, "evaluation", 200)
    assert len(trial) == 40 and len(final) == 200 and not set(trial) & set(final)  # what chose never reports
    assert trial == sorted(trial) == subset(570, 0.3, 0, "selection", 40) != subset(570, 0.3, 1, "selection", 40)
    assert subset(570, 0.3, 0, "evaluation", None) == sorted(pool(570, 0.3, 0, "evaluation"))


def test_summary_score_normalises_by_chance_and_names_what_it_leaves_out():
    records = [
        ScoreRecord("m", "piqa", "validation", "evaluation", "acc_norm", 0.75, 0.05, 10, 1.0),  # (0.75 - 0.5) / 0.5
        ScoreRecord("m", "arc_easy_dev", "validation", "evaluation", "acc_norm", 0.25, 0.03, 10, 1.0),  # chance: 0
        ScoreRecord("m", "lambada_openai", "test", "evaluation", "acc", 0.4, 0.04, 10, 1.0),  # chance 0: 0.4
        ScoreRecord("m", "boolq", "lm-eval default", "evaluation", "acc", 0.6, 0.05, 10, 1.0),  # chance unknown here
    ]
    summary = summary_score(records)
    assert summary.value == pytest.approx((0.5 + 0.0 + 0.4) / 3)
    assert summary.stderr == pytest.approx(((0.05 / 0.5) ** 2 + (0.03 / 0.75) ** 2 + 0.04**2) ** 0.5 / 3)
    assert summary.tasks == ["lambada_openai", "piqa", "arc_easy_dev"] and summary.excluded == ["boolq"]
    only_boolq = summary_score([records[-1]])  # quality.tasks=[boolq]: no summary, and the scores stay
    assert (only_boolq.value, only_boolq.excluded) == (None, ["boolq"])


def test_missing_data_files_are_named(tmp_path):
    with pytest.raises(SlimnasError, match=r"missing benchmark data files: .*piqa/valid\.jsonl"):
        prepare_suite(["piqa"], str(tmp_path))


@needs_data
def test_unknown_task_is_a_clear_error(tmp_path, no_network):
    with pytest.raises(SlimnasError, match="unknown task"):
        prepare_suite(["piqa", "no_such_task_xyz"], str(SHARED_DATA))


def test_without_a_data_directory_the_standard_hub_tasks_are_used(tmp_path, monkeypatch, capsys):
    import slimnas.core.data

    monkeypatch.delenv("SLIMNAS_DATA", raising=False)
    monkeypatch.setattr(slimnas.core.data, "CHECKOUT_DATA_DIR", tmp_path / "no-data")
    hub = prepare_suite(["arc_easy_dev", "piqa"], None)
    assert hub.source == "lm-eval hub" and hub.splits == {"arc_easy_dev": "validation", "piqa": "validation"}
    from lm_eval.tasks._yaml_loader import load_yaml

    arc = load_yaml(Path(hub.manager.include_path) / "arc_easy_dev.yaml", resolve_func=False)
    assert arc["dataset_path"] == "allenai/ai2_arc" and arc["test_split"] == "validation"  # the hub's dev split
    assert "using lm-eval's hub tasks" in capsys.readouterr().out


def test_speed_is_timed_against_a_reference_in_abba_blocks():
    small = tiny_model(max_position_embeddings=256, num_hidden_layers=1)
    large = tiny_model(max_position_embeddings=256, num_hidden_layers=4)
    settings = SpeedSettings(prompt_len=16, new_tokens=4, repeats=3, precision="fp32")
    comparison = compare_speed(small, large, settings, "small", "large")
    assert comparison.model.repeats == comparison.reference.repeats == 6  # two of each per block, a fixed count
    assert comparison.flops_reduction > 2 and comparison.decode_speedup > 1
    assert comparison.decode_speedup_stderr >= 0 and comparison.model.cpu_load >= 0
    alone = measure_speed(small, settings, "small")
    assert alone.decode_tokens_per_s > 0 and 0 < alone.latency_p50_ms <= alone.latency_p90_ms


def fixed_timings(monkeypatch, reference, slow_runs: set[int]):
    """generate_timed replaced by fixed seconds per token: 2 ms for the reference, 1 ms for the model, except the
    reference's timed runs (0, 1, ... over every timing of the pair; warm-up runs have 4 tokens, timed ones 8) whose
    index is in slow_runs: those take ten times as long, as if another process were busy just then."""
    import slimnas.bench.speed

    reference_runs = []

    def timed(model, prompt, new_tokens, precision):
        seconds = 2e-3 if model is reference else 1e-3
        if model is reference and new_tokens == 8:
            reference_runs.append(new_tokens)
            seconds *= 10 if len(reference_runs) - 1 in slow_runs else 1
        return seconds, [seconds] * new_tokens

    monkeypatch.setattr(slimnas.bench.speed, "generate_timed", timed)


SPEED = SpeedSettings(prompt_len=16, new_tokens=8, repeats=3, precision="fp32")  # 6 reference runs per timing


@pytest.mark.parametrize("slow_runs, measurements, unstable", [
    (set(), 1, None),  # steady: 2x, no error bar, well below 1.3 x the FLOPs ratio (3.4)
    ({0}, 2, None),  # slow once: blocks of 11x, 2x, 2x (5 ± 3), timed again, the steady 2x kept
    ({0, 6}, 2, "decode speed-up 5.00x unstable: its error bar 3.00 is over 25% of it and it is over 1.3 x the FLOPs"),
])  # fmt: skip
def test_a_speedup_disturbed_by_load_is_timed_again_and_marked_when_it_stays_unstable(
    monkeypatch, capsys, slow_runs, measurements, unstable
):
    small = tiny_model(max_position_embeddings=256, num_hidden_layers=1)
    large = tiny_model(max_position_embeddings=256, num_hidden_layers=4)
    fixed_timings(monkeypatch, large, slow_runs)
    comparison = compare_speed(small, large, SPEED, "small", "large")
    assert comparison.flops_reduction == pytest.approx(3.4, abs=0.05)
    assert (comparison.measurements, comparison.model.repeats) == (measurements, 6)  # the last timing is kept whole
    assert comparison.decode_speedup == pytest.approx(5.0 if unstable else 2.0)
    assert comparison.unstable == (unstable and f"{unstable} ratio {comparison.flops_reduction:.2f}")
    row = comparison.as_row()
    assert (row["unstable"], row["measurements"]) == (comparison.unstable, measurements)
    out = capsys.readouterr().out
    assert out.count("timing it again") == measurements - 1 and ("marked so after 2 timings" in out) == bool(unstable)


def test_a_speedup_beyond_what_the_flops_allow_is_unstable_even_with_a_narrow_error_bar(monkeypatch):
    small = tiny_model(max_position_embeddings=256, num_hidden_layers=1)
    large = tiny_model(max_position_embeddings=256, num_hidden_layers=4)
    fixed_timings(monkeypatch, large, set(range(12)))  # every reference run slow: 20x in every block, no spread
    comparison = compare_speed(small, large, replace(SPEED, retimes=0), "small", "large")
    assert (comparison.decode_speedup, comparison.decode_speedup_stderr, comparison.measurements) == (20.0, 0.0, 1)
    assert comparison.unstable == "decode speed-up 20.00x unstable: it is over 1.3 x the FLOPs ratio 3.40"
    relaxed = compare_speed(small, large, replace(SPEED, stable_flops_ratio=6.0), "small", "large")
    assert relaxed.unstable is None and relaxed.measurements == 1


@pytest.mark.parametrize("override", ["speed.stable_stderr=0", "speed.stable_flops_ratio=0.9", "speed.retimes=-1"])
def test_bad_stability_settings_are_refused(override, capsys):
    assert main(["bench", "model=x", override]) == 2
    assert "speed.stable_stderr must be > 0" in capsys.readouterr().err


def test_peak_memory_of_a_model_alone_follows_its_size(tmp_path):
    from conftest import save_tiny_checkpoint

    settings = SpeedSettings(prompt_len=16, new_tokens=4, precision="fp32")
    small = save_tiny_checkpoint(tmp_path / "small", hidden_size=256, num_attention_heads=4, num_hidden_layers=1,
                                 intermediate_size=1024, vocab_size=4096)  # fmt: skip
    large = save_tiny_checkpoint(tmp_path / "large", hidden_size=256, num_attention_heads=4, num_hidden_layers=8,
                                 intermediate_size=1024, vocab_size=4096)  # fmt: skip
    import torch

    ballast = torch.zeros(64 * 2**20 // 4)  # 64 MiB held by this process must not count for either model
    small_peak = measure_memory(str(small), settings, torch.device("cpu"))
    large_peak = measure_memory(str(large), settings, torch.device("cpu"))
    del ballast
    weight_ratio = small_peak.weight_bytes / large_peak.weight_bytes
    assert weight_ratio < 0.3
    for record in (small_peak, large_peak):  # the weights plus a little: the libraries' set-up is not billed
        assert record.weight_bytes <= record.peak_bytes < record.weight_bytes + 24 * 2**20
    extra_weights = large_peak.weight_bytes - small_peak.weight_bytes
    assert (large_peak.peak_bytes - small_peak.peak_bytes) == pytest.approx(extra_weights, rel=0.25)


@needs_data
def test_bench_command_writes_scores_heldout_speed_and_memory(tiny_checkpoint, tmp_path, capsys, no_network):
    out = tmp_path / "bench"
    args = [
        "bench", f"teacher={tiny_checkpoint}", f"out={out}", "quality.tasks=[piqa,wikitext]", "quality.limit=2",
        "speed.prompt_len=16", "speed.new_tokens=4", "speed.repeats=2", "measure_memory=false", *FAST,
    ]  # fmt: skip
    assert main(args) == 0
    scores = pd.read_parquet(out / "scores.parquet")
    assert set(scores.task) == {"piqa", "wikitext"} and (scores.n == 2).all() and set(scores.split) > {"validation"}
    assert set(scores["pool"]) == {"evaluation"}
    assert json.loads((out / "speed.json").read_text())[0]["decode_tokens_per_s"] > 0
    heldout = json.loads((out / "heldout.json").read_text())[0]
    assert heldout["kl"] == pytest.approx(0, abs=1e-4) and heldout["perplexity_stderr"] > 0  # teacher probs: fp16
    assert "summary score" in capsys.readouterr().out
    assert (
        main(["bench", f"teacher={tiny_checkpoint}", "quality.tasks=[bogus_task]", "measure_speed=false", *FAST]) == 2
    )
