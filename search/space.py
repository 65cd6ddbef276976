"""The search space: allowed values per dimension, and the feasible architectures under a budget.

Every dimension's values come from the config (explicit choices, or a range below the teacher's
value with a step, a divisor and a maximum pruning fraction). Feasibility is analytic: the target
must be cuttable from the teacher (compress.arch.validate_target) and meet the budget, so no compute
is spent on a candidate that could never count.
"""

import itertools
import math
import random
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

from slimnas.compress.arch import Architecture, validate_target
from slimnas.core.errors import SlimnasError
from slimnas.search.constraints import Budget

if TYPE_CHECKING:
    from transformers import PretrainedConfig

DIMENSIONS = [f.name for f in fields(Architecture)]


@dataclass
class DimensionSpec:
    choices: list[int] | None = None  # explicit values; the rest is ignored when given
    min: int | None = None
    max: int | None = None  # default: the teacher's value
    step: int = 1  # values are max, max - step, ...
    multiple_of: int = 1
    max_prune: float = 0.5  # lowest value = ceil(teacher x (1 - max_prune)) unless min is given

    def values(self, name: str, teacher_value: int) -> list[int]:
        if self.choices is not None:  # those above the teacher's value are left out (a chain's later, smaller teacher)
            values = sorted(v for v in set(self.choices) if v <= teacher_value)
        else:
            if not 0 <= self.max_prune < 1:
                raise SlimnasError(f"invalid search space: {name}.max_prune must be in [0, 1), not {self.max_prune}")
            if self.step < 1 or self.multiple_of < 1:
                raise SlimnasError(f"invalid search space: {name}.step and multiple_of must be at least 1")
            high = self.max if self.max is not None else teacher_value
            low = self.min if self.min is not None else math.ceil(teacher_value * (1 - self.max_prune))
            values = sorted(v for v in range(high, low - 1, -self.step) if v % self.multiple_of == 0)
        if not values:
            raise SlimnasError(f"invalid search space: dimension {name} has no values")
        if values[0] < 1 or values[-1] > teacher_value:
            raise SlimnasError(f"invalid search space: {name} values must lie in [1, {teacher_value}] (the teacher's)")
        return values


@dataclass
class PerLayerSpaceSettings:
    """search.proposals=per_layer: the variants each layer may take (search.layer_space); the hidden size, one for
    every layer, takes search.space.hidden_size's values. Values above the teacher's are left out (a chain's later,
    smaller teacher)."""

    ffn: list[int] | None = None  # FFN widths, 0 removes the MLP; null: 0 and quarters of the teacher's width
    kv_groups: list[int] | None = None  # KV groups, each with all its query heads, 0 removes the attention (layer 0
    # keeps it); a layer without both is dropped; null: 0 up to the teacher's KV groups


@dataclass
class SpaceSettings:
    """Per dimension: explicit choices, or values from max (default: the teacher's) down to min by step."""

    hidden_size: DimensionSpec = field(default_factory=lambda: DimensionSpec(multiple_of=64, max_prune=0.5))
    intermediate_size: DimensionSpec = field(default_factory=lambda: DimensionSpec(multiple_of=64, max_prune=0.6))
    num_attention_heads: DimensionSpec = field(default_factory=lambda: DimensionSpec(max_prune=0.67))
    num_key_value_heads: DimensionSpec = field(default_factory=lambda: DimensionSpec(max_prune=0.67))
    num_hidden_layers: DimensionSpec = field(default_factory=lambda: DimensionSpec(max_prune=0.5))
    per_layer: PerLayerSpaceSettings = field(default_factory=PerLayerSpaceSettings)


@dataclass
class SearchSpace:
    values: dict[str, list[int]]

    @classmethod
    def from_settings(cls, settings: SpaceSettings, teacher: "PretrainedConfig") -> "SearchSpace":
        source = Architecture.of(teacher).as_dict()
        return cls({name: getattr(settings, name).values(name, source[name]) for name in DIMENSIONS})

    def size(self) -> int:
        return math.prod(len(v) for v in self.values.values())

    def feasible(self, teacher: "PretrainedConfig", budget: Budget) -> list[Architecture]:
        """All architectures of the space that can be cut from the teacher and meet the budget."""
        valid_attention = {}
        for hidden, heads, kv in itertools.product(
            self.values["hidden_size"], self.values["num_attention_heads"], self.values["num_key_value_heads"]
        ):
            probe = Architecture(hidden, teacher.intermediate_size, heads, kv, teacher.num_hidden_layers)
            try:
                validate_target(probe, teacher)
                valid_attention[(hidden, heads, kv)] = True
            except SlimnasError:
                continue
        candidates = []
        for (hidden, heads, kv), ffn, layers in itertools.product(
            valid_attention, self.values["intermediate_size"], self.values["num_hidden_layers"]
        ):
            arch = Architecture(hidden, ffn, heads, kv, layers)
            if budget.allows(teacher, arch):
                candidates.append(arch)
        return candidates


