import pytest
import torch
from conftest import tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

from slimnas.compress.arch import Architecture, param_count
from slimnas.compress.importance import Importance, cached_importance, compute_importance
from slimnas.compress.prune import PrunePlan, plan_pruning, prune_model, save_checkpoint, select_layers
from slimnas.compress.settings import ImportanceSettings, PruningSettings

SETTINGS = ImportanceSettings(n_samples=16, batch_size=8, precision="fp32")


def calibration(vocab: int = 128) -> torch.Tensor:
    return torch.randint(3, vocab, (16, 24), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    "model_type, overrides",
    [
        ("llama", {}),
        ("llama", {"tie_word_embeddings": False, "attention_bias": True}),
        ("mistral", {}),
        ("qwen2", {}),
        ("qwen3", {}),
    ],
)
def test_pruning_to_the_teachers_own_shape_gives_identical_logits(model_type, overrides):
    teacher = tiny_model(model_type, **overrides)
    tokens = calibration()
    importance = compute_importance(teacher, tokens, SETTINGS)
    shape = Architecture.of(teacher.config)
    student = prune_model(teacher, plan_pruning(importance, teacher.config, shape), shape)
    with torch.no_grad():
        assert torch.equal(student(tokens).logits, teacher(tokens).logits)
    tied = student.lm_head.weight is student.model.embed_tokens.weight  # one tensor, as param_count counts it
    assert tied == teacher.config.tie_word_embeddings
    assert sum(p.numel() for p in student.parameters()) == param_count(teacher.config)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_exported_checkpoint_reloads_in_plain_transformers_with_identical_logits(tmp_path, model_type):
    teacher = tiny_model(model_type, vocab_size=300)
    tokens = calibration(300)
    importance = compute_importance(teacher, tokens, SETTINGS)
    target = Architecture(
        hidden_size=48, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=3
    )
    student = prune_model(teacher, plan_pruning(importance, teacher.config, target), target)
    save_checkpoint(student, tiny_tokenizer(300), tmp_path / "ckpt", {"note": "test"})
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert Architecture.of(reloaded.config) == target
    assert param_count(reloaded.config) == sum(p.numel() for p in reloaded.parameters())
    assert param_count(teacher.config, target) == param_count(reloaded.config)
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, student(tokens).logits)


