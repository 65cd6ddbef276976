"""Per-layer (heterogeneous) students: exact sizes, per-layer slicing, the checkpoint format, generation."""

import json
import random
import subprocess
import sys

import pytest
import torch
from conftest import FAST, tiny_config, tiny_model, tiny_tokenizer
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM

import slimnas.models  # noqa: F401  (the documented import: registers the per-layer students)
from slimnas.cli import main
from slimnas.compress.arch import (
    LayerShape,
    PerLayerArchitecture,
    architecture_of,
    flops_per_token,
    param_count,
    validate_target,
    weight_bytes,
)
from slimnas.compress.importance import compute_importance
from slimnas.compress.prune import plan_pruning, prune_model, save_checkpoint
from slimnas.compress.settings import ImportanceSettings
from slimnas.core.errors import SlimnasError
from slimnas.models import per_layer_config

SETTINGS = ImportanceSettings(n_samples=16, batch_size=8, precision="fp32")
FAMILIES = [
    ("llama", {}),
    ("llama", {"tie_word_embeddings": False, "attention_bias": True, "mlp_bias": True}),
    ("mistral", {}),
    ("qwen2", {}),  # q/k/v biases
    ("qwen3", {}),  # q/k norms
]
# Teacher layers: 4 heads in 2 KV groups, 96 neurons. Layer 1 narrower, layer 2 attention-free, layer 3 FFN-free,
# layer 4 dropped.
MIXED = PerLayerArchitecture(
    48,
    (
        LayerShape(96, 4, 2),
        LayerShape(40, 2, 1),
        LayerShape(64, 0, 0),
        LayerShape(0, 2, 2),
        LayerShape(0, 0, 0),
    ),
)


def calibration(vocab: int = 128) -> torch.Tensor:
    return torch.randint(3, vocab, (16, 24), generator=torch.Generator().manual_seed(1))


def random_target(rng: random.Random, layers: int) -> PerLayerArchitecture:
    shapes = []
    for i in range(layers):
        kv = rng.choice([0, 1, 2]) if i else rng.choice([1, 2])
        heads = kv * rng.choice([1, 2])
        shapes.append(LayerShape(rng.choice([0, 8, 40, 96]), heads, kv))
    return PerLayerArchitecture(rng.choice([32, 48, 64]), tuple(shapes))


@pytest.mark.parametrize("model_type, overrides", FAMILIES)
def test_parameter_count_weight_bytes_and_flops_are_exact_for_random_per_layer_shapes(model_type, overrides):
    teacher = tiny_config(model_type, num_hidden_layers=5, **overrides)
    rng = random.Random(model_type + str(overrides))
    tokens = calibration()[:1, :12]
    for _ in range(4):
        target = random_target(rng, 5)
        student = AutoModelForCausalLM.from_config(per_layer_config(teacher, target), attn_implementation="eager")
        numel = sum(p.numel() for p in student.parameters())
        assert param_count(teacher, target) == param_count(student.config) == numel, target
        assert architecture_of(student.config) == PerLayerArchitecture(
            target.hidden_size, tuple(layer for layer in target.layers if layer.kept)
        )
        bf16 = student.to(torch.bfloat16).parameters()
        assert weight_bytes(teacher, "bfloat16", target) == sum(p.numel() * p.element_size() for p in bf16)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            student.float()(tokens, use_cache=False)
        assert counter.get_total_flops() == flops_per_token(teacher, tokens.shape[1], target) * tokens.shape[1]


@pytest.mark.parametrize("model_type, overrides", FAMILIES)
def test_per_layer_student_with_nothing_removed_gives_the_teachers_logits(model_type, overrides):
    teacher = tiny_model(model_type, **overrides)
    tokens = calibration()
    full = PerLayerArchitecture.of(teacher.config)
    importance = compute_importance(teacher, tokens, SETTINGS)
    student = prune_model(teacher, plan_pruning(importance, teacher.config, full), full)
    assert type(student) is type(teacher)  # a uniform shape stays the plain family
    per_layer = AutoModelForCausalLM.from_config(per_layer_config(teacher.config, full)).eval()
    assert type(per_layer).__name__.startswith("Slimnas")
    per_layer.load_state_dict(teacher.state_dict())
    with torch.no_grad():
        expected = teacher(tokens).logits
        assert torch.equal(student(tokens).logits, expected)
        assert torch.equal(per_layer(tokens).logits, expected)