ATTENTION, DEPTH, WIDTH = "attention", "depth_position", "width_position"  # the sampler's coordinates


@dataclass(frozen=True)
class FeasibleEncoding:
    """The feasible set as coordinates a sampler can model, where every point is a feasible candidate.

    A parameter budget leaves a thin shell of the space: most random combinations of the five sizes miss it,
    and a rejected proposal teaches a sampler nothing. So a candidate is proposed as
      attention: one of the (hidden, heads, KV heads) shapes that have feasible candidates,
      depth: a position in [0, 1] among that shape's feasible layer counts,
      width: a position in [0, 1] among the FFN sizes the budget leaves for that shape and depth,
    which keeps the order of depth and width for the sampler to learn, and never leaves the budget.
    """

    attention: dict[str, tuple[int, int, int]]  # label "hidden/heads/kv" -> shape
    layers: dict[tuple[int, int, int], list[int]]  # shape -> feasible layer counts, ascending
    widths: dict[tuple[int, int, int, int], list[int]]  # (shape, layers) -> feasible FFN sizes, ascending

    @classmethod
    def of(cls, feasible: list[Architecture]) -> "FeasibleEncoding":
        widths: dict[tuple[int, int, int, int], list[int]] = {}
        for arch in feasible:
            widths.setdefault((*_attention(arch), arch.num_hidden_layers), []).append(arch.intermediate_size)
        layers: dict[tuple[int, int, int], list[int]] = {}
        for *shape, depth in widths:
            layers.setdefault(tuple(shape), []).append(depth)
        attention = {"/".join(map(str, shape)): shape for shape in sorted(layers)}
        return cls(attention, {k: sorted(v) for k, v in layers.items()}, {k: sorted(v) for k, v in widths.items()})

    def decode(self, attention: str, depth: float, width: float) -> Architecture:
        shape = self.attention[attention]
        layers = _at(self.layers[shape], depth)
        hidden, heads, kv = shape
        return Architecture(hidden, _at(self.widths[(*shape, layers)], width), heads, kv, layers)

    def distributions(self) -> dict:
        """The sampler's three coordinates as Optuna distributions."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution

        return {
            ATTENTION: CategoricalDistribution(list(self.attention)),
            DEPTH: FloatDistribution(0.0, 1.0),
            WIDTH: FloatDistribution(0.0, 1.0),
        }

    def encode(self, arch: Architecture) -> dict:
        shape = _attention(arch)
        return {
            ATTENTION: "/".join(map(str, shape)),
            DEPTH: _position(self.layers[shape], arch.num_hidden_layers),
            WIDTH: _position(self.widths[(*shape, arch.num_hidden_layers)], arch.intermediate_size),
        }


def _attention(arch: Architecture) -> tuple[int, int, int]:
    return arch.hidden_size, arch.num_attention_heads, arch.num_key_value_heads


def _at(values: list[int], position: float) -> int:
    return values[round(position * (len(values) - 1))]


def _position(values: list[int], value: int) -> float:
    return values.index(value) / (len(values) - 1) if len(values) > 1 else 0.0


def stratified_sample(feasible: list[Architecture], n: int, seed: int) -> list[Architecture]:
    """n candidates spread over the space: round-robin over (attention shape, depth) groups, each shuffled."""
    rng = random.Random(seed)
    groups: dict[tuple, list[Architecture]] = {}
    for arch in feasible:
        groups.setdefault((*_attention(arch), arch.num_hidden_layers), []).append(arch)
    queues = [rng.sample(members, len(members)) for _, members in sorted(groups.items())]
    rng.shuffle(queues)
    sample: list[Architecture] = []
    while len(sample) < min(n, len(feasible)):
        for queue in queues:
            if queue and len(sample) < n:
                sample.append(queue.pop())
    return sample
