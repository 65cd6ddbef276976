"""The per-layer search space (search.proposals=per_layer): one hidden size, and for each layer one variant of its
FFN width and KV groups, under the parameter budget, feasible by construction.

Such a space has about variants^layers points, so it is never enumerated. A candidate is built one layer at a
time, and a layer may take only a variant after which the layers still to choose can bring the total into the
budget: with U the parameters chosen so far and [m, M] the least and the most the remaining layers can add, a
variant of c parameters is allowed when U + c + m <= high and U + c + M >= low. The test is exact, not a
relaxation, when the budget's window is at least `step`, the largest gap between one layer's variant sizes:
raising the remaining layers one variant at a time from all-least to all-most moves the total by at most `step`
each time, so it passes through any window that wide. So no choice is a dead end and every candidate meets the
budget; a narrower `search.budget.window` is refused in one line.

The sampler proposes a hidden size and each layer's KV groups and FFN width as integers (`kv_I`, `ffn_I`, the
teacher's ranges: any uniform cut can be told in the same terms); `decode` takes, layer by layer, the allowed
variant nearest to them (KV groups first). Random candidates (the screen's sample) take a random allowed variant
per layer, the layers in a random order, so no layer is always the last one, squeezed by the others' choices.
"""

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from slimnas.compress.arch import (
    Architecture,
    LayerShape,
    PerLayerArchitecture,
    param_count,
    validate_target,
)
from slimnas.core.errors import SlimnasError
from slimnas.search.constraints import Budget
from slimnas.search.space import PerLayerSpaceSettings

if TYPE_CHECKING:
    import optuna
    from transformers import PretrainedConfig

HIDDEN = "hidden_size"  # the sampler's parameter names: hidden_size, then kv_I and ffn_I for every layer I


def kv_param(layer: int) -> str:
    return f"kv_{layer}"


def ffn_param(layer: int) -> str:
    return f"ffn_{layer}"


