"""The search space: allowed values per dimension, and the feasible architectures under a budget.

Every dimension's values come from the config (explicit choices, or a range below the teacher's
value with a step, a divisor and a maximum pruning fraction). Feasibility is analytic: the target
must be cuttable from the teacher (compress.arch.validate_target) and meet the budget, so no compute
is spent on a candidate that could never count.
"""

import itertools
import math
from dataclasses import dataclass, fields

from transformers import PretrainedConfig

from compress.arch import Architecture, validate_target
from compress.runtime.errors import SlimnasError
from search.constraints import Budget

DIMENSIONS = [f.name for f in fields(Architecture)]


@dataclass(frozen=True)
class DimensionSpec:
    choices: tuple[int, ...] | None = None  # explicit values; the rest is ignored when given
    min: int | None = None
    max: int | None = None  # default: the teacher's value
    step: int = 1  # values are max, max - step, ...
    multiple_of: int = 1
    max_prune: float = 0.5  # lowest value = ceil(teacher x (1 - max_prune)) unless min is given

    def values(self, name: str, teacher_value: int) -> list[int]:
        if self.choices is not None:
            values = sorted(set(self.choices))
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
class SearchSpace:
    values: dict[str, list[int]]

    @classmethod
    def from_config(cls, specs: dict[str, dict], teacher: PretrainedConfig) -> "SearchSpace":
        unknown = set(specs) - set(DIMENSIONS)
        if unknown:
            raise SlimnasError(f"invalid search space: unknown dimension(s) {', '.join(sorted(unknown))}")
        source = Architecture.of(teacher).as_dict()
        values = {}
        for name in DIMENSIONS:
            spec = dict(specs.get(name) or {})
            if spec.get("choices") is not None:
                spec["choices"] = tuple(spec["choices"])
            try:
                values[name] = DimensionSpec(**spec).values(name, source[name])
            except TypeError as error:
                raise SlimnasError(f"invalid search space: {name}: {error}") from error
        return cls(values)

    def size(self) -> int:
        return math.prod(len(v) for v in self.values.values())

    def feasible(self, teacher: PretrainedConfig, budget: Budget) -> list[Architecture]:
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


@dataclass(frozen=True)
class Reference:
    """A simple baseline candidate every study runs to the last rung, to be compared against."""

    kind: str  # uniform | depth_only | width_only | zero_shot
    arch: Architecture
    note: str  # how it was chosen, e.g. its per-dimension ratios
    depth_strategy: str | None = None  # overrides pruning.depth_strategy (depth-only drops one block)


def _ratio_text(arch: Architecture, teacher: Architecture) -> str:
    return " ".join(
        f"{name.split('_')[-1] if name != 'num_key_value_heads' else 'kv'} {ratio:.2f}"
        for name, ratio in arch.ratios(teacher).items()
    )


def uniform_reference(
    feasible: list[Architecture], teacher: PretrainedConfig, budget: Budget, tolerance: float
) -> tuple[Reference | None, str]:
    """One shrink ratio on every dimension (KV groups included), as far as the space allows.

    Snapping to the space and the model's shape rules rarely lands every dimension on the same
    ratio: the candidate with the smallest spread (largest minus smallest ratio) is taken, nearest the
    parameter target on ties. A spread above `tolerance` means the space cannot express a uniform cut
    at this budget; then there is no uniform reference, and the message says why.
    """
    source = Architecture.of(teacher)

    def spread(arch: Architecture) -> tuple[float, float]:
        ratios = arch.ratios(source).values()
        return round(max(ratios) - min(ratios), 6), abs(budget.target_gap(teacher, arch))

    best = min(feasible, key=spread, default=None)
    if best is None:
        return None, "uniform: no feasible candidate"
    width = spread(best)[0]
    text = f"ratios {_ratio_text(best, source)} (spread {width:.2f})"
    if width > tolerance:
        return None, (
            f"uniform: not expressible in this space at this budget: the most uniform candidate, "
            f"{best.label()}, has {text} > search.references.uniform_tolerance {tolerance}"
        )
    return Reference("uniform", best, text), f"uniform: {best.label()}, {text}"


def depth_only_reference(feasible: list[Architecture], teacher: PretrainedConfig, budget: Budget):
    """The teacher's width with fewer layers, nearest the parameter target, cut as one contiguous block."""
    width = Architecture.of(teacher)
    same_width = [a for a in feasible if _width(a) == _width(width)]
    best = min(same_width, key=lambda a: abs(budget.target_gap(teacher, a)), default=None)
    if best is None:
        return None, "depth_only: no feasible candidate keeps the teacher's width"
    note = f"{best.num_hidden_layers} of {width.num_hidden_layers} layers, one contiguous block dropped"
    return Reference("depth_only", best, note, depth_strategy="contiguous"), f"depth_only: {best.label()}, {note}"


def width_only_reference(feasible: list[Architecture], teacher: PretrainedConfig, budget: Budget):
    """The teacher's depth with narrower hidden / FFN / heads (Minitron's choice for models up to ~15B).

    Nearest the parameter target; on ties the one whose width ratios are closest to each other.
    """
    source = Architecture.of(teacher)
    full_depth = [a for a in feasible if a.num_hidden_layers == source.num_hidden_layers]

    def key(arch: Architecture) -> tuple[float, float]:
        ratios = [r for name, r in arch.ratios(source).items() if name != "num_hidden_layers"]
        return round(abs(budget.target_gap(teacher, arch)), 3), max(ratios) - min(ratios)

    best = min(full_depth, key=key, default=None)
    if best is None:
        return None, "width_only: no feasible candidate keeps the teacher's depth"
    note = f"all {source.num_hidden_layers} layers, ratios {_ratio_text(best, source)}"
    return Reference("width_only", best, note), f"width_only: {best.label()}, {note}"


def _width(arch: Architecture) -> tuple[int, int, int, int]:
    return arch.hidden_size, arch.intermediate_size, arch.num_attention_heads, arch.num_key_value_heads
