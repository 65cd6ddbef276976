"""A KD step against the machine's limit: what it computes, how fast the machine multiplies, where its time goes.

- FLOPs: analytic, from the configs (compress.arch.flops_per_token, which counts every matmul and attention's QK^T
  and AV; attention over the whole row, the PaLM convention, although a causal step needs half of it). A training
  step is the student's forward and its backward (twice the forward), plus the vocabulary projection again where the
  loss is checkpointed (more positions per micro-batch than `distill.chunk_tokens`), plus the teacher's forward when
  it runs live. A cached teacher computed its forward when its cache was filled; that is charged to the cached run's
  time (bench.peers), not to its step.
- Peak: the best of a few timed bf16 and fp32 matmuls of the step's largest shape (the vocabulary projection of one
  micro-batch), measured in the same run as the step, so the two share the machine's state.
- Profile: one KD step under torch.profiler, cut into the phases compress.distill names (`record_function`), each
  with its share of the step and, where it multiplies matrices, its FLOP/s against the peak. A phase nested in
  another (the head recomputed inside the backward) counts for the outer one, so the shares add up to the step.
"""

import time
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

from slimnas.compress.arch import flops_per_token
from slimnas.compress.distill import Distiller
from slimnas.core.device import synchronize

# Phases of a KD step, as compress.distill and compress.kd_loss name them, in the order a step runs them
PHASES = {
    "kd.teacher": "teacher targets (live forward / cache read)",
    "kd.student": "student forward (body)",
    "kd.head": "student vocabulary head (+ its log-softmax against a cache)",
    "kd.kl": "KL on the teacher's targets (live: its head, both log-softmaxes)",
    "kd.backward": "backward",
    "kd.optimizer": "optimizer (clip + AdamW)",
}
SLOW_SHARE, SLOW_PEAK = 0.2, 0.3  # a phase over 20% of the step and under 30% of the peak is flagged


@dataclass(frozen=True)
class StepFlops:
    """FLOPs per trained token of one KD step, by phase (the backward includes a recomputed head)."""

    teacher: int  # the teacher's body when live (its head is in `kl`: the live KL projects it per chunk), else 0
    student: int  # the student's body, forward
    head: int  # the student's vocabulary projection, forward
    kl: int  # the teacher's vocabulary projection when live; the KL itself is elementwise
    backward: int

    @property
    def total(self) -> int:
        return self.teacher + self.student + self.head + self.kl + self.backward

    def of(self, phase: str) -> int:
        return getattr(self, phase.removeprefix("kd."), 0)


def head_flops(config: PretrainedConfig) -> int:
    """Forward FLOPs per token of the vocabulary projection."""
    return 2 * config.vocab_size * config.hidden_size


def kd_step_flops(
    student: PretrainedConfig, teacher: PretrainedConfig | None, seq_len: int, head_recomputed: bool = False
) -> StepFlops:
    """FLOPs per token a KD step computes; `teacher` None: targets read from a cache (no teacher forward)."""
    forward = flops_per_token(student, seq_len)
    teacher_forward = flops_per_token(teacher, seq_len) if teacher is not None else 0
    teacher_head = head_flops(teacher) if teacher is not None else 0
    return StepFlops(
        teacher=teacher_forward - teacher_head,
        student=forward - head_flops(student),
        head=head_flops(student),
        kl=teacher_head,
        backward=2 * forward + (head_flops(student) if head_recomputed else 0),
    )


@dataclass(frozen=True)
class Peak:
    """The machine's measured matmul rate on the step's largest shape ([m, k] x [k, n])."""

    shape: tuple[int, int, int]
    bf16_flops_per_s: float
    fp32_flops_per_s: float

    def for_precision(self, bf16: bool) -> float:
        return self.bf16_flops_per_s if bf16 else self.fp32_flops_per_s


def largest_matmul(configs: list[PretrainedConfig], positions: int) -> tuple[int, int, int]:
    """The step's largest matmul: a model's vocabulary projection or MLP up-projection of one micro-batch."""
    shapes = [(positions, c.hidden_size, n) for c in configs for n in (c.vocab_size, c.intermediate_size)]
    return max(shapes, key=lambda s: s[0] * s[1] * s[2])


def matmul_rate(shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device, seconds: float = 1.0) -> float:
    """Best FLOP/s of repeated [m, k] x [k, n] matmuls, after one untimed, for at least `seconds` (2 to 10 of them)."""
    m, k, n = shape
    a, b = torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device)
    times: list[float] = []
    while len(times) < 3 or (sum(times[1:]) < seconds and len(times) < 11):
        synchronize(device)
        started = time.perf_counter()
        torch.matmul(a, b)
        synchronize(device)
        times.append(time.perf_counter() - started)
    return 2 * m * k * n / min(times[1:])


def measure_peak(shape: tuple[int, int, int], device: torch.device) -> Peak:
    return Peak(shape, matmul_rate(shape, torch.bfloat16, device), matmul_rate(shape, torch.float32, device))


@dataclass
class PhaseRow:
    phase: str
    what: str
    seconds: float
    share: float  # of the step's wall time
    flops_per_s: float | None  # analytic FLOPs of the phase / its time; None where it multiplies no matrices
    of_peak: float | None  # flops_per_s / the peak at the step's precision
    flagged: bool  # over SLOW_SHARE of the step and under SLOW_PEAK of the peak (or no matmul at all)


def _phase_seconds(events, device: torch.device) -> dict[str, float]:
    """Seconds in each phase, counting a phase only where no other phase encloses it."""
    totals = dict.fromkeys(PHASES, 0.0)
    for event in events:
        if event.name not in PHASES:
            continue
        parent, nested = event.cpu_parent, False
        while parent is not None and not nested:
            nested, parent = parent.name in PHASES, parent.cpu_parent
        if not nested:
            micros = event.device_time_total if device.type == "cuda" else event.cpu_time_total
            totals[event.name] += micros / 1e6
    return totals


def profile_kd_step(distiller: Distiller, flops: StepFlops, peak: float) -> list[PhaseRow]:
    """One step of a built distiller (its targets prepared, a first step already run) under torch.profiler, by phase;
    `peak`: the machine's FLOP/s at the step's precision."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if distiller.device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        synchronize(distiller.device)
        started = time.perf_counter()
        distiller.train_until(distiller.step + 1)
        synchronize(distiller.device)
        step_seconds = time.perf_counter() - started
    seconds = _phase_seconds(profiler.events(), distiller.device)
    seconds["other"] = max(0.0, step_seconds - sum(seconds.values()))
    tokens = distiller.tokens_per_step
    rows = []
    for phase, spent in seconds.items():
        work = flops.of(phase) * tokens
        rate = work / spent if work and spent > 0 else None
        of_peak = rate / peak if rate is not None else None
        share = spent / step_seconds
        slow = of_peak is None or of_peak < SLOW_PEAK
        rows.append(
            PhaseRow(phase, PHASES.get(phase, "the rest"), spent, share, rate, of_peak, share > SLOW_SHARE and slow)
        )
    return rows
