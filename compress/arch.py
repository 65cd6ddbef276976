"""Architectures as records: the five numbers a candidate is made of, its config, its size.

The parameter count is analytic (from the config alone) so the search can reject candidates
before building them; a test checks it against sum(p.numel()) for many shapes.
"""

import copy
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


def head_dim(config: "PretrainedConfig") -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def validate_target(target: Architecture, teacher: "PretrainedConfig") -> None:
    """Reject targets that cannot be cut from the teacher as a vanilla, GQA-consistent config."""
    source = Architecture.of(teacher)
    for field, value in target.as_dict().items():
        limit = getattr(source, field)
        if value < 1:
            raise SlimnasError(f"invalid target: {field}={value} must be at least 1")
        if value > limit:
            raise SlimnasError(f"invalid target: {field}={value} is larger than the teacher's {limit}")
    if target.num_attention_heads % target.num_key_value_heads:
        raise SlimnasError(
            f"invalid target: {target.num_attention_heads} attention heads are not divisible "
            f"into {target.num_key_value_heads} KV groups"
        )
    teacher_group = source.num_attention_heads // source.num_key_value_heads
    if target.num_attention_heads // target.num_key_value_heads > teacher_group:
        raise SlimnasError(
            f"invalid target: {target.num_attention_heads // target.num_key_value_heads} query heads per KV group "
            f"exceed the teacher's {teacher_group}"
        )
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


def param_count(config: "PretrainedConfig", arch: Architecture | None = None) -> int:
    """Exact number of parameters of a Llama-family model (tied weights counted once).

    With `arch`, the count is for that architecture cut from `config` (no config object is built,
    so the search can size thousands of candidates cheaply).
    """
    arch = arch or Architecture.of(config)
    hidden, inter, vocab = arch.hidden_size, arch.intermediate_size, config.vocab_size
    heads, kv, dim = arch.num_attention_heads, arch.num_key_value_heads, head_dim(config)
    qkv_bias = getattr(config, "attention_bias", False) or config.model_type == "qwen2"
    o_bias = getattr(config, "attention_bias", False)
    mlp_bias = getattr(config, "mlp_bias", False)

    attention = hidden * dim * (heads + 2 * kv) + heads * dim * hidden
    attention += dim * (heads + 2 * kv) if qkv_bias else 0
    attention += hidden if o_bias else 0
    attention += 2 * dim if config.model_type == "qwen3" else 0  # q_norm and k_norm
    mlp = 3 * hidden * inter + ((2 * inter + hidden) if mlp_bias else 0)
    layer = attention + mlp + 2 * hidden  # two RMSNorms
    embeddings = vocab * hidden * (1 if config.tie_word_embeddings else 2)
    return embeddings + arch.num_hidden_layers * layer + hidden  # + final norm


def weight_bytes(config: "PretrainedConfig", dtype: str = "bfloat16", arch: Architecture | None = None) -> int:
    return param_count(config, arch) * DTYPE_BYTES[dtype]


def flops_per_token(config: "PretrainedConfig", context: int) -> int:
    """Forward FLOPs for one token at a given context length: 2 x matmul params + attention scores."""
    embedding_lookup = config.vocab_size * config.hidden_size  # a gather, not a matmul
    matmul_params = param_count(config) - embedding_lookup * (0 if config.tie_word_embeddings else 1)
    attention = 4 * config.num_hidden_layers * config.num_attention_heads * head_dim(config) * context
    return 2 * matmul_params + attention
