"""Reference candidates: simple cuts every study runs to the last rung, so the search has something to beat.

uniform (one shrink ratio on every dimension), depth_only (the teacher's width, fewer layers cut as one
block) and width_only (the teacher's depth, narrower layers). The fourth reference, the zero-shot pick
(NVIDIA ModelOpt's choice), is the screen's best (search.screen): every study's first trial.
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING

from slimnas.compress.arch import Architecture
from slimnas.search.constraints import Budget
from slimnas.search.setup import SearchSetup

if TYPE_CHECKING:
    from transformers import PretrainedConfig


@dataclass(frozen=True)
class Reference:
    """A simple baseline candidate every study runs to the last rung, to be compared against."""

    kind: str  # uniform | depth_only | width_only
    arch: Architecture
    note: str  # how it was chosen, e.g. its per-dimension ratios
    depth_strategy: str | None = None  # overrides pruning.depth_strategy (depth-only drops one block)


SHORT_NAMES = {
    "hidden_size": "hidden",
    "intermediate_size": "ffn",
    "num_attention_heads": "heads",
    "num_key_value_heads": "kv",
    "num_hidden_layers": "layers",
}


def _ratio_text(arch: Architecture, teacher: Architecture) -> str:
    return " ".join(f"{SHORT_NAMES[name]} {ratio:.2f}" for name, ratio in arch.ratios(teacher).items())


def uniform_reference(
    feasible: list[Architecture], teacher: "PretrainedConfig", budget: Budget, tolerance: float
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


def depth_only_reference(feasible: list[Architecture], teacher: "PretrainedConfig", budget: Budget):
    """The teacher's width with fewer layers, nearest the parameter target, cut as one contiguous block."""
    width = Architecture.of(teacher)
    same_width = [a for a in feasible if _width(a) == _width(width)]
    best = min(same_width, key=lambda a: abs(budget.target_gap(teacher, a)), default=None)
    if best is None:
        return None, "depth_only: no feasible candidate keeps the teacher's width"
    note = f"{best.num_hidden_layers} of {width.num_hidden_layers} layers, one contiguous block dropped"
    return Reference("depth_only", best, note, depth_strategy="contiguous"), f"depth_only: {best.label()}, {note}"


def width_only_reference(feasible: list[Architecture], teacher: "PretrainedConfig", budget: Budget):
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


def find_reference(kind: str, setup: SearchSetup) -> tuple[Reference | None, str]:
    """The reference of one kind for this search's space and budget, or None and why not."""
    feasible, teacher, budget = list(setup.feasible), setup.context.teacher.model.config, setup.settings.budget
    if kind == "uniform":
        return uniform_reference(feasible, teacher, budget, setup.settings.references.uniform_tolerance)
    if kind == "depth_only":
        return depth_only_reference(feasible, teacher, budget)
    return width_only_reference(feasible, teacher, budget)