def planted_teacher():
    """A tiny model whose unimportant parts are known: KV group 1, neurons 5 and 17, channel 9, layer 2."""
    teacher = tiny_model("llama", num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    with torch.no_grad():
        for layer in teacher.model.layers:
            layer.self_attn.v_proj.weight[16:32] = 0  # KV group 1 -> query heads 2 and 3 output zero
            layer.mlp.up_proj.weight[[5, 17]] = 0
            layer.input_layernorm.weight[9] = 0
            layer.post_attention_layernorm.weight[9] = 0
        teacher.model.norm.weight[9] = 0
        teacher.model.layers[2].self_attn.o_proj.weight.zero_()  # layer 2 becomes the identity
        teacher.model.layers[2].mlp.down_proj.weight.zero_()
    return teacher


def test_planted_unimportant_parts_rank_lowest():
    teacher = planted_teacher()
    importance = compute_importance(teacher, calibration(), SETTINGS)
    for layer_heads in importance.heads:
        assert set(layer_heads.argsort()[:2].tolist()) == {2, 3}
        assert layer_heads[2] == 0 and layer_heads[3] == 0
    for index, layer_neurons in enumerate(importance.neurons):
        if index != 2:
            assert set(layer_neurons.argsort()[:2].tolist()) == {5, 17}
    assert int(importance.channels.argmin()) == 9
    assert int(importance.layer_scores("block").argmin()) == 2
    assert importance.layer_scores("block")[2] < 1e-5

    target = Architecture(
        hidden_size=62, intermediate_size=94, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=3
    )
    plan = plan_pruning(importance, teacher.config, target)
    assert plan.layers == [0, 1, 3]
    assert 9 not in plan.channels
    assert all(kv == [0] and q == [0, 1] for kv, q in zip(plan.kv_heads, plan.query_heads, strict=True))
    assert all(5 not in n and 17 not in n for n in plan.neurons)


def test_cutting_a_silent_kv_group_and_dead_neurons_keeps_the_logits():
    """Functional check of the width slicing: q/k/v rows, o_proj and down_proj columns of the kept parts."""
    teacher = planted_teacher()
    with torch.no_grad():
        teacher.model.layers[2].self_attn.o_proj.weight.normal_()  # the identity layer is not under test here
        teacher.model.layers[2].mlp.down_proj.weight.normal_()
    shape = Architecture.of(teacher.config)
    target = Architecture(shape.hidden_size, shape.intermediate_size - 2, 2, 1, shape.num_hidden_layers)
    kept_neurons = [n for n in range(shape.intermediate_size) if n not in (5, 17)]
    plan = PrunePlan(
        layers=list(range(4)),
        channels=list(range(64)),
        query_heads=[[0, 1]] * 4,
        kv_heads=[[0]] * 4,
        neurons=[kept_neurons] * 4,
    )
    student = prune_model(teacher, plan, target)
    tokens = calibration()
    with torch.no_grad():
        torch.testing.assert_close(student(tokens).logits, teacher(tokens).logits, rtol=0, atol=1e-5)
    misplaced = PrunePlan(plan.layers, plan.channels, [[2, 3]] * 4, [[1]] * 4, plan.neurons)  # the silent group
    with torch.no_grad():
        assert not torch.allclose(prune_model(teacher, misplaced, target)(tokens).logits, teacher(tokens).logits)


def test_cutting_a_dead_embedding_channel_keeps_the_logits():
    """A channel no layer writes to carries nothing; the RMSNorm rescaling makes its removal exact."""
    teacher = tiny_model("llama")
    with torch.no_grad():
        teacher.model.embed_tokens.weight[:, 9] = 0
        for layer in teacher.model.layers:
            layer.self_attn.o_proj.weight[9] = 0
            layer.mlp.down_proj.weight[9] = 0
    shape = Architecture.of(teacher.config)
    channels = [c for c in range(64) if c != 9]
    target = Architecture(63, shape.intermediate_size, 4, 2, 4)
    plan = PrunePlan(
        layers=list(range(4)),
        channels=channels,
        query_heads=[[0, 1, 2, 3]] * 4,
        kv_heads=[[0, 1]] * 4,
        neurons=[list(range(96))] * 4,
    )
    student = prune_model(teacher, plan, target)
    tokens = calibration()
    with torch.no_grad():
        torch.testing.assert_close(student(tokens).logits, teacher(tokens).logits, rtol=1e-4, atol=1e-4)


def test_dropping_the_identity_layer_keeps_logits_close():
    teacher = planted_teacher()
    tokens = calibration()
    importance = compute_importance(teacher, tokens, SETTINGS)
    shape = Architecture.of(teacher.config)
    target = Architecture(**{**shape.as_dict(), "num_hidden_layers": 3})
    student = prune_model(teacher, plan_pruning(importance, teacher.config, target), target)
    with torch.no_grad():
        torch.testing.assert_close(student(tokens).logits, teacher(tokens).logits, rtol=1e-4, atol=1e-4)


def test_contiguous_block_and_layer_perplexity():
    teacher = planted_teacher()
    settings = ImportanceSettings(n_samples=16, batch_size=8, precision="fp32", layer_perplexity=True)
    importance = compute_importance(teacher, calibration(), settings)
    contiguous = PruningSettings(depth_strategy="contiguous")
    assert select_layers(importance, 3, contiguous) == [0, 1, 3]
    dropped = select_layers(importance, 2, contiguous)
    assert len(dropped) == 2 and dropped[1] - dropped[0] in (1, 3)  # one block of two removed
    # Skipping the identity layer leaves perplexity exactly as it was.
    assert importance.layer_perplexity[2] == pytest.approx(importance.base_perplexity, rel=1e-5)
    assert importance.layer_scores("perplexity").shape == (4,)


def test_residual_cosines_equal_a_direct_computation():
    teacher = tiny_model("llama", num_hidden_layers=3)
    tokens = calibration()
    importance = compute_importance(teacher, tokens, SETTINGS)
    with torch.no_grad():
        states = teacher(tokens, output_hidden_states=True).hidden_states[:-1]  # pre-norm residual streams
        last = teacher.model.layers[-1]
        outputs = []
        handle = last.register_forward_hook(lambda m, a, o: outputs.append(o[0] if isinstance(o, tuple) else o))
        teacher(tokens)
        handle.remove()
    stream = torch.stack([*states, outputs[0]]).flatten(1, 2)
    unit = torch.nn.functional.normalize(stream, dim=-1)
    expected = torch.einsum("ind,jnd->ij", unit, unit) / unit.shape[1]
    torch.testing.assert_close(importance.boundary_cosine, expected, rtol=0, atol=2e-3)


def test_importance_is_cached_by_its_inputs(tmp_path):
    teacher = tiny_model()
    tokens = calibration()
    first, path = cached_importance(teacher, "t", tokens, "d", SETTINGS, tmp_path)
    assert path.is_file()
    with torch.no_grad():
        teacher.model.layers[0].mlp.up_proj.weight.mul_(3)  # a change the cache key cannot see
    again, same_path = cached_importance(teacher, "t", tokens, "d", SETTINGS, tmp_path)
    assert same_path == path and torch.equal(again.neurons, first.neurons)
    other, other_path = cached_importance(teacher, "t", tokens, "other-data", SETTINGS, tmp_path)
    assert other_path != path and not torch.equal(other.neurons, first.neurons)
    assert isinstance(Importance.load(path), Importance)
