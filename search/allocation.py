"""The importance-proportional allocation (a baseline with no search): each layer's FFN width in proportion to its
block importance (1 - cos between the residual stream entering and leaving it), the attention kept whole.

Widths grow along a grid (`widths`, e.g. a per-layer space's FFN variants; by default every width), capped at the
teacher's width: layer i steps up to the grid's k-th width w_k at scale w_k / score_i, so at any scale each layer
has the widest grid width under scale x score, and every width the rule gives is on the grid. The candidate is the
one after the most steps whose sizes meet the budget (every size only grows with the steps, so the count is found by
bisection). With `kv_groups`, every layer keeps that many KV groups instead of the teacher's (a space without the
teacher's attention).
"""

import bisect
from collections import Counter
from collections.abc import Sequence

from transformers import PretrainedConfig

from slimnas.compress.arch import LayerShape, PerLayerArchitecture
from slimnas.compress.blocks import Sizes
from slimnas.core.errors import SlimnasError
from slimnas.search.mip import BlockBudget


def proportional_allocation(
    config: PretrainedConfig,
    layer_scores: Sequence[float],
    budget: BlockBudget,
    context: int,
    widths: Sequence[int] | None = None,
    kv_groups: int | None = None,
) -> PerLayerArchitecture:
    """The rule's candidate under `budget` (FLOPs at `context`: the block library's, to compare with its picks)."""
    teacher = PerLayerArchitecture.of(config)
    whole = teacher.layers[0]
    grid = sorted({w for w in (range(whole.intermediate_size + 1) if widths is None else widths)
                   if 0 <= w <= whole.intermediate_size})  # fmt: skip
    groups = whole.num_key_value_heads if kv_groups is None else kv_groups
    if len(layer_scores) != len(teacher.layers) or min(layer_scores) < 0 or max(layer_scores) <= 0:
        raise SlimnasError(
            f"proportional allocation needs one non-negative score per layer ({len(teacher.layers)}), not all 0"
        )
    if not grid or not 0 < groups <= whole.num_key_value_heads:
        raise SlimnasError(
            f"proportional allocation needs an FFN width within the teacher's {whole.intermediate_size} and KV "
            f"groups in [1, {whole.num_key_value_heads}]"
        )
    heads = groups * (whole.num_attention_heads // whole.num_key_value_heads)
    steps = sorted((width / score, i) for i, score in enumerate(layer_scores) if score > 0 for width in grid[1:])

    def candidate(taken: int) -> PerLayerArchitecture:
        counts = Counter(i for _, i in steps[:taken])
        layers = (LayerShape(grid[counts[i]], heads, groups) for i in range(len(teacher.layers)))
        return PerLayerArchitecture(teacher.hidden_size, tuple(layers))

    def too_big(taken: int) -> bool:
        return not budget.allows(Sizes.of(config, candidate(taken), context))

    fitting = bisect.bisect_left(range(len(steps) + 1), True, key=too_big)
    if fitting == 0:
        raise SlimnasError(
            f"budget unreachable: {budget.describe()} is not met even with every FFN at {grid[0]} neurons "
            f"({Sizes.of(config, candidate(0), context)})"
        )
    return candidate(fitting - 1)
