"""Exported students run in llama.cpp itself (llama-cpp-python, the `slimnas[llamacpp]` extra), with the logits of
PyTorch: a uniform student as `llama`, a per-layer one as `deci`; the llama.cpp speed engine (speed.engine=llamacpp)
times them against a teacher. Skipped without the extra, failed under CI; its refusal without the extra is tested
everywhere (the extra's absence simulated)."""

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST, save_tiny_checkpoint, tiny_config, tiny_tokenizer
from gguf import GGUFReader
from transformers import AutoModelForCausalLM

import slimnas.models  # noqa: F401  (the documented import: registers the per-layer students)
from slimnas.bench.settings import SpeedSettings
from slimnas.bench.speed import compare_speed, measure_speed
from slimnas.cli import main
from slimnas.compress.arch import LayerShape, PerLayerArchitecture, architecture_of
from slimnas.compress.export import export_gguf
from slimnas.config import compose
from slimnas.core.errors import SlimnasError
from slimnas.core.rundir import COMPLETE, TrialRecord
from slimnas.models import per_layer_config
from slimnas.reports.leaderboard import display_table, leaderboard_rows
from slimnas.reports.runs import Run
from slimnas.search.setup import settings_hash

VOCAB = 300
# Teacher layers: 4 heads in 2 KV groups, 96 neurons. Layer 0 whole, layer 1 narrower with 1 KV group, layer 2
# attention-free, layer 3 FFN-free (written with one zero neuron), layer 4 dropped; hidden 64 -> 48.
MIXED = PerLayerArchitecture(
    48,
    (LayerShape(96, 4, 2), LayerShape(40, 2, 1), LayerShape(64, 0, 0), LayerShape(0, 2, 2), LayerShape(0, 0, 0)),
)
UNIFORM = PerLayerArchitecture(48, (LayerShape(64, 2, 1),) * 3 + (LayerShape(0, 0, 0),) * 2)
TOLERANCE = 1e-2  # max |logit difference| in f32 (the bound); measured: see test output


def llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        reason = "llama-cpp-python missing (pip install -e .[llamacpp]; make test installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return llama_cpp


def save_student(path, target: PerLayerArchitecture, model_type: str = "llama"):
    """A random student of this shape; norms and every weight random, so a misplaced tensor shows in the logits."""
    teacher = tiny_config(model_type, num_hidden_layers=len(target.layers), vocab_size=VOCAB)
    torch.manual_seed(0)
    uniform = target.uniform()
    config = per_layer_config(teacher, target)
    if uniform is not None:  # a uniform student is saved as its plain family
        config = tiny_config(model_type, vocab_size=VOCAB, **uniform.as_dict())
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.copy_(
                1 + 0.2 * torch.randn_like(parameter) if "norm" in name else 0.3 * torch.randn_like(parameter)
            )
    model.save_pretrained(path)
    tiny_tokenizer(VOCAB).save_pretrained(path)
    return model.eval()


def llama_cpp_logits(gguf_file, tokens: list[int]) -> np.ndarray:
    f32 = llama_cpp().GGML_TYPE_F32  # the KV cache in f32 too (llama.cpp's default is f16)
    llm = llama_cpp().Llama(model_path=str(gguf_file), n_ctx=len(tokens) + 8, n_batch=len(tokens), logits_all=True,
                            n_threads=2, type_k=f32, type_v=f32, verbose=False)  # fmt: skip
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def assert_same_logits_in_llama_cpp(gguf_file, model, tokens: list[int], what: str) -> None:
    """llama.cpp's logits at every position within TOLERANCE of PyTorch's (f32), with the same argmax."""
    with torch.no_grad():
        expected = model(torch.tensor([tokens])).logits[0].float().numpy()
    got = llama_cpp_logits(gguf_file, tokens)
    difference = float(np.abs(got - expected).max())
    print(f"{what}: max |logit difference| {difference:.2e} over {len(tokens)} positions x {got.shape[1]} tokens")
    assert difference <= TOLERANCE, f"{what}: max |logit difference| {difference:.3g} > {TOLERANCE}"
    assert (got.argmax(-1) == expected.argmax(-1)).all()


