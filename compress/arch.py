"""Architectures as records: the five numbers a uniform candidate is made of, or a shape per layer; its config,
its size.

The parameter count, weight bytes and FLOPs per token are analytic (from the config alone) so the search can
reject candidates before building them; tests check them against sum(p.numel()) and a counted forward.
"""

import copy
from collections import Counter
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from slimnas.core.errors import SlimnasError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Architecture:
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    num_hidden_layers: int

    @classmethod
    def of(cls, config: "PretrainedConfig") -> "Architecture":
        """A uniform model's shape; a per-layer one has none (pruning and the search take a uniform teacher)."""
        if getattr(config, "is_heterogeneous", False):
            raise SlimnasError(
                f"a per-layer model ({config.model_type}) cannot be the teacher here: pruning and the search take "
                "a uniform teacher"
            )
        return cls(
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_key_value_heads or config.num_attention_heads,
            num_hidden_layers=config.num_hidden_layers,
        )

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def ratios(self, teacher: "Architecture") -> dict[str, float]:
        """Each dimension as a fraction of the teacher's."""
        return {name: value / getattr(teacher, name) for name, value in self.as_dict().items()}

    def label(self) -> str:
        return (
            f"h{self.hidden_size}-ffn{self.intermediate_size}-q{self.num_attention_heads}"
            f"-kv{self.num_key_value_heads}-L{self.num_hidden_layers}"
        )


PER_LAYER_FIELDS = ("intermediate_size", "num_attention_heads", "num_key_value_heads")
PER_LAYER_PREFIX = "slimnas_"  # model_type of a per-layer student: slimnas_ + its family (compress/modeling.py)
SKIP_ATTENTION, SKIP_MLP = "attention", "mlp"  # names in a layer's `skip` list (transformers' per_layer_config)


@dataclass(frozen=True)
class LayerShape:
    """One decoder layer: 0 heads means its attention is removed, 0 neurons its MLP; both, the layer is dropped."""

    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int

    @property
    def kept(self) -> bool:
        return bool(self.intermediate_size or self.num_attention_heads)


@dataclass(frozen=True)
class PerLayerArchitecture:
    """A heterogeneous candidate: one hidden size, each layer's own FFN width and attention.

    As a target, `layers` has one entry per teacher layer (a dropped layer is all zeros); read from a student's
    config, one per student layer.
    """

    hidden_size: int
    layers: tuple[LayerShape, ...]

    @classmethod
    def of(cls, config: "PretrainedConfig") -> "PerLayerArchitecture":
        if not getattr(config, "is_heterogeneous", False):
            return cls.from_uniform(Architecture.of(config))
        layers = []
        for layer in config.per_layer_config:
            heads = 0 if SKIP_ATTENTION in layer.skip else layer.num_attention_heads
            kv = (layer.num_key_value_heads or heads) if heads else 0
            layers.append(LayerShape(0 if SKIP_MLP in layer.skip else layer.intermediate_size, heads, kv))
        return cls(config.hidden_size, tuple(layers))

    @classmethod
    def from_uniform(cls, arch: "Architecture") -> "PerLayerArchitecture":
        shape = LayerShape(arch.intermediate_size, arch.num_attention_heads, arch.num_key_value_heads)
        return cls(arch.hidden_size, (shape,) * arch.num_hidden_layers)

    @classmethod
    def from_dict(cls, values: dict) -> "PerLayerArchitecture":
        """From as_dict's form: the hidden size and one list per field, one entry per layer."""
        lengths = {len(values[field]) for field in PER_LAYER_FIELDS}
        if len(lengths) != 1:
            raise SlimnasError(f"invalid target: the per-layer lists {', '.join(PER_LAYER_FIELDS)} differ in length")
        rows = zip(*(values[field] for field in PER_LAYER_FIELDS), strict=True)
        return cls(values["hidden_size"], tuple(LayerShape(*row) for row in rows))

    def as_dict(self) -> dict:
        """The hidden size and one list per field (transformers' per-layer attributes), one entry per layer."""
        return {"hidden_size": self.hidden_size} | {
            field: [getattr(layer, field) for layer in self.layers] for field in PER_LAYER_FIELDS
        }

    def uniform(self) -> "Architecture | None":
        """The same candidate as a uniform Architecture, when every kept layer is whole and alike."""
        kept = {layer for layer in self.layers if layer.kept}
        if len(kept) != 1:
            return None
        (shape,) = kept
        if not all(getattr(shape, field) for field in PER_LAYER_FIELDS):
            return None
        count = sum(layer.kept for layer in self.layers)
        return Architecture(self.hidden_size, *(getattr(shape, field) for field in PER_LAYER_FIELDS), count)

    def global_value(self, field: str) -> int:
        """The config's global value of a per-layer field: the most common among layers that have it (0: none has)."""
        values = [getattr(layer, field) for layer in self.layers if getattr(layer, field)]
        return Counter(values).most_common(1)[0][0] if values else 0

    def label(self) -> str:
        def cut(layer: LayerShape) -> str:
            heads, kv = layer.num_attention_heads, layer.num_key_value_heads
            return f"{f'q{heads}kv{kv}' if heads else '-'}/{layer.intermediate_size or '-'}"

        return f"h{self.hidden_size}-" + ".".join(cut(layer) for layer in self.layers if layer.kept)


