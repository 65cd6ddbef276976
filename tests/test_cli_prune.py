import json
import subprocess
import sys

import pytest
import torch
from conftest import FAST
from transformers import AutoModelForCausalLM

from slimnas.cli import main

QUICK = [*FAST, "eval_heldout=false"]


def test_prune_command_writes_a_loadable_checkpoint_with_its_provenance(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "pruned"
    args = [
        "prune",
        f"teacher={tiny_checkpoint}",
        f"out={out}",
        "target.num_hidden_layers=3",
        "target.intermediate_size=48",
    ]
    assert main(args + FAST) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 3 and model.config.intermediate_size == 48
    record = json.loads((out / "slimnas.json").read_text())
    assert record["architecture"]["num_hidden_layers"] == 3 and len(record["plan"]["layers"]) == 3
    assert record["heldout"]["pruned"]["documents"] == 8 and record["heldout"]["pruned"]["kl_stderr"] > 0
    assert record["command"].startswith("slimnas prune") and record["corpus"]["source"] == "builtin"
    assert (out / "tokenizer.json").is_file() and "saved checkpoint" in capsys.readouterr().out


def test_prune_with_nothing_removed_reproduces_the_teacher(tiny_checkpoint, tmp_path):
    out = tmp_path / "same"
    assert main(["prune", f"teacher={tiny_checkpoint}", f"out={out}"] + QUICK) == 0
    tokens = torch.randint(3, 300, (2, 16))
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)(tokens).logits
        assert torch.equal(AutoModelForCausalLM.from_pretrained(out)(tokens).logits, expected)


@pytest.mark.parametrize(
    "override, message",
    [
        ("target.num_hidden_layers=9", "larger than the teacher"),
        ("target.num_attention_heads=3", "not divisible"),
        ("target.num_hidden_layers=0", "at least 1"),
        ("no_such_key=1", "no_such_key"),
        ("target=[", "no viable alternative"),
        ("pruning.layer_metric=perplexity", "layer perplexity was not computed"),
        ("pruning.depth_strategy=sideways", "unknown depth strategy"),
        ("precision=bogus", "precision must be one of"),
        ("device=tpu", "unknown device"),
        ("data.seq_len=1", "data.seq_len and data.heldout_tokens must be at least 2"),
        ("data.corpus=/nowhere.txt", "corpus not found"),
        ("importance.seq_agg=median", "seq_agg must be one of"),
    ],
)
def test_bad_input_gives_one_line_error_and_exit_2(tiny_checkpoint, tmp_path, capsys, override, message):
    assert main(["prune", f"teacher={tiny_checkpoint}", f"out={tmp_path / 'x'}", *QUICK, override]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("slimnas: error:") and message in err
    assert not (tmp_path / "x").exists()


def test_wrong_model_path_and_corrupt_checkpoint(tiny_checkpoint, tmp_path, capsys):
    assert main(["prune", f"teacher={tmp_path / 'nowhere'}"]) == 2
    assert "no such model directory" in capsys.readouterr().err
    (tiny_checkpoint / "model.safetensors").write_bytes(b"not a safetensors file")
    assert main(["prune", f"teacher={tiny_checkpoint}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("slimnas: error: cannot load model")


def test_console_script_exit_codes():
    unknown = subprocess.run([sys.executable, "-m", "slimnas.cli", "frobnicate"], capture_output=True, text=True)
    assert unknown.returncode == 2 and "unknown command" in unknown.stderr
    usage = subprocess.run([sys.executable, "-m", "slimnas.cli", "--help"], capture_output=True, text=True)
    assert usage.returncode == 0 and all(c in usage.stdout for c in ("prune", "retrain", "report", "pipeline"))
    export = subprocess.run([sys.executable, "-m", "slimnas.cli", "export", "--help"], capture_output=True, text=True)
    assert export.returncode == 0 and "usage: slimnas export MODEL [--format VALUE]" in export.stdout
    assert "dtype: f32" in export.stdout  # every setting with its default
    search = subprocess.run([sys.executable, "-m", "slimnas.cli", "search", "-h"], capture_output=True, text=True)
    assert search.returncode == 0 and "kd_tokens:" in search.stdout  # from the structured configs, not only YAML
    stray = subprocess.run([sys.executable, "-m", "slimnas.cli", "prune", "somewhere"], capture_output=True, text=True)
    assert stray.returncode == 2 and "is not key=value" in stray.stderr
