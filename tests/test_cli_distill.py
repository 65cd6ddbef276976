"""prune -> distill -> bench through the CLI on a tiny teacher, as a user would chain them."""

import json

import pandas as pd
import pytest
import torch
from conftest import FAST, tiny_tokenizer
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from slimnas.cli import main


def test_prune_distill_bench_chain(tiny_checkpoint, tmp_path, capsys):
    pruned, distilled, bench = tmp_path / "pruned", tmp_path / "distilled", tmp_path / "bench"
    teacher = f"teacher={tiny_checkpoint}"
    assert main(["prune", teacher, f"out={pruned}", "target.num_hidden_layers=2", *FAST]) == 0
    distill = [
        "distill", teacher, f"student={pruned}", f"out={distilled}", "distill.budget_tokens=2048",
        "distill.batch_size=4", "distill.lr=2e-3", "distill.eval_every=8", "distill.save_every=8",
        "distill.top_k=300", *FAST,  # k = vocabulary: the cached KL is the full KL
    ]  # fmt: skip
    assert main(distill) == 0
    metrics = [json.loads(line) for line in (distilled / "metrics.jsonl").read_text().splitlines()]
    evaluations = [m for m in metrics if "heldout" in m]
    assert [e["step"] for e in evaluations] == [0, 8, 16]
    assert evaluations[-1]["heldout"]["kl"] < evaluations[0]["heldout"]["kl"]
    model = AutoModelForCausalLM.from_pretrained(distilled / "model")
    assert model.config.num_hidden_layers == 2
    record = json.loads((distilled / "model" / "slimnas.json").read_text())
    assert record["distill"]["tokens"] == 2048 and record["corpus"]["evaluation_documents"] == 8

    assert main(distill) == 0  # the same command again: already finished, resumes at the last step
    assert "held-out after" in capsys.readouterr().out
    reloaded = AutoModelForCausalLM.from_pretrained(distilled / "model")
    for a, b in zip(model.state_dict().values(), reloaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)

    bench_args = ["bench", teacher, f"model={distilled / 'model'}", f"out={bench}", "quality.tasks=[]"]
    bench_args += ["speed.prompt_len=8", "speed.new_tokens=2", "speed.repeats=2", "compare_teacher=true", *FAST]
    assert main(bench_args) == 0
    heldout = pd.read_parquet(bench / "heldout.parquet")
    assert heldout.kl.item() == pytest.approx(evaluations[-1]["heldout"]["kl"], rel=1e-4)  # the same rows
    ratios = json.loads((bench / "speed_vs_teacher.json").read_text())[0]
    assert ratios["flops_reduction"] > 1
    memory = {m["model"]: m["peak_bytes"] for m in json.loads((bench / "memory.json").read_text())}
    assert memory[str(distilled / "model")] > 0 and memory[str(tiny_checkpoint)] > 0


def test_distilling_into_an_out_directory_of_another_student_is_refused(tiny_checkpoint, tmp_path, capsys):
    teacher = f"teacher={tiny_checkpoint}"
    for layers in (2, 3):
        assert (
            main(["prune", teacher, f"out={tmp_path / str(layers)}", f"target.num_hidden_layers={layers}", *FAST]) == 0
        )
    distill = ["distill", teacher, f"out={tmp_path / 'kd'}", "distill.budget_tokens=512", "distill.batch_size=4", *FAST]
    assert main([*distill, f"student={tmp_path / '2'}"]) == 0
    assert main([*distill, f"student={tmp_path / '3'}"]) == 2
    assert "belongs to a run of another student" in capsys.readouterr().err


def test_unsupported_architecture_is_refused(tmp_path, capsys):
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    tiny_tokenizer(100).save_pretrained(tmp_path / "gpt2")
    assert main(["prune", f"teacher={tmp_path / 'gpt2'}"]) == 2
    assert "unsupported architecture 'gpt2'" in capsys.readouterr().err.strip().splitlines()[-1]