def zeroed_teacher(teacher, plan, target: PerLayerArchitecture):
    """The teacher with everything the plan removes zeroed in place (o_proj / down_proj inputs), layer by layer."""
    dim = teacher.config.head_dim
    with torch.no_grad():
        kept_layers = dict(zip(plan.layers, range(len(plan.layers)), strict=True))
        for i, layer in enumerate(teacher.model.layers):
            j = kept_layers.get(i)
            heads = set(plan.query_heads[j]) if j is not None else set()
            neurons = set(plan.neurons[j]) if j is not None else set()
            for h in range(teacher.config.num_attention_heads):
                if h not in heads:
                    layer.self_attn.o_proj.weight[:, h * dim : (h + 1) * dim] = 0
            for n in range(teacher.config.intermediate_size):
                if n not in neurons:
                    layer.mlp.down_proj.weight[:, n] = 0
            if not target.layers[i].num_attention_heads and layer.self_attn.o_proj.bias is not None:
                layer.self_attn.o_proj.bias.zero_()
            if not target.layers[i].intermediate_size and layer.mlp.down_proj.bias is not None:
                layer.mlp.down_proj.bias.zero_()
    return teacher


@pytest.mark.parametrize("model_type, overrides", FAMILIES)
def test_per_layer_slicing_keeps_exactly_the_teachers_computation_of_what_it_keeps(model_type, overrides):
    """Each layer keeps its own most important heads and neurons; a removed part is the teacher's part zeroed."""
    teacher = tiny_model(model_type, num_hidden_layers=5, **overrides)
    tokens = calibration()
    importance = compute_importance(teacher, tokens, SETTINGS)
    target = PerLayerArchitecture(64, MIXED.layers)  # the teacher's hidden size: the rest is exact
    plan = plan_pruning(importance, teacher.config, target)
    assert plan.layers == [0, 1, 2, 3]
    assert [len(n) for n in plan.neurons] == [96, 40, 64, 0] and [len(q) for q in plan.query_heads] == [4, 2, 0, 2]
    assert plan.neurons[1] == sorted(importance.neurons[1].argsort(descending=True)[:40].tolist())
    student = prune_model(teacher, plan, target)
    assert architecture_of(student.config) == PerLayerArchitecture(64, MIXED.layers[:4])
    with torch.no_grad():
        got = student(tokens).logits
        expected = zeroed_teacher(teacher, plan, target)(tokens).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type, overrides", FAMILIES)
def test_saved_per_layer_student_reloads_with_identical_logits_and_generates_like_a_no_cache_forward(
    tmp_path, model_type, overrides
):
    teacher = tiny_model(model_type, num_hidden_layers=5, vocab_size=300, **overrides)
    tokens = calibration(300)
    importance = compute_importance(teacher, tokens, SETTINGS)
    student = prune_model(teacher, plan_pruning(importance, teacher.config, MIXED), MIXED)
    save_checkpoint(student, tiny_tokenizer(300), tmp_path / "ckpt", {"note": "test"})

    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["model_type"] == f"slimnas_{model_type}"
    assert config["per_layer_config"]["2"]["skip"] == ["attention"] and config["per_layer_config"]["3"]["skip"] == [
        "mlp"
    ]
    record = json.loads((tmp_path / "ckpt" / "slimnas.json").read_text())
    assert record["architecture"]["intermediate_size"] == [96, 40, 64, 0]
    assert record["params"] == param_count(teacher.config, MIXED)

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert architecture_of(reloaded.config) == architecture_of(student.config)
    assert sum(p.numel() for p in reloaded.parameters()) == param_count(teacher.config, MIXED)
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, student(tokens).logits)

    prompt = tokens[:2, :6]
    generated = reloaded.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
    sequence = prompt
    with torch.no_grad():
        for _ in range(8):
            next_token = reloaded(sequence, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, next_token], dim=1)
    assert torch.equal(generated, sequence)


def test_a_per_layer_checkpoint_without_the_import_fails_with_transformers_own_error(tmp_path):
    teacher = tiny_model("llama", num_hidden_layers=5)
    importance = compute_importance(teacher, calibration(), SETTINGS)
    prune_model(teacher, plan_pruning(importance, teacher.config, MIXED), MIXED).save_pretrained(tmp_path)
    code = f"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode != 0
    assert "slimnas_llama" in done.stderr


def shape(*layers: tuple[int, int, int], hidden: int = 64) -> PerLayerArchitecture:
    return PerLayerArchitecture(hidden, tuple(LayerShape(*layer) for layer in layers))


FULL = (96, 4, 2)