Shape = Architecture | PerLayerArchitecture


def shape_of(values: dict) -> Shape:
    """A shape from its record (`as_dict`'s form): per layer when the per-layer fields are lists."""
    if isinstance(values.get("intermediate_size"), list):
        return PerLayerArchitecture.from_dict(values)
    return Architecture(**values)


def architecture_of(config: "PretrainedConfig") -> Shape:
    """A checkpoint's shape: uniform when its config is, else per layer."""
    arch = PerLayerArchitecture.of(config)
    return arch.uniform() or arch


def family(config: "PretrainedConfig") -> str:
    """The model family a config belongs to (llama, mistral, qwen2, qwen3), per-layer students included."""
    return config.model_type.removeprefix(PER_LAYER_PREFIX)


def head_dim(config: "PretrainedConfig") -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def validate_target(target: Shape, teacher: "PretrainedConfig") -> None:
    """Reject targets that cannot be cut from the teacher: a uniform one as a vanilla, GQA-consistent config of the
    teacher's class, a per-layer one layer by layer (a per-layer target whose kept layers are alike is uniform)."""
    if isinstance(target, PerLayerArchitecture):
        _validate_per_layer(target, teacher)
        if (uniform := target.uniform()) is None:
            return
        target = uniform
    source = Architecture.of(teacher)
    for field, value in target.as_dict().items():
        _check_size(field, value, getattr(source, field), minimum=1)
    _check_groups(target.num_attention_heads, target.num_key_value_heads, source, "")
    _check_config_rules(target, teacher)
    if getattr(teacher, "head_dim", None) is None and target.hidden_size != source.hidden_size:
        # Without an explicit head_dim the config derives it from hidden_size / heads.
        if target.hidden_size % target.num_attention_heads or (
            target.hidden_size // target.num_attention_heads != head_dim(teacher)
        ):
            raise SlimnasError(
                f"invalid target: hidden_size {target.hidden_size} must equal heads x head_dim "
                f"({target.num_attention_heads} x {head_dim(teacher)}) for this config"
            )


def _check_size(field: str, value: int, limit: int, minimum: int) -> None:
    if value < minimum:
        raise SlimnasError(f"invalid target: {field}={value} must be at least {minimum}")
    if value > limit:
        raise SlimnasError(f"invalid target: {field}={value} is larger than the teacher's {limit}")


def _check_groups(heads: int, kv: int, source: "Architecture | LayerShape", where: str) -> None:
    """Query heads split evenly over the KV groups, no more per group than the teacher has."""
    if heads % kv:
        raise SlimnasError(f"invalid target: {heads} attention heads{where} are not divisible into {kv} KV groups")
    teacher_group = source.num_attention_heads // source.num_key_value_heads
    if heads // kv > teacher_group:
        raise SlimnasError(
            f"invalid target: {heads // kv} query heads per KV group{where} exceed the teacher's {teacher_group}"
        )


def _validate_per_layer(target: PerLayerArchitecture, teacher: "PretrainedConfig") -> None:
    source = PerLayerArchitecture.of(teacher)
    if len(target.layers) != len(source.layers):
        raise SlimnasError(
            f"invalid target: {len(target.layers)} per-layer shapes for a teacher of {len(source.layers)} layers "
            "(a dropped layer is 0 everywhere)"
        )
    _check_size("hidden_size", target.hidden_size, source.hidden_size, minimum=1)
    for i, (layer, limit) in enumerate(zip(target.layers, source.layers, strict=True)):
        for field in PER_LAYER_FIELDS:
            _check_size(f"{field}[{i}]", getattr(layer, field), getattr(limit, field), minimum=0)
        if bool(layer.num_attention_heads) != bool(layer.num_key_value_heads):
            raise SlimnasError(
                f"invalid target: layer {i} has {layer.num_attention_heads} attention heads and "
                f"{layer.num_key_value_heads} KV groups: both 0 (attention removed) or both at least 1"
            )
        if layer.num_attention_heads:
            _check_groups(layer.num_attention_heads, layer.num_key_value_heads, limit, f" in layer {i}")
    if not target.layers[0].num_attention_heads:
        raise SlimnasError("invalid target: layer 0 keeps its attention (caches and llama.cpp read head sizes from it)")


