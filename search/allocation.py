"""The importance-proportional allocation (a baseline with no search): each layer's FFN width in proportion to its
block importance (1 - cos between the residual stream entering and leaving it), the attention kept whole.

Widths grow in steps of `multiple` neurons, capped at the teacher's width: layer i's k-th step comes at scale
k x multiple / score_i, so at any scale each width is about scale x score. The candidate is the one after the most
steps whose sizes meet the budget (every size only grows with the steps, so the count is found by bisection).
"""

import bisect
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace

from transformers import PretrainedConfig

from slimnas.compress.arch import PerLayerArchitecture
from slimnas.compress.blocks import Sizes
from slimnas.core.errors import SlimnasError
from slimnas.search.mip import BlockBudget


def proportional_allocation(
    config: PretrainedConfig, layer_scores: Sequence[float], budget: BlockBudget, context: int, multiple: int = 1
) -> PerLayerArchitecture:
    """The rule's candidate under `budget` (FLOPs at `context`: the block library's, to compare with its picks)."""
    teacher = PerLayerArchitecture.of(config)
    if len(layer_scores) != len(teacher.layers) or min(layer_scores) < 0 or max(layer_scores) <= 0 or multiple < 1:
        raise SlimnasError(
            f"proportional allocation needs one non-negative score per layer ({len(teacher.layers)}), not all 0, "
            "and multiple >= 1"
        )
    steps = sorted(
        (k * multiple / score, i)
        for i, (layer, score) in enumerate(zip(teacher.layers, layer_scores, strict=True))
        if score > 0
        for k in range(1, -(-layer.intermediate_size // multiple) + 1)
    )

    def candidate(taken: int) -> PerLayerArchitecture:
        counts = Counter(i for _, i in steps[:taken])
        layers = (
            replace(s, intermediate_size=min(s.intermediate_size, counts[i] * multiple))
            for i, s in enumerate(teacher.layers)
        )
        return PerLayerArchitecture(teacher.hidden_size, tuple(layers))

    def too_big(taken: int) -> bool:
        return not budget.allows(Sizes.of(config, candidate(taken), context))

    fitting = bisect.bisect_left(range(len(steps) + 1), True, key=too_big)
    if fitting == 0:
        raise SlimnasError(
            f"budget unreachable: {budget.describe()} is not met even with every FFN removed "
            f"({Sizes.of(config, candidate(0), context)})"
        )
    return candidate(fitting - 1)
