"""Puzzle's selection as seeds of a per-layer study (search.blocks): the block library's MIP picks within the
parameter budget, and the importance-proportional allocation.

The block library (compress.blocks) is measured for the per-layer space's variants (search.space.per_layer's FFN
widths and KV groups) on a subset of the selection documents (search.blocks.documents, .positions), or read from
its cache, which any study of the same teacher, variants and documents shares (a rerun, another budget, other
seeds). The MIP (search.mip) then picks the search.blocks.mip_solutions choices of least summed block KL within
the budget's parameter window (search.layer_space's bounds: the target's window, the weight-memory cap), each
differing from the others in search.blocks.differ_by sub-blocks or more, every one a point of the per-layer
space. The proportional allocation (search.allocation) steps each layer's FFN width along the space's FFN widths,
with the space's most KV groups: a point of the space too. The picks are seeds, not the answer (additive block
costs miss how layers interact): the screen scores them with its sample and the race decides.
"""

import math
import time
from dataclasses import dataclass, replace

from transformers import PretrainedConfig

from slimnas.compress.arch import PerLayerArchitecture, param_count
from slimnas.compress.blocks import BlockLibrary, BlockVariants, build_block_library, library_file
from slimnas.compress.heldout import HeldoutSet
from slimnas.compress.importance import Importance
from slimnas.compress.models import LoadedModel
from slimnas.core.errors import SlimnasError
from slimnas.core.files import read_jsonl
from slimnas.search.allocation import proportional_allocation
from slimnas.search.constraints import Budget
from slimnas.search.layer_space import LayerSpace
from slimnas.search.mip import BlockBudget, mip_pick
from slimnas.search.settings import BlockSettings

MIP, PROPORTIONAL = "mip", "proportional"  # the seeds' proposers in the study's records


@dataclass(frozen=True)
class BlockSeeds:
    """The seed shapes by origin, and the library they came from: `slimnas baselines` takes the MIP's best and the
    proportional allocation as methods of their own and charges the library's seconds to the methods that read it;
    a study predicts its trials' KL from it."""

    mip: tuple[PerLayerArchitecture, ...]  # the MIP's picks, best predicted first
    proportional: PerLayerArchitecture | None  # None: off (search.blocks.proportional) or outside the budget
    library: BlockLibrary  # every measured cut, and the teacher's own blocks (cost 0)

    @property
    def library_seconds(self) -> float:
        """The library's cuts, at the seconds they took when measured (cached or not; the teacher's own blocks: 0)."""
        return sum(block.seconds for block in self.library.blocks)

    def proposers(self) -> dict[PerLayerArchitecture, str]:
        """Each seed shape with its proposer, best predicted first; a proportional allocation the MIP also picked
        counts as the MIP's."""
        seeds = dict.fromkeys(self.mip, MIP)
        if self.proportional is not None:
            seeds.setdefault(self.proportional, PROPORTIONAL)
        return seeds


def check_blocks(space: LayerSpace, config: PretrainedConfig) -> None:
    """The library cuts the teacher's layers at its hidden size: that size must be a reachable one of the space."""
    if config.hidden_size not in space.reachable:
        raise SlimnasError(
            f"search.blocks needs the teacher's hidden size {config.hidden_size} among the per-layer space's "
            f"reachable hidden sizes {list(space.reachable)}: add it to search.space.hidden_size, or set "
            "search.blocks.enabled=false"
        )


def space_variants(space: LayerSpace) -> BlockVariants:
    return BlockVariants(
        ffn=tuple(sorted({v.intermediate_size for v in space.variants})),
        kv_groups=tuple(sorted({v.num_key_value_heads for v in space.variants})),
    )


def within_space(library: BlockLibrary, variants: BlockVariants) -> BlockLibrary:
    """The library without the teacher's own sizes where the space lacks them: every pick is a point of the space."""
    return replace(library, blocks=tuple(b for b in library.blocks if b.size in variants.sizes(b.kind)))


def window_of(space: LayerSpace) -> BlockBudget:
    """The budget's parameter window as the MIP's cap and floor."""
    return BlockBudget(
        params=math.floor(space.high) if math.isfinite(space.high) else None,
        min_params=math.ceil(space.low) if space.low > 0 else None,
    )


def block_seeds(
    settings: BlockSettings,
    space: LayerSpace,
    teacher: LoadedModel,
    importance: Importance,
    selection: HeldoutSet,
    budget: Budget,
) -> BlockSeeds:
    """The MIP's picks and the proportional allocation. Prints one line: what the library cost (now, and when its
    cuts were measured) and the MIP's best predicted KL."""
    config = teacher.model.config
    documents = selection.subset(settings.documents, settings.positions)
    variants = space_variants(space)
    path = library_file(teacher, importance, documents, variants)
    cached = len(read_jsonl(path)) if path.is_file() else 0
    started = time.perf_counter()
    library = build_block_library(teacher.model, importance, documents, variants, path)
    seconds = time.perf_counter() - started
    picks = mip_pick(within_space(library, variants), window_of(space), settings.mip_solutions, settings.differ_by)
    cuts = [b for b in library.blocks if b.seconds > 0]
    print(
        f"block library: {len(cuts)} single-block cuts ({len(cuts) - cached} measured now, {cached} cached) on "
        f"{len(documents.rows)} selection documents (the last {documents.positions} of their {library.context} "
        f"positions scored), {seconds:.1f} s now ({sum(b.seconds for b in cuts):.1f} s of cuts when measured); MIP: "
        f"{len(picks)} picks, the best predicted KL {picks[0].kl:.4g} at {picks[0].sizes.params:,} params"
    )
    proportional = _proportional(config, importance, space, budget, library.context) if settings.proportional else None
    return BlockSeeds(tuple(pick.arch for pick in picks), proportional, library)


def _proportional(
    config: PretrainedConfig, importance: Importance, space: LayerSpace, budget: Budget, context: int
) -> PerLayerArchitecture | None:
    """The proportional allocation, or None (with a line saying why) when it cannot meet the budget."""
    widths = sorted({v.intermediate_size for v in space.variants})
    groups = max(v.num_key_value_heads for v in space.variants)  # the attention whole, or as near as the space has
    scores = importance.layer_scores().tolist()
    try:
        shape = proportional_allocation(config, scores, replace(window_of(space), min_params=None), context,
                                        widths=widths, kv_groups=groups)  # fmt: skip
    except SlimnasError as error:
        print(f"proportional allocation not screened: {error}")
        return None
    if not budget.allows(config, shape):
        print(f"proportional allocation not screened: {param_count(config, shape):,} parameters, outside "
              f"{budget.describe(config)}")  # fmt: skip
        return None
    return shape
