"""Per-layer (heterogeneous) students: a config class and a causal LM per supported family, registered with
transformers' Auto classes.

transformers states a per-layer shape in the config itself (`per_layer_config`: a layer's own
`intermediate_size`, `num_attention_heads`, `num_key_value_heads`, and `skip: ["attention"]` / `["mlp"]` for a
removed sub-block), but its Llama-family modeling still builds every layer from the global values. Each family
here gets a config class of its own model type (`slimnas_llama`, ...) and a subclass of the family's causal LM
that rebuilds each decoder layer from `config.per_layer_config[i]`, with a removed attention or MLP (and its
norm) replaced by a module that adds nothing and holds no weights. A uniform student stays a plain model of
the teacher's family.

`import slimnas.models` (this module) registers the classes; then `AutoModelForCausalLM.from_pretrained(dir)`
loads a per-layer student, with no remote code. Without the import transformers refuses the unknown model
type, so a per-layer checkpoint is never loaded with the wrong shapes.
"""

from contextlib import contextmanager

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PretrainedConfig,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.integrations.heterogeneity import configuration_utils as heterogeneity
from transformers.utils import logging

from slimnas.compress.arch import (
    PER_LAYER_FIELDS,
    PER_LAYER_PREFIX,
    SKIP_ATTENTION,
    SKIP_MLP,
    Architecture,
    LayerShape,
    PerLayerArchitecture,
    family,
    pruned_config,
)


class _PerLayerConfig:
    """The family's config with a shape per layer. The family's own architecture check (e.g. Llama: hidden size a
    multiple of the head count) reads the global head count, which a per-layer config forbids, and would refuse
    heads that are valid with the pinned head_dim: each layer is checked here instead."""

    def validate_architecture(self) -> None:
        layers = self.per_layer_config if self.is_heterogeneous else [self]  # type: ignore[attr-defined]
        for index, layer in enumerate(layers):
            if SKIP_ATTENTION in getattr(layer, "skip", []):
                if index == 0:
                    raise ValueError("layer 0 keeps its attention: caches read head sizes from it")
                continue
            heads, kv = layer.num_attention_heads, layer.num_key_value_heads
            if heads < 1 or kv < 1 or heads % kv:
                raise ValueError(f"layer {index}: {heads} attention heads do not split into {kv} KV groups")


@strict
class SlimnasLlamaConfig(_PerLayerConfig, LlamaConfig):
    model_type = PER_LAYER_PREFIX + "llama"


@strict
class SlimnasMistralConfig(_PerLayerConfig, MistralConfig):
    model_type = PER_LAYER_PREFIX + "mistral"


@strict
class SlimnasQwen2Config(_PerLayerConfig, Qwen2Config):
    model_type = PER_LAYER_PREFIX + "qwen2"


@strict
class SlimnasQwen3Config(_PerLayerConfig, Qwen3Config):
    model_type = PER_LAYER_PREFIX + "qwen3"


class RemovedAttention(nn.Module):
    """A layer's attention when its `skip` names it: adds nothing to the residual stream, writes no cache."""

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> tuple[torch.Tensor, None]:
        return torch.zeros_like(hidden_states), None


class RemovedMLP(nn.Module):
    """A layer's MLP when its `skip` names it: adds nothing to the residual stream."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


@contextmanager
def _global_values(config: PretrainedConfig):
    """Let the family's constructor read the global values of per-layer fields (its layers are rebuilt after), without
    transformers' warning about it."""
    logger = logging.get_logger(heterogeneity.__name__)
    level = logger.level
    config.allow_global_per_layer_attribute_access = True
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        config.allow_global_per_layer_attribute_access = False
        logger.setLevel(level)


class _PerLayerCausalLM:
    """The family's causal LM with each decoder layer built from its own config."""

    def __init__(self, config: PretrainedConfig):
        with _global_values(config):
            super().__init__(config)  # type: ignore[call-arg]  # the family's model, next in the MRO
        layer_class = type(self.model.layers[0])  # type: ignore[attr-defined]
        layers = [_layer(layer_class, config.per_layer_config[i], i) for i in range(config.num_hidden_layers)]
        self.model.layers = nn.ModuleList(layers)  # type: ignore[attr-defined]
        self.post_init()  # type: ignore[attr-defined]  # initialise the rebuilt layers as the family would


def _layer(layer_class: type[nn.Module], config: PretrainedConfig, index: int) -> nn.Module:
    layer = layer_class(config, index)
    if SKIP_ATTENTION in config.skip:
        layer.self_attn, layer.input_layernorm = RemovedAttention(), nn.Identity()
    if SKIP_MLP in config.skip:
        layer.mlp, layer.post_attention_layernorm = RemovedMLP(), nn.Identity()
    return layer


class SlimnasLlamaForCausalLM(_PerLayerCausalLM, LlamaForCausalLM):
    config_class = SlimnasLlamaConfig


class SlimnasMistralForCausalLM(_PerLayerCausalLM, MistralForCausalLM):
    config_class = SlimnasMistralConfig


class SlimnasQwen2ForCausalLM(_PerLayerCausalLM, Qwen2ForCausalLM):
    config_class = SlimnasQwen2Config


class SlimnasQwen3ForCausalLM(_PerLayerCausalLM, Qwen3ForCausalLM):
    config_class = SlimnasQwen3Config


PER_LAYER_MODELS = (
    SlimnasLlamaForCausalLM,
    SlimnasMistralForCausalLM,
    SlimnasQwen2ForCausalLM,
    SlimnasQwen3ForCausalLM,
)
for _model in PER_LAYER_MODELS:
    AutoConfig.register(_model.config_class.model_type, _model.config_class, exist_ok=True)
    AutoModelForCausalLM.register(_model.config_class, _model, exist_ok=True)


def per_layer_config(teacher: PretrainedConfig, target: PerLayerArchitecture) -> PretrainedConfig:
    """The student's config: the teacher's with the target's hidden size, the per-layer model type and the kept
    layers' shapes in `per_layer_config` (a global value is the most common per layer, so the mapping is sparse)."""
    kept = [i for i, layer in enumerate(target.layers) if layer.kept]
    stem = Architecture(target.hidden_size, *(target.global_value(field) for field in PER_LAYER_FIELDS), len(kept))
    values = pruned_config(teacher, stem, kept).to_dict()
    values["per_layer_config"] = {j: _overrides(target.layers[i]) for j, i in enumerate(kept)}
    for key in ("model_type", "architectures", "transformers_version"):
        values.pop(key, None)
    return AutoConfig.for_model(PER_LAYER_PREFIX + family(teacher), **values)


def _overrides(layer: LayerShape) -> dict:
    """A layer's entry in per_layer_config: its sizes, and `skip` naming what it removes."""
    removed = ((SKIP_ATTENTION, layer.num_attention_heads), (SKIP_MLP, layer.intermediate_size))
    skip = [name for name, size in removed if not size]
    sizes = {field: getattr(layer, field) for field in PER_LAYER_FIELDS if getattr(layer, field)}
    return sizes | ({"skip": skip} if skip else {})