def _check_config_rules(target: Architecture, teacher: "PretrainedConfig") -> None:
    """The model class's own config validation (e.g. Llama: hidden_size a multiple of the head count)."""
    values = {**teacher.to_dict(), **target.as_dict(), "head_dim": head_dim(teacher)}
    values.pop("layer_types", None)
    try:
        type(teacher)(**values)
    except Exception as error:  # transformers raises its own validation error types
        reason = str(error).strip().splitlines()[-1].strip().removeprefix("ValueError: ")  # the rule, not the trace
        raise SlimnasError(f"invalid target: {reason}") from error


def pruned_config(teacher: "PretrainedConfig", target: Architecture, kept_layers: list[int]) -> "PretrainedConfig":
    """The teacher's config with the target's sizes; head_dim pinned so RoPE and attention stay intact."""
    config = copy.deepcopy(teacher)
    for field, value in target.as_dict().items():
        setattr(config, field, value)
    config.head_dim = head_dim(teacher)
    layer_types = getattr(teacher, "layer_types", None)
    if layer_types is not None:
        config.layer_types = [layer_types[i] for i in kept_layers]
    if getattr(teacher, "max_window_layers", None) is not None:
        config.max_window_layers = min(teacher.max_window_layers, target.num_hidden_layers)
    return config


def _per_layer(config: "PretrainedConfig", arch: Shape | None) -> PerLayerArchitecture:
    if arch is None:
        return PerLayerArchitecture.of(config)
    return arch if isinstance(arch, PerLayerArchitecture) else PerLayerArchitecture.from_uniform(arch)


def _layer_params(config: "PretrainedConfig", hidden: int, layer: LayerShape) -> tuple[int, int]:
    """(all parameters, matmul weights) of one decoder layer; a removed sub-block has neither weights nor norm."""
    heads, kv, inter = layer.num_attention_heads, layer.num_key_value_heads, layer.intermediate_size
    dim = head_dim(config)
    qkv_bias = getattr(config, "attention_bias", False) or family(config) == "qwen2"
    o_bias = getattr(config, "attention_bias", False)
    mlp_bias = getattr(config, "mlp_bias", False)
    attention_matmul = hidden * dim * (heads + 2 * kv) + heads * dim * hidden
    mlp_matmul = 3 * hidden * inter
    params = 0
    if heads:
        params += attention_matmul + hidden  # + input_layernorm
        params += dim * (heads + 2 * kv) if qkv_bias else 0
        params += hidden if o_bias else 0
        params += 2 * dim if family(config) == "qwen3" else 0  # q_norm and k_norm
    if inter:
        params += mlp_matmul + hidden  # + post_attention_layernorm
        params += (2 * inter + hidden) if mlp_bias else 0
    return params, attention_matmul + mlp_matmul


def param_count(config: "PretrainedConfig", arch: Shape | None = None) -> int:
    """Exact number of parameters of a Llama-family model (tied weights counted once).

    With `arch`, the count is for that architecture cut from `config` (no config object is built,
    so the search can size thousands of candidates cheaply).
    """
    shape = _per_layer(config, arch)
    hidden = shape.hidden_size
    embeddings = config.vocab_size * hidden * (1 if config.tie_word_embeddings else 2)
    layers = sum(_layer_params(config, hidden, layer)[0] for layer in shape.layers)
    return embeddings + layers + hidden  # + final norm


def weight_bytes(config: "PretrainedConfig", dtype: str = "bfloat16", arch: Shape | None = None) -> int:
    return param_count(config, arch) * DTYPE_BYTES[dtype]


def flops_per_token(config: "PretrainedConfig", context: int, arch: Shape | None = None) -> int:
    """Forward FLOPs of one token attending to `context` positions: 2 per matmul weight (the projections and the
    vocabulary head; the embedding is a gather) plus QK^T and AV in every layer that keeps its attention.
    Norms, biases, activations and RoPE are elementwise and left out, as torch's FLOP counter does."""
    shape = _per_layer(config, arch)
    hidden, dim = shape.hidden_size, head_dim(config)
    matmul = config.vocab_size * hidden + sum(_layer_params(config, hidden, layer)[1] for layer in shape.layers)
    attention = sum(4 * layer.num_attention_heads * dim * context for layer in shape.layers)
    return 2 * matmul + attention