@dataclass(frozen=True)
class LayerSpace:
    hidden_sizes: tuple[int, ...]  # search.space.hidden_size's values: the sampler's choices
    reachable: tuple[int, ...]  # those with candidates under the budget
    variants: tuple[LayerShape, ...]  # what a layer may be (layer 0: only those with attention)
    layers: int  # the teacher's
    low: int  # parameters, inclusive (Budget.param_bounds)
    high: float  # an integer, or infinite without a cap
    base: dict[int, int]  # hidden size -> parameters outside the layers (embeddings, final norm)
    costs: dict[int, dict[LayerShape, int]]  # hidden size -> variant -> its parameters
    teacher_ffn: int
    teacher_kv: int

    @classmethod
    def of(
        cls, settings: PerLayerSpaceSettings, hidden_sizes: list[int], teacher: "PretrainedConfig", budget: Budget
    ) -> "LayerSpace":
        """The space under the budget; one line when no candidate meets it, or when the window is too narrow."""
        source = Architecture.of(teacher)  # a per-layer teacher is refused here
        group = source.num_attention_heads // source.num_key_value_heads
        quarters = [round(source.intermediate_size * k / 4) for k in range(5)]
        ffn = _variants("ffn", settings.ffn, quarters, source.intermediate_size)
        kv = _variants("kv_groups", settings.kv_groups, list(range(source.num_key_value_heads + 1)),
                       source.num_key_value_heads)  # fmt: skip
        if not any(kv):
            raise SlimnasError("invalid search space: search.space.per_layer.kv_groups needs a value above 0 (layer 0 "
                               "keeps its attention)")  # fmt: skip
        variants = tuple(LayerShape(width, groups * group, groups) for groups in kv for width in ffn)
        low, high = budget.param_bounds(teacher)  # Budget.allows's own bounds: no candidate is on the wrong side
        space = cls(tuple(hidden_sizes), (), variants, source.num_hidden_layers, low, high, {}, {},
                    source.intermediate_size, source.num_key_value_heads)  # fmt: skip
        reachable, narrow = [], []
        for hidden in hidden_sizes:
            if not _valid_hidden(hidden, variants, source, teacher):
                continue
            space.base[hidden] = param_count(teacher, PerLayerArchitecture(hidden, ()))
            space.costs[hidden] = {
                v: param_count(teacher, PerLayerArchitecture(hidden, (v,))) - space.base[hidden] for v in variants
            }
            least, most = (space.base[hidden] + n for n in space._range(hidden, list(range(space.layers))))
            if least > high or most < low:
                continue
            step = max(_largest_gap([space.costs[hidden][v] for v in space.options(i)]) for i in (0, 1))
            (narrow if step > high - low else reachable).append((hidden, step))
        if narrow:
            hidden, step = narrow[0]
            raise SlimnasError(
                f"search.budget.window is too narrow for per-layer proposals: at hidden size {hidden} one layer's "
                f"variants differ by up to {step:,} parameters, more than the budget's window ({high - low:,.0f}); "
                f"widen the window or give search.space.per_layer finer variants"
            )
        if not reachable:
            raise SlimnasError(
                f"budget unreachable: no per-layer candidate (hidden sizes {list(hidden_sizes)}, FFN widths {ffn}, "
                f"KV groups {kv} per layer) meets {budget.describe(teacher)}"
            )
        return replace(space, reachable=tuple(hidden for hidden, _ in reachable))

    def options(self, layer: int) -> list[LayerShape]:
        """The variants a layer may take: layer 0 keeps its attention (caches and llama.cpp read head sizes there)."""
        return [v for v in self.variants if v.num_attention_heads or layer]

    def params(self, shape: PerLayerArchitecture) -> int:
        return self.base[shape.hidden_size] + sum(self.costs[shape.hidden_size][v] for v in shape.layers)

    def points(self) -> int:
        """How many candidates the space has before the budget."""
        return len(self.hidden_sizes) * len(self.options(0)) * len(self.variants) ** (self.layers - 1)

    def _range(self, hidden: int, layers: list[int]) -> tuple[int, int]:
        """The least and the most parameters of these layers."""
        costs = self.costs[hidden]
        least = sum(min(costs[v] for v in self.options(i)) for i in layers)
        return least, sum(max(costs[v] for v in self.options(i)) for i in layers)

    def build(
        self, hidden: int, choose: Callable[[int, list[LayerShape]], LayerShape], order: list[int]
    ) -> PerLayerArchitecture:
        """A candidate chosen layer by layer in `order`, each from the variants that keep the budget reachable."""
        costs, chosen = self.costs[hidden], {}
        total = self.base[hidden]
        least, most = self._range(hidden, order)
        for layer in order:
            first, last = self._range(hidden, [layer])
            least, most = least - first, most - last  # what the layers after this one can add
            allowed = [
                v for v in self.options(layer)
                if total + costs[v] + least <= self.high and total + costs[v] + most >= self.low
            ]  # fmt: skip
            chosen[layer] = choose(layer, allowed)
            total += costs[chosen[layer]]
        return PerLayerArchitecture(hidden, tuple(chosen[layer] for layer in range(self.layers)))

    def decode(self, hidden: int, wanted: list[tuple[int, int]]) -> PerLayerArchitecture:
        """The feasible candidate nearest to a proposal: a hidden size and (KV groups, FFN width) per layer."""
        hidden = min(self.reachable, key=lambda h: (abs(h - hidden), h))
        return self.build(hidden, lambda layer, allowed: _nearest(allowed, *wanted[layer]), list(range(self.layers)))

    def random(self, rng: random.Random) -> PerLayerArchitecture:
        """A random feasible candidate: a random allowed variant per layer, the layers in a random order."""
        order = rng.sample(range(self.layers), self.layers)
        return self.build(rng.choice(self.reachable), lambda layer, allowed: rng.choice(allowed), order)

    def stratified_sample(self, n: int, seed: int) -> list[PerLayerArchitecture]:
        """n distinct candidates spread over the budget: from a pool of random ones, one of each of n strata of equal
        count by parameters (all of the pool when it has fewer)."""
        rng = random.Random(seed)
        pool = list(dict.fromkeys(self.random(rng) for _ in range(8 * n)))
        ranked = sorted(pool, key=lambda shape: (self.params(shape), shape.label()))
        strata = [ranked[len(ranked) * k // n : len(ranked) * (k + 1) // n] for k in range(n)]
        return [rng.choice(stratum) for stratum in strata if stratum]

    def suggest(self, trial: "optuna.Trial") -> PerLayerArchitecture:
        """The sampler's proposal, decoded to the nearest feasible candidate."""
        hidden = trial.suggest_categorical(HIDDEN, list(self.hidden_sizes))
        wanted = [
            (trial.suggest_int(kv_param(i), 0, self.teacher_kv), trial.suggest_int(ffn_param(i), 0, self.teacher_ffn))
            for i in range(self.layers)
        ]
        return self.decode(hidden, wanted)

    def encode(self, shape: PerLayerArchitecture) -> dict[str, int]:
        """A candidate in the sampler's terms (a feasible one decodes back to itself)."""
        values = {HIDDEN: shape.hidden_size}
        for i, layer in enumerate(shape.layers):
            values |= {kv_param(i): layer.num_key_value_heads, ffn_param(i): layer.intermediate_size}
        return values

    def distributions(self) -> dict:
        from optuna.distributions import CategoricalDistribution, IntDistribution

        distributions: dict = {HIDDEN: CategoricalDistribution(list(self.hidden_sizes))}
        for i in range(self.layers):
            distributions |= {kv_param(i): IntDistribution(0, self.teacher_kv),
                              ffn_param(i): IntDistribution(0, self.teacher_ffn)}  # fmt: skip
        return distributions

    def describe(self) -> str:
        ffn = sorted({v.intermediate_size for v in self.variants})
        kv = sorted({v.num_key_value_heads for v in self.variants})
        return (
            f"per-layer candidates of hidden size {', '.join(map(str, self.reachable))}, each of {self.layers} layers "
            f"one of FFN {ffn} x KV groups {kv} (layer 0 keeps its attention; ~10^{math.log10(self.points()):.0f} "
            f"points), {self.low:,.0f} to {self.high:,.0f} parameters"
        )


def _variants(name: str, values: list[int] | None, default: list[int], teacher_value: int) -> list[int]:
    chosen = sorted({v for v in (default if values is None else values) if v <= teacher_value})
    if not chosen or chosen[0] < 0:
        raise SlimnasError(f"invalid search space: search.space.per_layer.{name} needs values in [0, {teacher_value}]")
    return chosen


def _valid_hidden(hidden: int, variants: tuple[LayerShape, ...], source: Architecture, teacher) -> bool:
    """Whether every whole variant at this hidden size passes the model's own config rules (a candidate whose kept
    layers are alike is checked, and saved, as a uniform one)."""
    try:
        for v in variants:
            if v.intermediate_size and v.num_attention_heads:
                shape = (v.intermediate_size, v.num_attention_heads, v.num_key_value_heads, source.num_hidden_layers)
                validate_target(Architecture(hidden, *shape), teacher)
    except SlimnasError:
        return False
    return True


def _largest_gap(sizes: list[int]) -> int:
    ordered = sorted(sizes)
    return max((b - a for a, b in zip(ordered, ordered[1:], strict=False)), default=0)


def _nearest(allowed: list[LayerShape], kv: int, ffn: int) -> LayerShape:
    """The allowed variant nearest to (kv, ffn): KV groups first, then FFN width; ties to the smaller."""
    groups = min({v.num_key_value_heads for v in allowed}, key=lambda k: (abs(k - kv), k))
    same = [v for v in allowed if v.num_key_value_heads == groups]
    return min(same, key=lambda v: (abs(v.intermediate_size - ffn), v.intermediate_size))
