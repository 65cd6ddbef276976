"""A KD step, the screen and evaluation against the machine's limit: what they compute, how fast the machine
multiplies, where a step's time goes.

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
- The screen and evaluation (compress.heldout, forward only): one screened candidate is what search.screen.run_screen
  does for it, a prune plan, the pruned model (weights copied: no FLOPs) and HeldoutSet.evaluate on the selection
  documents; an evaluation is HeldoutSet.evaluate of a student on the evaluation documents. Either runs the student's
  body over every position of every document's row (under the command's autocast) and its vocabulary projection over
  the scored positions, in fp32 whatever the precision. The teacher runs in neither: its probabilities and entropies
  were computed once when the held-out set was built (its body and head over every position, the head in fp32) and
  are read back for every candidate; that one-off pass is timed as a third row. The KL against the cached
  probabilities, the logsumexp and the softmax are elementwise and not counted. With a body in bf16 and a head in
  fp32, the peak they are measured against is the one of both at their own precision: the FLOPs over the seconds the
  two would take at their measured peaks.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig, PreTrainedModel

from slimnas.compress.arch import Architecture, flops_per_token
from slimnas.compress.distill import Distiller
from slimnas.compress.heldout import CHUNK_POSITIONS, HeldoutSet
from slimnas.compress.importance import Importance
from slimnas.compress.prune import plan_pruning, prune_model
from slimnas.core.device import autocasts_bf16, model_device, synchronize
from slimnas.core.stats import mean_ci95

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


@dataclass(frozen=True)
class ForwardFlops:
    """FLOPs of one forward pass over held-out documents (compress.heldout): the body under the command's autocast,
    the vocabulary projection in fp32."""

    body: int
    head: int

    @property
    def total(self) -> int:
        return self.body + self.head

    def seconds_at_peak(self, peak: Peak, bf16: bool) -> float:
        """The time the work would take with the body at the measured peak of its precision and the head at fp32's."""
        return self.body / peak.for_precision(bf16) + self.head / peak.fp32_flops_per_s


def heldout_flops(config: PretrainedConfig, documents: int, tokens: int, scored: int) -> ForwardFlops:
    """What a forward of the model `config` over held-out rows computes: its body over every position of the
    `documents` rows of `tokens` (each attending to the whole row, as flops_per_token counts), its head over the
    `scored` last positions of each (HeldoutSet.positions when evaluating; every position when a set is built from
    the teacher)."""
    return ForwardFlops(
        body=(flops_per_token(config, tokens) - head_flops(config)) * documents * tokens,
        head=head_flops(config) * documents * scored,
    )


def screen_candidate(
    teacher: PreTrainedModel, importance: Importance, target: Architecture, selection: HeldoutSet
) -> float:
    """One candidate of the screen, as search.screen.run_screen scores it: planned, pruned from the teacher and
    evaluated on the selection documents; returns the seconds of the plan and the prune."""
    device = model_device(teacher)
    synchronize(device)
    started = time.perf_counter()
    student = prune_model(teacher, plan_pruning(importance, teacher.config, target), target)
    synchronize(device)
    pruned = time.perf_counter() - started
    selection.evaluate(student)
    return pruned


@dataclass(frozen=True)
class Work:
    """One piece of work to time: what it is, what it computes, and a call doing it once (returning the seconds
    spent pruning, or None where it prunes nothing)."""

    name: str
    what: str
    flops: ForwardFlops
    run: Callable[[], float | None]


@dataclass
class WorkRow:
    name: str
    what: str
    body_flops: int
    head_flops: int
    seconds: list[float]  # one per repeat
    seconds_mean: float
    seconds_ci95: float  # half-width of the 95% interval over repeats
    prune_seconds: float | None  # the mean of the plan and prune (the screen only)
    achieved_flops_per_s: float  # FLOPs / the mean seconds
    peak_flops_per_s: float  # the FLOPs over their seconds at the measured peaks (body's precision, head fp32)
    mfu: float


def heldout_works(
    teacher: PreTrainedModel,
    importance: Importance,
    target: Architecture,
    selection: HeldoutSet,
    evaluation: HeldoutSet,
) -> tuple[list[Work], tuple[int, int, int]]:
    """The screen of one candidate, the evaluation of that candidate, and the teacher's one-off pass over the
    selection documents that every candidate of a screen reads back; and their largest matmul (the teacher's head
    or MLP over one chunk of positions: a student is a cut of it)."""
    student = prune_model(teacher, plan_pruning(importance, teacher.config, target), target)
    documents, tokens = selection.rows.shape

    def evaluate() -> None:
        evaluation.evaluate(student)

    def teacher_targets() -> None:
        HeldoutSet(selection.split, selection.rows, teacher, selection.precision, selection.batch_size)

    works = [
        Work(
            "screen",
            "one candidate: prune + KL on the selection documents (teacher cached)",
            heldout_flops(student.config, documents, tokens, selection.positions),
            lambda: screen_candidate(teacher, importance, target, selection),
        ),
        Work(
            "evaluation",
            "HeldoutSet.evaluate of the student on the evaluation documents",
            heldout_flops(student.config, *evaluation.rows.shape, evaluation.positions),
            evaluate,
        ),
        Work(
            "teacher targets",
            "once per held-out set: the teacher's probabilities on the selection documents",
            heldout_flops(teacher.config, documents, tokens, tokens),
            teacher_targets,
        ),
    ]
    return works, largest_matmul([teacher.config], min(CHUNK_POSITIONS, documents * tokens))


def run_heldout(
    works: list[Work], shape: tuple[int, int, int], device: torch.device, precision: str, repeats: int
) -> tuple[Peak, list[WorkRow]]:
    """Each work once untimed, then `repeats` rounds of all of them in turn (A B C A B C), then the machine's peak on
    `shape`, their largest matmul, in the same run."""
    for work in works:
        work.run()
    seconds: dict[str, list[float]] = {work.name: [] for work in works}
    pruning: dict[str, list[float]] = {work.name: [] for work in works}
    for _ in range(repeats):
        for work in works:
            synchronize(device)
            started = time.perf_counter()
            pruned = work.run()
            synchronize(device)
            seconds[work.name].append(time.perf_counter() - started)
            if pruned is not None:
                pruning[work.name].append(pruned)
    peak = measure_peak(shape, device)
    bf16 = autocasts_bf16(device, precision)
    rows = []
    for work in works:
        mean, ci95 = mean_ci95(seconds[work.name])
        at_peak = work.flops.seconds_at_peak(peak, bf16)
        rows.append(
            WorkRow(
                name=work.name,
                what=work.what,
                body_flops=work.flops.body,
                head_flops=work.flops.head,
                seconds=seconds[work.name],
                seconds_mean=mean,
                seconds_ci95=ci95,
                prune_seconds=sum(pruning[work.name]) / repeats if pruning[work.name] else None,
                achieved_flops_per_s=work.flops.total / mean,
                peak_flops_per_s=work.flops.total / at_peak,
                mfu=at_peak / mean,
            )
        )
    return peak, rows
