"""Objectives of the search, and the non-dominated subset of a set of points (for fronts in fewer dimensions)."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Objective:
    name: str
    direction: str  # maximize or minimize
    metric: str  # key in a trial record's `final` metrics
    measured: bool = False  # a timing: only comparable between trials timed on the same hardware


OBJECTIVES = {
    "quality": Objective("quality", "maximize", "quality"),
    "params": Objective("params", "minimize", "params"),
    "throughput": Objective("throughput", "maximize", "decode_speedup", measured=True),  # vs the teacher, ABBA
    "latency": Objective("latency", "minimize", "latency_vs_teacher", measured=True),  # p50 per token, ratio
}
QUALITY_METRICS = ("heldout_kl", "summary")  # quality = -held-out KL, or the lm-eval summary score


def objectives_of(names: list[str]) -> list[Objective]:
    return [OBJECTIVES[name] for name in names]


def dominates(a: list[float], b: list[float], directions: list[str]) -> bool:
    """a is at least as good as b everywhere and strictly better somewhere."""
    better_somewhere = False
    for x, y, direction in zip(a, b, directions, strict=True):
        if direction == "minimize":
            x, y = -x, -y
        if x < y:
            return False
        better_somewhere = better_somewhere or x > y
    return better_somewhere


def pareto_front(points: dict[int, list[float]], directions: list[str]) -> list[int]:
    """Keys of the non-dominated points."""
    return sorted(k for k, p in points.items() if not any(dominates(q, p, directions) for q in points.values()))