@pytest.mark.parametrize("target, arch", [(MIXED, "deci"), (UNIFORM, "llama")], ids=["per-layer", "uniform"])
def test_exported_student_gives_pytorchs_logits_in_llama_cpp(tmp_path, target, arch):
    model = save_student(tmp_path / "student", target)
    assert architecture_of(model.config) == (target.uniform() or PerLayerArchitecture(48, MIXED.layers[:4]))
    gguf_file = export_gguf(tmp_path / "student", tmp_path / "student.gguf", "f32")
    assert GGUFReader(gguf_file).fields["general.architecture"].contents() == arch
    tokens = torch.randint(3, VOCAB, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    assert_same_logits_in_llama_cpp(gguf_file, model, tokens, arch)


# The llama.cpp speed engine ---------------------------------------------------------------------------------------

ENGINE = SpeedSettings(prompt_len=16, new_tokens=8, repeats=3, engine="llamacpp", retimes=0)


def test_the_llamacpp_engine_times_a_per_layer_student_against_a_larger_teacher(tmp_path, monkeypatch):
    llama_cpp()
    student = save_student(tmp_path / "student", MIXED)  # exported as deci
    # ~1 ms a token in llama.cpp against the student's ~0.1 ms: faster by far more than the timing noise
    wide = dict(hidden_size=384, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=4, head_dim=48)
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(tiny_config(vocab_size=VOCAB, **wide), dtype=torch.float32).eval()
    exported = []

    def export(model_dir, out_file, dtype):
        exported.append((Path(model_dir).name, dtype))
        return export_gguf(model_dir, out_file, dtype)

    monkeypatch.setattr("slimnas.bench.llamacpp.export_gguf", export)
    comparison = compare_speed(student, teacher, ENGINE, "student", "teacher", tiny_tokenizer(VOCAB))
    print(comparison.as_row())
    assert comparison.as_row()["engine"] == comparison.model.engine == comparison.reference.engine == "llamacpp"
    assert comparison.model.device == "cpu" and comparison.model.repeats == comparison.reference.repeats == 6
    assert comparison.decode_speedup > 1 and math.isfinite(comparison.decode_speedup_stderr)
    assert comparison.prefill_speedup > 0 and comparison.flops_reduction > 10
    assert exported == [("0", "f16"), ("1", "f16")]

    # An unstable speed-up is timed again by bench.speed's loop, from the GGUFs already written
    again = compare_speed(
        student, teacher, replace(ENGINE, stable_stderr=1e-9, retimes=1), tokenizer=tiny_tokenizer(VOCAB)
    )
    assert again.measurements == 2 and again.unstable is not None and len(exported) == 4
    alone = measure_speed(teacher, ENGINE, "teacher", tiny_tokenizer(VOCAB))
    assert alone.engine == "llamacpp" and alone.decode_tokens_per_s > 0 and alone.repeats == 3


def test_slimnas_bench_times_a_checkpoint_against_the_teacher_in_llama_cpp(tiny_checkpoint, tmp_path):
    llama_cpp()
    small = save_tiny_checkpoint(tmp_path / "small", num_hidden_layers=1)
    bench = [
        "bench", f"teacher={tiny_checkpoint}", f"model={small}", f"out={tmp_path / 'bench'}", "compare_teacher=true",
        "quality.tasks=[]", "measure_memory=false", "speed.engine=llamacpp", "speed.prompt_len=16",
        "speed.new_tokens=4", "speed.repeats=2", *FAST,
    ]  # fmt: skip
    assert main(bench) == 0
    (ratios,) = json.loads((tmp_path / "bench" / "speed_vs_teacher.json").read_text())
    assert ratios["engine"] == "llamacpp" and ratios["decode_speedup"] > 0 and ratios["flops_reduction"] > 1
    records = json.loads((tmp_path / "bench" / "speed.json").read_text())
    assert [(r["model"], r["engine"], r["device"]) for r in records] == [
        (str(small), "llamacpp", "cpu"), (str(tiny_checkpoint), "llamacpp", "cpu")
    ]  # fmt: skip


def test_a_teacher_llama_cpp_cannot_run_is_refused_before_any_compute(tmp_path, capsys):
    llama_cpp()
    qwen = save_tiny_checkpoint(tmp_path / "qwen", "qwen2")
    out = tmp_path / "bench"
    bench = ["bench", f"teacher={qwen}", f"out={out}", "quality.tasks=[]", "speed.engine=llamacpp", *FAST]
    assert main(bench) == 2
    assert capsys.readouterr().err.splitlines() == [
        "slimnas: error: speed.engine=llamacpp times GGUF exports: cannot export model type 'qwen2' to GGUF: only "
        "llama, mistral"
    ]
    assert not out.exists()  # not even the held-out KL was computed


def test_a_study_keeps_to_one_engine_and_torch_studies_keep_their_hash():
    llama_cpp()
    assert "engine" not in SpeedSettings().identity()  # studies and records made before the setting still match
    assert SpeedSettings(engine="llamacpp").identity()["engine"] == "llamacpp"
    hashes = {
        engine: settings_hash(compose("search", ["teacher=x", f"speed.engine={engine}"]), "teacher fingerprint")
        for engine in ("torch", "llamacpp")
    }
    assert hashes["torch"] != hashes["llamacpp"]


@pytest.mark.parametrize("engine, message", [
    ("onnx", "speed.engine must be one of torch, llamacpp, not 'onnx'"),
    ("llamacpp", "speed.engine=llamacpp times batch 1 only, not speed.batch_size=2"),
])  # fmt: skip
def test_bad_engine_settings_are_refused(engine, message):
    if engine == "llamacpp":
        llama_cpp()
    with pytest.raises(SlimnasError, match=message):
        SpeedSettings(engine=engine, batch_size=2)


@pytest.mark.parametrize("command", ["bench", "search"])
def test_the_llamacpp_engine_is_refused_in_one_line_without_the_extra(command):
    """The extra's absence simulated (sys.modules['llama_cpp'] = None: not importable); a teacher that does not
    exist shows the refusal comes from the configuration check, before any model loads."""
    code = "import sys; sys.modules['llama_cpp'] = None; from slimnas.cli import main; sys.exit(main(sys.argv[1:]))"
    args = [command, "teacher=/nonexistent/teacher", "speed.engine=llamacpp"]
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "slimnas: error: speed.engine=llamacpp needs llama-cpp-python: pip install 'slimnas[llamacpp]' (built from "
        "source)"
    ]


def test_the_leaderboard_says_which_engine_timed_each_speedup():
    def trial(number: int, speed: dict) -> TrialRecord:
        final = {"quality": -0.1, "params": 100, "heldout_kl": 0.1, "kl_per_doc": [0.1, 0.2]} | (
            {"decode_speedup": 2.0, "decode_speedup_stderr": 0.1} if speed else {}
        )
        return TrialRecord(number, {}, str(number), 100, 0.5, 0, {}, state=COMPLETE, final=final, speed=speed)

    records = [
        trial(0, {"engine": "llamacpp", "flops_reduction": 2.5}),
        trial(1, {"flops_reduction": 2.5}),
        trial(2, {}),
    ]
    run = Run(Path("run"), {"teacher_params": 200}, records, None, [], {}, [], None, {}, [], [])
    rows = leaderboard_rows([run])
    assert [row["speed_engine"] for row in rows] == [None, "llamacpp", "torch", None]  # torch: records made before
    headers, cells = display_table(rows)
    speedups = [row[headers.index("decode speed-up")] for row in cells]
    assert speedups == ["1.00x", "2.00 ± 0.10x [llamacpp]", "2.00 ± 0.10x", ""]  # the last one never timed