@pytest.mark.parametrize(
    "target, message",
    [
        (shape(FULL, FULL, FULL, (96, 3, 3)), r"num_key_value_heads\[3\]=3 is larger than the teacher's 2"),
        (shape(FULL, FULL, FULL, (96, 3, 2)), "3 attention heads in layer 3 are not divisible into 2 KV groups"),
        (shape(FULL, FULL, FULL, FULL, hidden=80), "hidden_size=80 is larger than the teacher's 64"),
        (shape(FULL, FULL, FULL, (200, 4, 2)), r"intermediate_size\[3\]=200 is larger"),
        (shape(FULL, FULL, FULL, (96, 2, 0)), "both 0 \\(attention removed\\) or both at least 1"),
        (shape((96, 0, 0), FULL, FULL, FULL), "layer 0 keeps its attention"),
        (shape(FULL, FULL, FULL), "3 per-layer shapes for a teacher of 4 layers"),
        (shape(FULL, FULL, (96, 4, 1), FULL), "4 query heads per KV group in layer 2 exceed the teacher's 2"),
    ],
)
def test_bad_per_layer_targets_are_refused(target, message):
    with pytest.raises(SlimnasError, match=message):
        validate_target(target, tiny_config())


def test_a_per_layer_target_whose_kept_layers_are_alike_is_checked_and_built_as_uniform():
    teacher = tiny_config()
    target = shape((64, 2, 1), (0, 0, 0), (64, 2, 1), (64, 2, 1), hidden=48)
    assert target.uniform() is not None and target.uniform().num_hidden_layers == 3
    with pytest.raises(SlimnasError, match="not a multiple of the number of attention heads"):
        validate_target(shape((64, 2, 1), (64, 2, 1), (64, 2, 1), (64, 2, 1), hidden=47), teacher)


PER_LAYER_ARGS = [
    "target.hidden_size=48",
    "target.intermediate_size=[96,40,64,0]",
    "target.num_attention_heads=[4,2,0,2]",
    "target.num_key_value_heads=[2,1,0,2]",
]


def test_prune_command_cuts_a_per_layer_target_and_replays_its_record_from_a_file(tiny_checkpoint, tmp_path):
    out, replay = tmp_path / "pruned", tmp_path / "replayed"
    assert (
        main(["prune", f"teacher={tiny_checkpoint}", f"out={out}", *FAST, "eval_heldout=false", *PER_LAYER_ARGS]) == 0
    )
    model = AutoModelForCausalLM.from_pretrained(out)
    expected = shape((96, 4, 2), (40, 2, 1), (64, 0, 0), (0, 2, 2), hidden=48)
    assert architecture_of(model.config) == expected
    record = json.loads((out / "slimnas.json").read_text())
    assert record["target"] == expected.as_dict() and record["params"] == sum(p.numel() for p in model.parameters())
    args = ["prune", f"teacher={tiny_checkpoint}", f"out={replay}", *FAST, "eval_heldout=false"]
    assert main([*args, f"target_file={out / 'slimnas.json'}"]) == 0
    assert json.loads((replay / "slimnas.json").read_text())["plan"] == record["plan"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("target.num_key_value_heads=[2,2,3,2]", "num_key_value_heads[2]=3 is larger than the teacher's 2"),
        ("target.num_attention_heads=[4,4,3,4]", "3 attention heads in layer 2 are not divisible into 2 KV groups"),
        ("target.hidden_size=80", "hidden_size=80 is larger than the teacher's 64"),
        ("target.intermediate_size=[96,96,96]", "differ in length"),
        ("target.intermediate_size=[96,96,x,96]", "whole numbers only"),
    ],
)
def test_bad_per_layer_targets_on_the_command_line_exit_2_before_any_weights_load(
    tiny_checkpoint, tmp_path, capsys, override, message
):
    (tiny_checkpoint / "model.safetensors").write_bytes(b"not read: the target is refused first")
    args = [
        "prune",
        f"teacher={tiny_checkpoint}",
        f"out={tmp_path / 'x'}",
        *FAST,
        "target.intermediate_size=[96,96,96,96]",
    ]
    assert main([*args, override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("slimnas: error: invalid target") and message in err[0]
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("command", ["prune target.num_hidden_layers=2", "search"])
def test_a_per_layer_teacher_is_refused_in_one_line(tmp_path, capsys, command):
    """Pruning and the search cut a uniform teacher; a per-layer one has no single architecture to cut from."""
    teacher = tmp_path / "per-layer"
    AutoModelForCausalLM.from_config(per_layer_config(tiny_config(num_hidden_layers=5), MIXED)).save_pretrained(teacher)
    tiny_tokenizer().save_pretrained(teacher)
    capsys.readouterr()
    name, *overrides = command.split()
    args = [name, f"teacher={teacher}", f"out={tmp_path / 'x'}" if name == "prune" else f"run_dir={tmp_path / 'x'}"]
    assert main([*args, *FAST, *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "per-layer model (slimnas_llama) cannot be the teacher" in err[0]
    assert not (tmp_path / "x").exists()
