"""prune -> distill -> bench through the CLI on a tiny teacher, as a user would chain them."""

import json

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from search.cli import main

COMMON = ["data.seq_len=32", "precision=fp32"]


def test_prune_distill_bench_chain(tiny_checkpoint, tmp_path, capsys):
    pruned, distilled, bench = tmp_path / "pruned", tmp_path / "distilled", tmp_path / "bench"
    teacher = f"teacher={tiny_checkpoint}"
    assert (
        main(["prune", teacher, f"out={pruned}", "target.num_hidden_layers=2", "importance.n_samples=16", *COMMON]) == 0
    )
    distill = [
        "distill", teacher, f"student={pruned}", f"out={distilled}", "distill.budget_tokens=2048",
        "distill.batch_size=4", "distill.lr=2e-3", "distill.eval_every=8", "distill.save_every=8",
        "distill.top_k=300", *COMMON,  # k = vocabulary: the cached KL is the exact KL
    ]  # fmt: skip
    assert main(distill) == 0
    metrics = [json.loads(line) for line in (distilled / "metrics.jsonl").read_text().splitlines()]
    evaluations = [m for m in metrics if "heldout_kl" in m]
    assert evaluations[0]["step"] == 0 and evaluations[-1]["step"] == 16
    assert evaluations[-1]["heldout_kl"] < evaluations[0]["heldout_kl"]
    model = AutoModelForCausalLM.from_pretrained(distilled / "model")
    assert model.config.num_hidden_layers == 2
    record = json.loads((distilled / "model" / "slimnas.json").read_text())
    assert record["distill"]["tokens"] == 2048

    assert main(distill) == 0  # the same command again: already finished, resumes at the last step
    assert "held-out after" in capsys.readouterr().out
    reloaded = AutoModelForCausalLM.from_pretrained(distilled / "model")
    for a, b in zip(model.state_dict().values(), reloaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)

    bench_args = ["bench", teacher, f"model={distilled / 'model'}", f"out={bench}", "quality.enabled=false"]
    bench_args += ["speed.prompt_len=8", "speed.new_tokens=2", "speed.repeats=1", "compare_teacher=true", *COMMON]
    assert main(bench_args) == 0
    heldout = pd.read_parquet(bench / "heldout.parquet")
    kl = heldout[heldout.metric == "heldout_kl"].value.item()
    assert kl == pytest.approx(evaluations[-1]["heldout_kl"], rel=0.02)  # same rows, teacher and student
    ratios = json.loads((bench / "speed_vs_teacher.json").read_text())[0]
    assert ratios["flops_reduction"] > 1


def test_unsupported_architecture_is_refused(tmp_path, capsys):
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    from conftest import tiny_tokenizer

    tiny_tokenizer(100).save_pretrained(tmp_path / "gpt2")
    assert main(["prune", f"teacher={tmp_path / 'gpt2'}"]) == 2
    assert "unsupported architecture 'gpt2'" in capsys.readouterr().err.strip().splitlines()[-1]
