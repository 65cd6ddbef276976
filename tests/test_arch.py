import random

import pytest
from conftest import tiny_config, tiny_model

from slimnas.compress.arch import Architecture, param_count, validate_target
from slimnas.core.errors import SlimnasError


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_param_count_equals_numel_for_random_shapes(model_type):
    rng = random.Random(model_type)
    for _ in range(6):
        kv = rng.choice([1, 2, 3])
        overrides = dict(
            vocab_size=rng.randint(50, 300),
            intermediate_size=rng.randint(8, 200),
            num_key_value_heads=kv,
            head_dim=rng.choice([8, 16]),
            num_hidden_layers=rng.randint(1, 4),
            tie_word_embeddings=rng.random() < 0.5,
        )
        heads = kv * rng.choice([1, 2, 3])
        overrides.update(num_attention_heads=heads, hidden_size=heads * rng.choice([4, 8, 16]))
        if model_type == "llama":
            overrides.update(attention_bias=rng.random() < 0.5, mlp_bias=rng.random() < 0.5)
        model = tiny_model(model_type, **overrides)
        assert param_count(model.config) == sum(p.numel() for p in model.parameters()), overrides


def teacher_config():
    return tiny_config(num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4)


@pytest.mark.parametrize(
    "target, message",
    [
        (Architecture(128, 96, 4, 2, 4), "larger than the teacher"),
        (Architecture(64, 200, 4, 2, 4), "larger than the teacher"),
        (Architecture(64, 96, 4, 2, 5), "larger than the teacher"),
        (Architecture(64, 96, 3, 2, 4), "not divisible"),
        (Architecture(64, 96, 4, 2, 0), "at least 1"),
        (Architecture(0, 96, 4, 2, 4), "at least 1"),
        (Architecture(64, 96, 4, 1, 4), "exceed the teacher"),
        (Architecture(62, 96, 4, 2, 4), "not a multiple of the number of attention heads"),
    ],
)
def test_invalid_targets_are_rejected(target, message):
    with pytest.raises(SlimnasError, match=message):
        validate_target(target, teacher_config())


def test_hidden_must_match_heads_times_head_dim_when_config_derives_head_dim():
    config = tiny_config(head_dim=None, hidden_size=64, num_attention_heads=4)
    config.head_dim = None
    with pytest.raises(SlimnasError, match="heads x head_dim"):
        validate_target(Architecture(48, 96, 4, 2, 4), config)
    validate_target(Architecture(48, 96, 3, 3, 4), tiny_config(num_attention_heads=4, num_key_value_heads=4))
