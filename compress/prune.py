"""Structured pruning: keep the most important channels, heads, neurons and layers of a teacher.

A uniform target keeps the same *number* of heads and neurons in every kept layer (so the result is a vanilla
config of the same model class); a per-layer target gives each layer its own numbers, and 0 removes a layer's
attention or MLP (compress/modeling.py builds such students). Either way each layer keeps its own *choice*,
ranked by its own scores. Attention stays GQA-consistent: whole KV groups are chosen by the summed importance
of their query heads, then the best query heads inside each kept group, laid out group by group as the
model's repeat_kv expects.

RMSNorm divides by the root mean square over the hidden channels, so after removing channels the
mean is taken over fewer of them; the norm weights are scaled by sqrt(teacher / student hidden size)
so that removing a channel that carries no signal changes nothing. (On SmolLM2 cut to hidden 384
this lowered the zero-shot held-out KL from 3.85 to 3.43.)
"""

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase
from transformers.initialization import no_init_weights

from slimnas.compress.arch import (
    Architecture,
    LayerShape,
    PerLayerArchitecture,
    Shape,
    architecture_of,
    head_dim,
    param_count,
    pruned_config,
    validate_target,
)
from slimnas.compress.importance import Importance
from slimnas.compress.modeling import per_layer_config
from slimnas.compress.settings import PruningSettings
from slimnas.core.errors import SlimnasError
from slimnas.core.files import write_json
from slimnas.core.rundir import MODEL_RECORD_FILE


@dataclass
class PrunePlan:
    layers: list[int]  # kept teacher layers, in order
    channels: list[int]  # kept embedding channels
    query_heads: list[list[int]]  # per kept layer: teacher query heads, grouped by KV group (none: removed)
    kv_heads: list[list[int]]  # per kept layer: teacher KV heads
    neurons: list[list[int]]  # per kept layer: teacher MLP neurons (none: removed)

    def as_dict(self) -> dict:
        return asdict(self)


