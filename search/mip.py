"""The MIP pick (Puzzle's selection, no KD): one attention and one FFN variant per layer from the block library,
minimising the summed block KL under caps on parameters, bf16 weight bytes and FLOPs per token, and a floor on
parameters (a search's budget is a window: search.budget.window).

Every cap is linear in the binary choices (a block changes each size by a fixed amount, compress.blocks), so the
pick is a small 0/1 program, solved exactly by scipy's `milp` (HiGHS, relative gap 0). The next best picks come
from no-good cuts: each later solve excludes every earlier choice (and, with `differ_by` > 1, every choice that
differs from one in fewer than `differ_by` sub-blocks), so the picks are distinct and come in order of predicted KL.
"""

from dataclasses import dataclass, fields

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from slimnas.compress.arch import PerLayerArchitecture
from slimnas.compress.blocks import ATTENTION, FFN, Block, BlockLibrary, Sizes
from slimnas.core.errors import SlimnasError


@dataclass(frozen=True)
class BlockBudget:
    """Caps on a per-layer candidate's totals, and a floor on its parameters; None: no cap, no floor."""

    params: int | None = None
    weight_bytes: int | None = None  # bf16
    flops_per_token: int | None = None  # at the block library's context
    min_params: int | None = None

    def caps(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(Sizes) if getattr(self, f.name) is not None}

    def allows(self, sizes: Sizes) -> bool:
        return all(getattr(sizes, name) <= cap for name, cap in self.caps().items()) and (
            self.min_params is None or sizes.params >= self.min_params
        )

    def describe(self) -> str:
        floor = [] if self.min_params is None else [f"params >= {self.min_params:,}"]
        return ", ".join([*floor, *(f"{name} <= {cap:,}" for name, cap in self.caps().items())]) or "none"


@dataclass(frozen=True)
class Pick:
    arch: PerLayerArchitecture
    kv_groups: tuple[int, ...]  # per layer (0: attention removed)
    ffn: tuple[int, ...]  # per layer (0: MLP removed)
    kl: float  # predicted: the sum of the chosen blocks' KL
    sizes: Sizes  # exact totals


def mip_pick(library: BlockLibrary, budget: BlockBudget, n: int = 1, differ_by: int = 1) -> list[Pick]:
    """The n best choices by summed block KL under the budget, best first (fewer when fewer choices exist)."""
    if n < 1 or differ_by < 1:
        raise SlimnasError(f"mip_pick needs n >= 1 and differ_by >= 1, not n={n}, differ_by={differ_by}")
    blocks = list(library.blocks)
    groups = sorted({(b.layer, b.kind) for b in blocks})
    one_each = np.array([[(b.layer, b.kind) == group for b in blocks] for group in groups], dtype=float)
    constraints = [LinearConstraint(one_each, 1, 1)]
    for name, cap in budget.caps().items():
        change = np.array([getattr(b.sizes, name) for b in blocks], dtype=float)
        constraints.append(LinearConstraint(change, -np.inf, cap - getattr(library.teacher_sizes, name)))
    if budget.min_params is not None:
        change = np.array([b.sizes.params for b in blocks], dtype=float)
        constraints.append(LinearConstraint(change, budget.min_params - library.teacher_sizes.params, np.inf))
    cost = np.array([b.kl for b in blocks])
    picks: list[Pick] = []
    while len(picks) < n:
        result = milp(cost, integrality=np.ones(len(blocks)), bounds=Bounds(0, 1), constraints=constraints,
                      options={"mip_rel_gap": 0})  # fmt: skip
        if result.status != 0 or result.x is None:
            if picks:  # every choice is taken
                return picks
            raise SlimnasError(_unreachable(library, budget))
        chosen = result.x > 0.5
        picks.append(_pick(library, [b for b, on in zip(blocks, chosen, strict=True) if on]))
        constraints.append(LinearConstraint(chosen.astype(float), -np.inf, len(groups) - differ_by))
    return picks


def _pick(library: BlockLibrary, chosen: list[Block]) -> Pick:
    size = {(b.layer, b.kind): b.size for b in chosen}
    layers = range(len(library.teacher.layers))
    kv_groups, ffn = tuple(size[i, ATTENTION] for i in layers), tuple(size[i, FFN] for i in layers)
    sizes = library.teacher_sizes
    for block in chosen:
        sizes += block.sizes
    return Pick(library.architecture(kv_groups, ffn), kv_groups, ffn, sum(b.kl for b in chosen), sizes)


def _unreachable(library: BlockLibrary, budget: BlockBudget) -> str:
    """Why no choice meets the budget: the smallest each capped total can be."""
    smallest = []
    for name in budget.caps():
        least = getattr(library.teacher_sizes, name)
        for layer, kind in sorted({(b.layer, b.kind) for b in library.blocks}):
            least += min(getattr(b.sizes, name) for b in library.options(layer, kind))
        smallest.append(f"{name} {least:,}")
    return (
        f"budget unreachable: no choice of the block library's variants meets {budget.describe()} "
        f"(the smallest: {', '.join(smallest)})"
    )
