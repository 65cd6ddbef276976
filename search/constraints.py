"""Budget constraints on candidates: analytic (parameters, weight memory), measured (latency), and KD tokens."""

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING

from slimnas.compress.arch import DTYPE_BYTES, Shape, param_count
from slimnas.core.errors import SlimnasError

if TYPE_CHECKING:
    from transformers import PretrainedConfig


@dataclass
class Budget:
    params: float | None = 0.6  # target: a fraction of the teacher's parameters (<= 1) or a count; null: no target
    window: float = 0.1  # accepted relative distance from the target (0.1 = +-10%)
    cap: bool = False  # true: the target is a cap, candidates lie within `window` below it (comparisons at equal size)
    weight_memory_mb: float | None = None  # bf16 weight bytes at most
    latency_ms: float | None = None  # measured p50 decode latency at most (checked after measuring)
    kd_tokens: int | None = None  # KD tokens the whole study may spend (every trial's rungs, the leaders' extensions)

    def __post_init__(self):
        if self.params is not None and self.params <= 0:
            raise SlimnasError(f"invalid budget: params must be positive, not {self.params}")
        if self.window < 0:
            raise SlimnasError(f"invalid budget: window must be >= 0, not {self.window}")
        if self.kd_tokens is not None and self.kd_tokens < 1:
            raise SlimnasError(f"invalid budget: kd_tokens must be at least 1 or null, not {self.kd_tokens}")

    def target_params(self, teacher: "PretrainedConfig") -> int | None:
        if self.params is None:
            return None
        return int(self.params * param_count(teacher)) if self.params <= 1 else int(self.params)

    def target_gap(self, teacher: "PretrainedConfig", arch: Shape) -> float:
        """Relative distance of the candidate's parameter count from the target (0 without a target)."""
        target = self.target_params(teacher)
        return 0.0 if target is None else (param_count(teacher, arch) - target) / target

    def param_bounds(self, teacher: "PretrainedConfig") -> tuple[int, float]:
        """The parameter counts a candidate may have, both inclusive (the upper one infinite without a cap): the
        target's window and the bf16 weight memory (2 bytes a parameter) as whole parameters. `allows` and the
        per-layer space's bounds (search.layer_space) both use these integers, so they agree to the last parameter
        at the edge, where two float tests (a relative gap, a scaled bound) can round apart."""
        target = self.target_params(teacher)
        low, high = 0, math.inf
        if target is not None:
            window = Fraction(str(self.window))  # the decimal as written: 1300 x (1 + 0.15) is 1495, not 1494.99...
            low = math.ceil(target * (1 - window))
            high = target if self.cap else math.floor(target * (1 + window))
        if self.weight_memory_mb is not None:
            high = min(high, math.floor(self.weight_memory_mb * 2**20 / DTYPE_BYTES["bfloat16"]))
        return low, high

    def allows(self, teacher: "PretrainedConfig", arch: Shape) -> bool:
        low, high = self.param_bounds(teacher)
        return low <= param_count(teacher, arch) <= high

    def over(self, final: dict) -> str | None:
        """Which measured budget a candidate that reached the last rung breaks, from its final metrics; None when it
        meets them all. Such a candidate stays in the tables but is never a leader, the pick or retrained first."""
        if self.latency_ms is None:
            return None
        latency = final.get("latency_p50_ms")
        if latency is None:
            return f"p50 decode latency not measured (budget {self.latency_ms} ms)"
        return f"p50 decode latency {latency:.1f} ms > {self.latency_ms} ms" if latency > self.latency_ms else None

    def window_text(self) -> str:
        return f"at most, down to -{self.window:.0%}" if self.cap else f"+-{self.window:.0%}"

    def describe(self, teacher: "PretrainedConfig") -> str:
        parts = []
        target = self.target_params(teacher)
        if target is not None:
            parts.append(f"params {target:,} {self.window_text()}")
        if self.weight_memory_mb is not None:
            parts.append(f"bf16 weights <= {self.weight_memory_mb} MB")
        if self.latency_ms is not None:
            parts.append(f"p50 decode latency <= {self.latency_ms} ms (measured)")
        if self.kd_tokens is not None:
            parts.append(f"{self.kd_tokens:,} KD tokens in all")
        return ", ".join(parts) or "none"