def _top(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k largest scores, in ascending index order (ties broken by lower index)."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:k])


def select_layers(importance: Importance, keep: int, policy: PruningSettings | None = None) -> list[int]:
    """Layers to keep: the `keep` most important, or all but the least important contiguous block."""
    policy = policy or PruningSettings()
    n_layers = importance.boundary_cosine.shape[0] - 1
    if policy.depth_strategy == "independent":
        return _top(importance.layer_scores(policy.layer_metric), keep)
    drop = n_layers - keep
    if drop == 0:
        return list(range(n_layers))
    start = min(range(n_layers - drop + 1), key=lambda s: (importance.block_importance(s, drop), s))
    return [i for i in range(n_layers) if not start <= i < start + drop]


def plan_pruning(
    importance: Importance, teacher_config, target: Shape, policy: PruningSettings | None = None
) -> PrunePlan:
    validate_target(target, teacher_config)
    source = Architecture.of(teacher_config)
    group = source.num_attention_heads // source.num_key_value_heads
    if isinstance(target, Architecture):
        shape = LayerShape(target.intermediate_size, target.num_attention_heads, target.num_key_value_heads)
        shapes = {layer: shape for layer in select_layers(importance, target.num_hidden_layers, policy)}
    else:
        shapes = {layer: shape for layer, shape in enumerate(target.layers) if shape.kept}
    query_heads, kv_heads, neurons = [], [], []
    for layer, shape in shapes.items():
        scores = importance.heads[layer]
        group_scores = scores.view(source.num_key_value_heads, group).sum(1)
        kept_groups = _top(group_scores, shape.num_key_value_heads)
        per_group = shape.num_attention_heads // shape.num_key_value_heads if shape.num_key_value_heads else 0
        kv_heads.append(kept_groups)
        query_heads.append(
            [g * group + h for g in kept_groups for h in _top(scores[g * group : (g + 1) * group], per_group)]
        )
        neurons.append(_top(importance.neurons[layer], shape.intermediate_size))
    channels = _top(importance.channels, target.hidden_size)
    return PrunePlan(list(shapes), channels, query_heads, kv_heads, neurons)


def _head_rows(heads: list[int], dim: int) -> torch.Tensor:
    return torch.tensor([h * dim + d for h in heads for d in range(dim)])


def _slice(tensor: torch.Tensor, rows: torch.Tensor | None, cols: torch.Tensor | None = None) -> torch.Tensor:
    if rows is not None:
        tensor = tensor.index_select(0, rows)
    if cols is not None:
        tensor = tensor.index_select(1, cols)
    return tensor


def _pruned_tensor(name: str, teacher_state: dict, plan: PrunePlan, dim: int) -> torch.Tensor:
    """The teacher tensor behind one student parameter name, cut to the plan."""
    channels = torch.tensor(plan.channels)
    if name.startswith("model.layers."):
        _, _, new_index, rest = name.split(".", 3)
        j = int(new_index)
        source = teacher_state[f"model.layers.{plan.layers[j]}.{rest}"]
        q_rows, kv_rows = _head_rows(plan.query_heads[j], dim), _head_rows(plan.kv_heads[j], dim)
        mlp_rows = torch.tensor(plan.neurons[j])
        module, kind = rest.rsplit(".", 1)
        cuts = {
            "self_attn.q_proj": (q_rows, channels),
            "self_attn.k_proj": (kv_rows, channels),
            "self_attn.v_proj": (kv_rows, channels),
            "self_attn.o_proj": (channels, q_rows),
            "self_attn.q_norm": (None, None),
            "self_attn.k_norm": (None, None),
            "mlp.gate_proj": (mlp_rows, channels),
            "mlp.up_proj": (mlp_rows, channels),
            "mlp.down_proj": (channels, mlp_rows),
            "input_layernorm": (channels, None),
            "post_attention_layernorm": (channels, None),
        }
        if module not in cuts:
            raise SlimnasError(f"unsupported parameter {name}: slimnas cannot prune this architecture")
        rows, cols = cuts[module]
        return _slice(source, rows, cols if kind == "weight" else None)
    cuts = {
        "model.embed_tokens.weight": (None, channels),
        "lm_head.weight": (None, channels),
        "model.norm.weight": (channels, None),
    }
    if name not in cuts:
        raise SlimnasError(f"unsupported parameter {name}: slimnas cannot prune this architecture")
    return _slice(teacher_state[name], *cuts[name])


@torch.no_grad()
def prune_model(teacher: PreTrainedModel, plan: PrunePlan, target: Shape) -> PreTrainedModel:
    """A new model holding only the planned slices of the teacher's weights: of the teacher's class when the target
    is uniform, else the per-layer student of its family."""
    uniform = target.uniform() if isinstance(target, PerLayerArchitecture) else target
    if uniform is not None:
        config = pruned_config(teacher.config, uniform, plan.layers)
    else:
        config = per_layer_config(teacher.config, target)
    dtype = next(teacher.parameters()).dtype
    with no_init_weights():  # every parameter is overwritten below: random initialisation would cost seconds
        student = AutoModelForCausalLM.from_config(config, dtype=dtype)
    student.tie_weights()  # no_init_weights skips the tying too: tied embeddings stay one tensor, as counted
    teacher_state = teacher.state_dict()
    dim = head_dim(teacher.config)
    norm_scale = math.sqrt(teacher.config.hidden_size / target.hidden_size)
    for name, parameter in student.state_dict().items():
        tensor = _pruned_tensor(name, teacher_state, plan, dim)
        is_hidden_norm = name.endswith(("layernorm.weight", "model.norm.weight"))
        parameter.copy_(tensor * norm_scale if is_hidden_norm else tensor)
    return student.to(next(teacher.parameters()).device).eval()


def save_checkpoint(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: Path, record: dict) -> None:
    """A plain Hugging Face checkpoint (config + safetensors + tokenizer) plus slimnas.json provenance."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    shape = {"architecture": architecture_of(model.config).as_dict(), "params": param_count(model.config)}
    write_json(out_dir / MODEL_RECORD_FILE, {**shape, **record})
