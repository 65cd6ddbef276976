"""Objectives of the search and the Pareto front over completed trials."""

from dataclasses import dataclass

from slimnas.compress.runtime.errors import SlimnasError


@dataclass(frozen=True)
class Objective:
    name: str
    direction: str  # maximize or minimize
    metric: str  # key in a trial record's `final` metrics
    measured: bool = False  # a timing: only comparable between trials timed on the same hardware


OBJECTIVES = {
    "quality": Objective("quality", "maximize", "quality"),
    "params": Objective("params", "minimize", "params"),
    "throughput": Objective("throughput", "maximize", "decode_speedup", measured=True),  # vs the teacher, paired
    "latency": Objective("latency", "minimize", "latency_vs_teacher", measured=True),  # p50 per token, ratio
}
QUALITY_METRICS = ("heldout_kl", "summary")  # quality = -held-out KL, or the lm-eval summary score


def objectives_from_config(names: list[str]) -> list[Objective]:
    unknown = [n for n in names if n not in OBJECTIVES]
    if unknown or not names:
        raise SlimnasError(f"unknown objective(s) {unknown or names}: choose from {', '.join(OBJECTIVES)}")
    return [OBJECTIVES[n] for n in names]


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


def front_of(records: list, objectives: list[Objective], latency_ms: float | None = None) -> list[int]:
    """Trial numbers on the Pareto front: completed trials within the latency budget, by their objectives."""
    points = {
        r.trial: [r.final[o.metric] for o in objectives]
        for r in records
        if r.state == "complete" and (latency_ms is None or r.final.get("latency_p50_ms", 0.0) <= latency_ms)
    }
    return pareto_front(points, [o.direction for o in objectives])
