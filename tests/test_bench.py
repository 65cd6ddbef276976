import json
import socket

import pandas as pd
import pytest
from conftest import SHARED_DATA, tiny_model, tiny_tokenizer

from bench.commands import speed_ratios
from bench.quality import score_model, subset, summary_score
from bench.speed import SpeedSettings, measure_speed
from bench.task_data import SUITE, prepare_suite
from compress.errors import SlimnasError
from search.cli import main

MULTIPLE_CHOICE = ["piqa", "arc_easy", "arc_challenge", "hellaswag"]


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_prepared_local_data_matches_the_published_splits(tmp_path):
    sizes = prepare_suite(SHARED_DATA, list(SUITE), tmp_path)
    assert sizes == {
        "lambada_openai": 5153, "piqa": 1838, "arc_easy": 570, "arc_challenge": 299, "hellaswag": 10042, "wikitext": 62,
    }  # fmt: skip
    hellaswag = json.loads((tmp_path / "hellaswag.jsonl").read_text().splitlines()[0])
    assert hellaswag == {
        "query": "Roof shingle removal: A man is sitting on a roof. He",
        "choices": [
            "is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
            "is holding a rubik's cube.", "starts pulling up roofing on a roof.",
        ],
        "label": 3,
    }  # fmt: skip
    for line in (tmp_path / "arc_challenge.jsonl").read_text().splitlines():
        doc = json.loads(line)
        assert doc["answerKey"] in doc["choices"]["label"]
    piqa = [json.loads(line)["label"] for line in (tmp_path / "piqa.jsonl").read_text().splitlines()]
    assert set(piqa) == {0, 1}
    wikitext = json.loads((tmp_path / "wikitext.jsonl").read_text().splitlines()[0])["page"]
    assert wikitext.startswith(" = Robert <unk> = \n")  # the tokenised v1 file: rare words are <unk>
    assert str(tmp_path / "piqa.jsonl") in (tmp_path / "piqa.yaml").read_text()


def test_whole_suite_scores_a_tiny_model_with_sockets_blocked(tmp_path, no_network):
    model = tiny_model(vocab_size=300, max_position_embeddings=4096)
    records = score_model(model, tiny_tokenizer(300), list(SUITE), tmp_path, SHARED_DATA, limit=3, model_name="tiny")
    by_key = {(r.task, r.metric): r for r in records}
    for task in MULTIPLE_CHOICE:
        for metric in ("acc", "acc_norm"):
            record = by_key[(task, metric)]
            assert 0 <= record.value <= 1 and record.n == 3 and record.stderr is not None and record.seconds > 0
    assert by_key[("lambada_openai", "perplexity")].value > 1
    assert by_key[("wikitext", "word_perplexity")].value > 1 and by_key[("wikitext", "bits_per_byte")].value > 0
    assert -1 <= summary_score(records) <= 1


def test_subsets_are_fixed_by_seed():
    assert subset(100, 10, seed=0) == subset(100, 10, seed=0) == sorted(subset(100, 10, seed=0))
    assert subset(100, 10, seed=0) != subset(100, 10, seed=1)
    assert subset(5, 10, seed=0) is None and subset(5, None, seed=0) is None


def test_summary_score_normalises_by_chance():
    from bench.quality import ScoreRecord

    records = [
        ScoreRecord("m", "piqa", "acc_norm", 0.75, None, 10, 1.0),  # (0.75 - 0.5) / 0.5 = 0.5
        ScoreRecord("m", "arc_easy", "acc_norm", 0.25, None, 10, 1.0),  # chance: 0
        ScoreRecord("m", "lambada_openai", "acc", 0.4, None, 10, 1.0),  # chance 0: 0.4
    ]
    assert summary_score(records) == pytest.approx((0.5 + 0.0 + 0.4) / 3)
    with pytest.raises(SlimnasError, match="no accuracy task"):
        summary_score([ScoreRecord("m", "wikitext", "word_perplexity", 30.0, None, 1, 1.0)])


def test_missing_data_files_are_named(tmp_path):
    with pytest.raises(SlimnasError, match=r"missing benchmark data files: .*piqa/valid\.jsonl"):
        score_model(tiny_model(), tiny_tokenizer(300), ["piqa"], tmp_path, tmp_path / "empty")


def test_unknown_task_is_a_clear_error(tmp_path, no_network):
    with pytest.raises(SlimnasError, match="unknown task"):
        score_model(
            tiny_model(vocab_size=300), tiny_tokenizer(300), ["piqa", "no_such_task_xyz"], tmp_path, SHARED_DATA
        )


def test_speed_record_has_positive_values_and_ratios():
    small = tiny_model(max_position_embeddings=256, num_hidden_layers=2)
    large = tiny_model(max_position_embeddings=256)
    settings = SpeedSettings(prompt_len=16, new_tokens=4, repeats=2, precision="fp32")
    small_speed, large_speed = measure_speed(small, settings, "small"), measure_speed(large, settings, "large")
    for record in (small_speed, large_speed):
        assert record.prefill_tokens_per_s > 0 and record.decode_tokens_per_s > 0
        assert 0 < record.latency_p50_ms <= record.latency_p90_ms
        assert record.peak_memory_bytes > 0 and record.memory_kind == "cpu_peak_rss"
    ratios = speed_ratios(small_speed, large_speed)
    assert ratios["flops_reduction"] > 1.5 and ratios["decode_speedup"] > 0


def test_bench_command_writes_scores_and_speed(tiny_checkpoint, tmp_path, capsys, no_network):
    out = tmp_path / "bench"
    args = [
        "bench", f"teacher={tiny_checkpoint}", f"out={out}", "quality.tasks=[piqa,wikitext]", "quality.limit=2",
        "speed.prompt_len=16", "speed.new_tokens=4", "speed.repeats=1", "precision=fp32",
    ]  # fmt: skip
    assert main(args) == 0
    scores = pd.read_parquet(out / "scores.parquet")
    assert set(scores.task) == {"piqa", "wikitext"} and (scores.n == 2).all()
    assert json.loads((out / "speed.json").read_text())[0]["decode_tokens_per_s"] > 0
    assert "summary score" in capsys.readouterr().out
    assert main(["bench", f"teacher={tiny_checkpoint}", "quality.tasks=[bogus_task]", "speed.enabled=false"]) == 2
