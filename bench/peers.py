"""slimnas against what its users would otherwise run, and against the machine's peak, in one process on one machine.

    python -m slimnas.bench.peers kd [--teacher smollm2-135m] [--student DIR] [--tokens 32768] [--repeats 3] ...
    python -m slimnas.bench.peers roofline [--teacher smollm2-135m] [--params 0.6] [--repeats 5] ...

Three arms distil the same student from the same teacher on the same packed training rows, in the same order, with
the same batch, sequence length, token count, optimizer (AdamW, betas 0.9/0.95) and learning-rate schedule (linear
warm-up, cosine decay):
- `slimnas-cache`: slimnas's Distiller with the teacher's top-k logits cached (the default), charged for filling the
  cache: its tokens/s are the tokens over the fill and the training together;
- `slimnas-live`: the Distiller with the teacher run live (full-vocabulary KL);
- `trl-gkd`: TRL's `trl.experimental.gkd.GKDTrainer` (the extra `slimnas[peers]`, trl==1.16.0) with lmbda=0 (no
  student-generated text), beta=0 (its generalised JSD is then `F.kl_div(student_logp, teacher_logp,
  log_target=True)` summed over the whole vocabulary: forward KL(teacher || student), as slimnas's), seq_kd=False,
  temperature 1, gradient checkpointing off (TRL's default is on: it recomputes the forward, a third more work, which
  slimnas does not), and a collator that feeds the packed rows (its default batches chat `messages`). TRL's stable
  DistillationTrainer is on-policy only: not the same job. One difference stays: slimnas distils every position of a
  row (the last one's teacher distribution needs no label), GKD all but the last (it shifts logits against labels),
  so at equal tokens TRL's loss has 1/seq_len fewer positions; on tiny models the two end within 2% in KL.
Before anything is timed, every arm's plan (its rows in training order, tokens, rows per step, sequence length and the
learning rate of every step, each read from the built trainer) is compared, and the run is refused in one line if
they differ. The arms then run in rounds, A B C A B C ..., `--repeats` times (one untimed step of each first), each
from a fresh copy of the student (and a fresh cache). Per arm: KD tokens/s (mean and 95% interval over repeats; the
ratio to TRL per round), peak memory (the process's peak RSS above what it held before the run on CPU, the CUDA
allocator's peak on a GPU) and the held-out KL to the teacher on the evaluation documents after the same tokens (with
its standard error over documents, and the difference to TRL's paired by document).

The machine's limit (bench.roofline): each arm's achieved FLOP/s (analytic FLOPs per token x tokens/s of the steps,
the cache fill left out), the measured bf16 and fp32 peak on the step's largest matmul in the same run, the ratio
(MFU), and a profile of one step of each slimnas arm by phase. The table is printed and the whole record written as
JSON (`--out`).

`roofline`: the same for the search's screen and for evaluation (bench.roofline): the teacher's uniform cut to
`--params` screened as search.screen does it (plan, prune, KL on the selection documents against the teacher's cached
probabilities) and evaluated on the evaluation documents, and the teacher's one-off pass that fills that cache, in
`--repeats` rounds after one untimed round: seconds (mean, 95% interval), FLOPs (forward only: the body over every
position, the vocabulary projection in fp32 over the scored ones), achieved FLOP/s, the measured peak and the MFU.
"""

import argparse
import contextlib
import copy
import gc
import importlib.util
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Protocol

import torch
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from slimnas.bench.memory import status_bytes
from slimnas.bench.roofline import (
    PhaseRow,
    StepFlops,
    heldout_works,
    kd_step_flops,
    largest_matmul,
    measure_peak,
    profile_kd_step,
    run_heldout,
)
from slimnas.compress.arch import Architecture, param_count
from slimnas.compress.corpus import Corpus, load_corpus
from slimnas.compress.distill import batch_rows, build_distiller, warmup_cosine
from slimnas.compress.heldout import HeldoutSet
from slimnas.compress.importance import Importance
from slimnas.compress.kd_loss import IGNORE
from slimnas.compress.models import DEFAULT_TEACHER, LoadedModel
from slimnas.compress.settings import DistillSettings
from slimnas.core.device import autocasts_bf16, hardware, model_device, synchronize
from slimnas.core.errors import SlimnasError, one_line
from slimnas.core.files import hash_tensor, write_json
from slimnas.core.stats import mean_and_stderr, mean_ci95, paired_difference
from slimnas.core.tables import format_table, plus_minus

ARMS = ("slimnas-cache", "slimnas-live", "trl-gkd")
TRL = "trl-gkd"
TRL_EXTRA = "pip install 'slimnas[peers]' (trl==1.16.0)"


@dataclass(frozen=True)
class ArmPlan:
    """What an arm will train on, read from its built trainer: equal plans are the comparison's premise."""

    arm: str
    rows: str  # sha256 of the token rows in the order they are trained on
    tokens: int
    batch_size: int  # rows per optimizer step
    seq_len: int
    schedule: tuple[float, ...]  # the learning rate of every step


def _same(name: str, a, b) -> bool:
    if name == "schedule":  # rates computed by different code: equal up to rounding
        return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-9) for x, y in zip(a, b, strict=True))
    return a == b


def _shown(name: str, value) -> str:
    if name == "schedule":
        return f"{len(value)} steps, from {', '.join(f'{lr:.3g}' for lr in value[:3])}"
    return value[:12] if name == "rows" else str(value)


def check_equal_settings(plans: list[ArmPlan]) -> None:
    """Refuse, in one line naming what differs, to compare arms that would not run the same job."""
    first = plans[0]
    for plan in plans[1:]:
        for name in ("tokens", "batch_size", "seq_len", "schedule", "rows"):  # the rows last: they follow the rest
            a, b = getattr(first, name), getattr(plan, name)
            if not _same(name, a, b):
                raise SlimnasError(
                    f"peers kd: {first.arm} and {plan.arm} would not run the same job: their {name} differ "
                    f"({_shown(name, a)} against {_shown(name, b)}); refusing to compare them"
                )


class Arm(Protocol):
    name: str
    student: PreTrainedModel

    def plan(self) -> ArmPlan: ...

    def train(self) -> float:
        """Train to the token count; returns the seconds spent filling a teacher cache (0 without one)."""


def row_order(settings: DistillSettings, n_rows: int, steps: int) -> torch.Tensor:
    """The rows of every micro-batch, in training order, as the Distiller draws them (compress.distill.batch_rows)."""
    micro_steps = range(steps * settings.grad_accum)
    return torch.cat([batch_rows(m, settings.batch_size, n_rows, settings.seed) for m in micro_steps])


@dataclass
class Job:
    """The one job every arm runs: teacher, student, rows, settings (batch, schedule, top-k, precision) and tokens."""

    teacher: LoadedModel
    student: PreTrainedModel
    rows: torch.Tensor  # the packed training rows [n, seq_len]
    settings: DistillSettings
    tokens: int

    @property
    def seq_len(self) -> int:
        return self.rows.shape[1]

    @property
    def steps(self) -> int:
        return self.settings.steps_for(self.tokens, self.seq_len)

    def order(self) -> torch.Tensor:
        """The rows in training order, as a Distiller of this job draws them (the arms' plans check it)."""
        n_rows = min(len(self.rows), self.settings.rows_for(self.tokens, self.seq_len))
        return row_order(self.settings, n_rows, self.steps)

    @property
    def positions(self) -> int:
        """Positions of one micro-batch."""
        return self.settings.batch_size * self.seq_len

    def describe(self) -> dict:
        """The job as records keep it."""
        return {
            "teacher": self.teacher.source,
            "teacher_params": param_count(self.teacher.model.config),
            "student": Architecture.of(self.student.config).label(),
            "student_params": param_count(self.student.config),
            "tokens": self.steps * self.settings.tokens_per_step(self.seq_len),
            "steps": self.steps,
            "seq_len": self.seq_len,
            "rows": len(self.rows),
            "settings": asdict(self.settings),
        }

    def one_step(self) -> "Job":
        """The same job cut to one step (the untimed warm-up)."""
        return replace(self, tokens=self.settings.tokens_per_step(self.seq_len))


class SlimnasArm:
    """slimnas's Distiller, as build_distiller makes it for every command, with a cached or a live teacher."""

    def __init__(self, job: Job, name: str, scratch: Path):
        self.name = name
        self.student = copy.deepcopy(job.student)
        settings = replace(job.settings, teacher_mode=name.removeprefix("slimnas-"))
        self.distiller = build_distiller(self.student, job.teacher, job.rows, settings, job.tokens, scratch)

    def plan(self) -> ArmPlan:
        kd = self.distiller
        return ArmPlan(
            self.name,
            hash_tensor(kd.train_rows[row_order(kd.settings, kd.n_rows, kd.total_steps)]),
            kd.total_steps * kd.tokens_per_step,
            kd.settings.batch_size * kd.settings.grad_accum,
            kd.train_rows.shape[1],
            tuple(kd.lr_at(step) for step in range(kd.total_steps)),
        )

    def train(self) -> float:
        started = time.perf_counter()
        self.distiller.teacher_targets.prepare(self.distiller.n_rows)  # fills the cache; nothing for a live teacher
        synchronize(self.distiller.device)
        fill = time.perf_counter() - started if self.distiller.settings.teacher_mode == "cache" else 0.0
        self.distiller.train_until(self.distiller.total_steps)
        return fill


@dataclass
class PackedRowsCollator:
    """Batches of slimnas's packed rows for TRL's trainers, whose default collator batches chat `messages`: every
    position attended, every next token a loss position (the first label is IGNORE: the Trainer counts labels from
    the second on, the positions GKD's loss averages over)."""

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        input_ids = torch.tensor([feature["input_ids"] for feature in features])
        labels = input_ids.clone()
        labels[:, 0] = IGNORE
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


@contextlib.contextmanager
def forward_left_as_found(model: torch.nn.Module):
    """accelerate wraps a prepared model's forward in autocast (an attribute of the instance): the teacher that the
    other arms share is given back unwrapped."""
    before = {name: model.__dict__[name] for name in ("forward", "_original_forward") if name in model.__dict__}
    try:
        yield
    finally:
        for name in ("forward", "_original_forward"):
            model.__dict__.pop(name, None)
        model.__dict__.update(before)


class TrlArm:
    """TRL's GKDTrainer on the same job: forward KL on the packed rows in the Distiller's order, the same AdamW and
    schedule (passed in, so TRL's own scheduler, which warms up from 0, does not make the schedules differ)."""

    name = TRL

    def __init__(self, job: Job, tokenizer: PreTrainedTokenizerBase, scratch: Path):
        from datasets import Dataset
        from transformers import PrinterCallback

        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # the module docstring says it is experimental
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        settings, device = job.settings, model_device(job.student)
        self.teacher = job.teacher.model
        self.student = copy.deepcopy(job.student)
        steps = job.steps
        optimizer = torch.optim.AdamW(
            self.student.parameters(), lr=settings.lr, weight_decay=settings.weight_decay, betas=(0.9, 0.95)
        )
        warmup = max(1, int(settings.warmup_fraction * steps))
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, warmup, steps, settings.min_lr_ratio)
        )
        config = GKDConfig(
            output_dir=str(scratch),
            lmbda=0.0,
            beta=0.0,
            seq_kd=False,
            temperature=1.0,
            max_steps=steps,
            per_device_train_batch_size=settings.batch_size,
            gradient_accumulation_steps=settings.grad_accum,
            max_grad_norm=settings.max_grad_norm,
            learning_rate=settings.lr,
            bf16=autocasts_bf16(device, settings.precision),
            activation_checkpointing=False,  # TRL's default is True (gradient_checkpointing)
            train_sampling_strategy="sequential",
            max_length=None,
            logging_strategy="no",
            save_strategy="no",
            eval_strategy="no",
            report_to="none",
            disable_tqdm=True,
            dataloader_num_workers=0,
            dataloader_pin_memory=False,
            use_cpu=device.type == "cpu",
            seed=settings.seed,
        )
        dataset = Dataset.from_dict({"input_ids": job.rows[job.order()].tolist()})
        with forward_left_as_found(self.teacher):
            self.trainer = GKDTrainer(
                model=self.student,
                teacher_model=self.teacher,
                args=config,
                data_collator=PackedRowsCollator(),
                train_dataset=dataset,
                processing_class=tokenizer,
                optimizers=(optimizer, schedule),
            )
        self.trainer.remove_callback(PrinterCallback)  # its end-of-training line; the benchmark prints its own

    def plan(self) -> ArmPlan:
        args, dataset, scheduler = self.trainer.args, self.trainer.train_dataset, self.trainer.lr_scheduler
        rows_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        seq_len = len(dataset[0]["input_ids"])
        trained = torch.tensor(dataset[: args.max_steps * rows_per_step]["input_ids"])
        order = hash_tensor(trained) if args.train_sampling_strategy == "sequential" else "shuffled by the Trainer"
        return ArmPlan(
            self.name,
            order,
            args.max_steps * rows_per_step * seq_len,
            rows_per_step,
            seq_len,
            tuple(
                base * scheduler.lr_lambdas[0](step) for step in range(args.max_steps) for base in scheduler.base_lrs
            ),
        )

    def train(self) -> float:
        with forward_left_as_found(self.teacher):
            self.trainer.train()
        synchronize(model_device(self.student))
        return 0.0


def build_arm(name: str, job: Job, scratch: Path) -> Arm:
    if name == TRL:
        return TrlArm(job, job.teacher.tokenizer, scratch)
    return SlimnasArm(job, name, scratch)


@contextlib.contextmanager
def peak_memory(device: torch.device):
    """The block's peak memory above what was held when it began, in the yielded dict's "peak_bytes" once it ends: the
    CUDA allocator's, or the process's RSS (Linux: /proc/self/clear_refs resets the high-water mark to the RSS)."""
    measured: dict[str, int] = {}
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield measured
        measured["peak_bytes"] = torch.cuda.max_memory_allocated(device) - before
        return
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    before = status_bytes("VmRSS")
    yield measured
    measured["peak_bytes"] = status_bytes("VmHWM") - before


@dataclass
class ArmRun:
    arm: str
    repeat: int
    tokens: int
    seconds: float  # the whole run: cache fill and training
    fill_seconds: float  # filling the teacher's top-k cache (0 for a live teacher)
    peak_bytes: int
    kl: float  # held-out KL to the teacher on the evaluation documents after the run
    kl_stderr: float  # over documents
    kl_per_doc: list[float]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def step_tokens_per_s(self) -> float:
        """The training steps alone, the cache fill left out: what the step's FLOP/s are computed from."""
        return self.tokens / (self.seconds - self.fill_seconds)


def timed_run(arm: Arm, tokens: int, evaluation: HeldoutSet, repeat: int) -> ArmRun:
    """One arm's run, timed and its peak memory taken, then its student scored on the evaluation documents."""
    device = model_device(arm.student)
    with peak_memory(device) as measured:
        synchronize(device)
        started = time.perf_counter()
        fill = arm.train()
        seconds = time.perf_counter() - started
    metrics = evaluation.evaluate(arm.student)
    return ArmRun(
        arm.name, repeat, tokens, seconds, fill, measured["peak_bytes"], metrics.kl, metrics.kl_stderr,
        metrics.kl_per_doc,
    )  # fmt: skip


@dataclass
class ArmSummary:
    arm: str
    repeats: int
    tokens_per_s: float  # mean over repeats (the cached arm: fill included)
    tokens_per_s_ci95: float
    step_tokens_per_s: float  # the steps alone
    vs_trl: float | None  # tokens/s over TRL's in the same round, mean over rounds
    vs_trl_ci95: float | None
    peak_mib: float  # the largest over repeats
    kl: float  # held-out KL, the mean over repeats
    kl_stderr: float  # over documents (each document's KL averaged over repeats)
    kl_minus_trl: float | None  # paired by document
    kl_minus_trl_stderr: float | None
    flops_per_token: int  # what a step computes per token (bench.roofline)
    achieved_flops_per_s: float
    mfu: float  # of the measured peak at the step's precision


def _per_doc(runs: list[ArmRun]) -> list[float]:
    return [sum(values) / len(values) for values in zip(*(r.kl_per_doc for r in runs), strict=True)]


def summarise(runs: list[ArmRun], flops: dict[str, StepFlops], peak: float) -> list[ArmSummary]:
    """Per arm, over its repeats; against TRL paired by round (tokens/s) and by document (KL)."""
    by_arm: dict[str, list[ArmRun]] = {}
    for run in runs:
        by_arm.setdefault(run.arm, []).append(run)
    trl = by_arm.get(TRL)
    summaries = []
    for arm, own in by_arm.items():
        tokens_per_s, tokens_per_s_ci = mean_ci95([r.tokens_per_s for r in own])
        step_tokens_per_s = statistics.fmean(r.step_tokens_per_s for r in own)
        ratio = ratio_ci = kl_diff = kl_diff_stderr = None
        if trl is not None and arm != TRL:
            ratio, ratio_ci = mean_ci95([a.tokens_per_s / b.tokens_per_s for a, b in zip(own, trl, strict=True)])
            kl_diff, kl_diff_stderr = paired_difference(_per_doc(own), _per_doc(trl))
        achieved = flops[arm].total * step_tokens_per_s
        summaries.append(
            ArmSummary(
                arm=arm,
                repeats=len(own),
                tokens_per_s=tokens_per_s,
                tokens_per_s_ci95=tokens_per_s_ci,
                step_tokens_per_s=step_tokens_per_s,
                vs_trl=ratio,
                vs_trl_ci95=ratio_ci,
                peak_mib=max(r.peak_bytes for r in own) / 2**20,
                kl=statistics.fmean(r.kl for r in own),
                kl_stderr=mean_and_stderr(_per_doc(own))[1],
                kl_minus_trl=kl_diff,
                kl_minus_trl_stderr=kl_diff_stderr,
                flops_per_token=flops[arm].total,
                achieved_flops_per_s=achieved,
                mfu=achieved / peak,
            )
        )
    return summaries


def arm_flops(name: str, job: Job) -> StepFlops:
    """What the arm's step computes per token: the teacher's forward only where it runs live, the head twice where
    slimnas checkpoints its loss in chunks (bench.roofline)."""
    teacher = job.teacher.model.config if name != "slimnas-cache" else None
    recomputed = name != TRL and job.settings.batch_size * job.seq_len > job.settings.chunk_tokens
    return kd_step_flops(job.student.config, teacher, job.seq_len, recomputed)


@dataclass
class KDReport:
    job: dict
    hardware: dict
    peak: dict
    runs: list[dict]
    summary: list[dict]
    profile: dict[str, list[dict]] = field(default_factory=dict)  # filled after the rest, when asked for


def profile_arm(name: str, job: Job, peak: float) -> list[PhaseRow]:
    """One profiled step of a slimnas arm, after one unprofiled (its cache filled first)."""
    with tempfile.TemporaryDirectory() as scratch:
        arm = SlimnasArm(replace(job, tokens=2 * job.settings.tokens_per_step(job.seq_len)), name, Path(scratch))
        arm.distiller.teacher_targets.prepare(arm.distiller.n_rows)
        arm.distiller.train_until(1)
        return profile_kd_step(arm.distiller, arm_flops(name, job), peak)


def run_kd(job: Job, evaluation: HeldoutSet, arms: list[str], repeats: int, profile: bool = True) -> KDReport:
    """The comparison: the arms' plans checked, one untimed step of each, `repeats` rounds A B C A B C ..., the
    machine's peak, and a profiled step of each slimnas arm."""
    device = model_device(job.student)
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        plans = [build_arm(name, job, scratch / f"plan-{name}").plan() for name in arms]
        check_equal_settings(plans)  # before anything is timed
        for name in arms:  # the libraries' one-off set-up, out of the timed runs
            build_arm(name, job.one_step(), scratch / f"warm-{name}").train()
        runs: list[ArmRun] = []
        for repeat in range(repeats):
            for name in arms:
                arm = build_arm(name, job, scratch / f"{name}-{repeat}")  # a fresh student copy, a fresh cache
                check_equal_settings([plans[0], arm.plan()])
                runs.append(timed_run(arm, plans[0].tokens, evaluation, repeat))
                print(f"  round {repeat + 1}/{repeats} {name}: {runs[-1].tokens_per_s:.0f} tokens/s", flush=True)
                del arm
                gc.collect()  # the next arm's peak memory counts from what is really held
    bf16 = autocasts_bf16(device, job.settings.precision)
    peak = measure_peak(largest_matmul([job.student.config, job.teacher.model.config], job.positions), device)
    step_peak = peak.for_precision(bf16)
    flops = {name: arm_flops(name, job) for name in arms}
    report = KDReport(
        job=job.describe(),
        hardware=hardware(device),
        peak=asdict(peak) | {"step_precision": "bf16" if bf16 else "fp32", "step_peak_flops_per_s": step_peak},
        runs=[asdict(run) | {"tokens_per_s": run.tokens_per_s} for run in runs],
        summary=[asdict(summary) for summary in summarise(runs, flops, step_peak)],
    )
    if profile:
        for name in arms:
            if name != TRL:
                report.profile[name] = [asdict(row) for row in profile_arm(name, job, step_peak)]
    return report


def uniform_cut(config: PretrainedConfig, fraction: float) -> Architecture:
    """One ratio r on every dimension of the teacher, KV groups included, snapped to what it allows (widths to
    multiples of 32 or of the teacher's common divisor, query heads to whole KV groups, at most the teacher's heads per
    group): the r whose cut has the parameter count nearest `fraction` of the teacher's."""
    source = Architecture.of(config)
    group = source.num_attention_heads // source.num_key_value_heads
    step = math.gcd(source.hidden_size, source.intermediate_size, 32)

    def cut(r: float) -> Architecture:
        kv = max(1, round(r * source.num_key_value_heads))
        return Architecture(
            hidden_size=max(step, round(r * source.hidden_size / step) * step),
            intermediate_size=max(step, round(r * source.intermediate_size / step) * step),
            num_attention_heads=kv * min(group, max(1, round(r * source.num_attention_heads / kv))),
            num_key_value_heads=kv,
            num_hidden_layers=max(1, round(r * source.num_hidden_layers)),
        )

    goal = fraction * param_count(config)
    return min({cut(r / 100) for r in range(1, 101)}, key=lambda a: (abs(param_count(config, a) - goal), a.label()))


def format_report(report: KDReport) -> str:
    """The three tables: the arms side by side, against the machine's peak, and the profiled steps by phase."""
    job, peak = report.job, report.peak
    lines = [
        f"KD of {job['student']} ({job['student_params'] / 1e6:.1f}M params) from {job['teacher']} "
        f"({job['teacher_params'] / 1e6:.1f}M): {job['tokens']:,} tokens = {job['steps']} step(s) of "
        f"{job['settings']['batch_size']} x {job['seq_len']}, lr {job['settings']['lr']:g}, on "
        f"{report.hardware['name']} ({report.hardware['threads']} threads, {peak['step_precision']})",
        "",
    ]
    rows = [
        {
            "arm": s["arm"],
            "tokens/s (95% CI)": plus_minus(s["tokens_per_s"], s["tokens_per_s_ci95"]),
            "x TRL": plus_minus(s["vs_trl"], s["vs_trl_ci95"]) if s["vs_trl"] is not None else "",
            "peak MiB": s["peak_mib"],
            "held-out KL (± docs)": plus_minus(s["kl"], s["kl_stderr"]),
            "KL - TRL (paired)": plus_minus(s["kl_minus_trl"], s["kl_minus_trl_stderr"])
            if s["kl_minus_trl"] is not None
            else "",
        }
        for s in report.summary
    ]
    lines += [format_table(rows, list(rows[0])), ""]
    shape = " x ".join(map(str, peak["shape"]))
    lines.append(
        f"measured peak on [{peak['shape'][0]}, {peak['shape'][1]}] x [{peak['shape'][1]}, {peak['shape'][2]}] "
        f"({shape}): bf16 {peak['bf16_flops_per_s'] / 1e9:.1f} GFLOP/s, fp32 {peak['fp32_flops_per_s'] / 1e9:.1f} "
        f"GFLOP/s; the step runs in {peak['step_precision']}"
    )
    rows = [
        {
            "arm": s["arm"],
            "MFLOP/token": s["flops_per_token"] / 1e6,
            "step tokens/s": s["step_tokens_per_s"],
            "GFLOP/s": s["achieved_flops_per_s"] / 1e9,
            "MFU": f"{s['mfu']:.1%}",
        }
        for s in report.summary
    ]
    lines += [format_table(rows, list(rows[0]))]
    for arm, phases in report.profile.items():
        rows = [
            {
                "phase": p["what"],
                "ms": p["seconds"] * 1e3,
                "share": f"{p['share']:.0%}",
                "GFLOP/s": p["flops_per_s"] / 1e9 if p["flops_per_s"] else None,
                "of peak": f"{p['of_peak']:.0%}" if p["of_peak"] is not None else "",
                "> 20% and < 30% of peak": "yes" if p["flagged"] else "",
            }
            for p in phases
        ]
        lines += ["", f"one step of {arm}, by phase (torch.profiler)", format_table(rows, list(rows[0]))]
    return "\n".join(lines)


def load_teacher(args: argparse.Namespace) -> tuple[LoadedModel, Corpus]:
    """The teacher and the corpus, as the commands split it (train rows, selection and evaluation documents)."""
    from slimnas.compress.models import load_model
    from slimnas.compress.settings import DataSettings
    from slimnas.core.device import pick_device

    data = DataSettings(corpus=args.corpus, seq_len=args.seq_len, heldout_tokens=args.heldout_tokens)
    teacher = load_model(args.teacher, pick_device(args.device))
    corpus = load_corpus(teacher.tokenizer, data)
    print(corpus.line(), flush=True)
    return teacher, corpus


def teacher_cut(teacher: LoadedModel, corpus: Corpus, args: argparse.Namespace) -> tuple[Importance, Architecture]:
    """The teacher's importance (64 calibration rows, the cpu preset's; cached) and its uniform cut to `--params`."""
    from slimnas.compress.importance import cached_importance
    from slimnas.compress.models import cache_root
    from slimnas.compress.settings import ImportanceSettings

    calibration = ImportanceSettings(n_samples=64, precision=args.precision)
    importance, _ = cached_importance(
        teacher.model, teacher.fingerprint, corpus.train, corpus.fingerprint, calibration, cache_root()
    )
    return importance, uniform_cut(teacher.model.config, args.params)


def load_job(args: argparse.Namespace) -> tuple[Job, HeldoutSet]:
    """Teacher, corpus, student (loaded, or cut from the teacher) and the evaluation documents' teacher targets."""
    from slimnas.compress.models import load_model
    from slimnas.compress.prune import plan_pruning, prune_model

    settings = DistillSettings(
        budget_tokens=args.tokens, batch_size=args.batch, lr=args.lr, top_k=args.top_k, precision=args.precision,
        seed=args.seed,
    )  # fmt: skip
    teacher, corpus = load_teacher(args)
    if args.student:
        student = load_model(args.student, model_device(teacher.model)).model
        if student.config.vocab_size != teacher.model.config.vocab_size:
            raise SlimnasError(f"--student {args.student} has another vocabulary than the teacher: KD needs the same")
    else:
        importance, target = teacher_cut(teacher, corpus, args)
        student = prune_model(teacher.model, plan_pruning(importance, teacher.model.config, target), target)
    evaluation = HeldoutSet("evaluation", corpus.evaluation, teacher.model, args.precision)
    return Job(teacher, student, corpus.train, settings, args.tokens), evaluation


@dataclass
class RooflineReport:
    """The screen and evaluation against the machine's peak: what ran, on what, the peak, one row per work."""

    job: dict
    hardware: dict
    peak: dict
    rows: list[dict]


def run_roofline(args: argparse.Namespace) -> RooflineReport:
    """The teacher's uniform cut to `--params` screened and evaluated as the search does it, timed against the peak."""
    teacher, corpus = load_teacher(args)
    importance, target = teacher_cut(teacher, corpus, args)
    selection = HeldoutSet("selection", corpus.selection, teacher.model, args.precision)
    evaluation = HeldoutSet("evaluation", corpus.evaluation, teacher.model, args.precision)
    works, shape = heldout_works(teacher.model, importance, target, selection, evaluation)
    device = model_device(teacher.model)
    peak, rows = run_heldout(works, shape, device, args.precision, args.repeats)
    bf16 = autocasts_bf16(device, args.precision)
    job = {
        "teacher": teacher.source,
        "teacher_params": param_count(teacher.model.config),
        "student": target.label(),
        "student_params": param_count(teacher.model.config, target),
        "selection": list(selection.rows.shape),  # documents x tokens, every position scored
        "evaluation": list(evaluation.rows.shape),
        "precision": "bf16 body, fp32 head" if bf16 else "fp32",
        "repeats": args.repeats,
    }
    return RooflineReport(job, hardware(device), asdict(peak), [asdict(row) for row in rows])


def format_roofline(report: RooflineReport) -> str:
    job, peak = report.job, report.peak
    m, k, n = peak["shape"]
    lines = [
        f"the screen and evaluation of {job['student']} ({job['student_params'] / 1e6:.1f}M params) cut from "
        f"{job['teacher']} ({job['teacher_params'] / 1e6:.1f}M): selection {job['selection'][0]} x "
        f"{job['selection'][1]}, evaluation {job['evaluation'][0]} x {job['evaluation'][1]} documents x tokens, "
        f"{job['precision']}, on {report.hardware['name']} ({report.hardware['threads']} threads)",
        f"measured peak on [{m}, {k}] x [{k}, {n}]: bf16 {peak['bf16_flops_per_s'] / 1e9:.1f} GFLOP/s, fp32 "
        f"{peak['fp32_flops_per_s'] / 1e9:.1f} GFLOP/s",
        "",
    ]
    rows = [
        {
            "work": row["name"],
            "GFLOP (body + head)": f"{row['body_flops'] / 1e9:.2f} + {row['head_flops'] / 1e9:.2f}",
            f"seconds (95% CI, {job['repeats']} repeats)": plus_minus(row["seconds_mean"], row["seconds_ci95"]),
            "of which prune": row["prune_seconds"],
            "GFLOP/s": row["achieved_flops_per_s"] / 1e9,
            "peak GFLOP/s": row["peak_flops_per_s"] / 1e9,
            "MFU": f"{row['mfu']:.1%}",
        }
        for row in report.rows
    ]
    lines.append(format_table(rows, list(rows[0])))
    lines += [f"  {row['name']}: {row['what']}" for row in report.rows]
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m slimnas.bench.peers", description=__doc__.splitlines()[0])
    modes = parser.add_subparsers(dest="mode", required=True)
    common = argparse.ArgumentParser(add_help=False)  # the teacher, its cut and the corpus: both modes
    common.add_argument("--teacher", default=DEFAULT_TEACHER)
    common.add_argument("--params", type=float, default=0.6, help="the default student's share of the teacher's params")
    common.add_argument("--seq-len", type=int, default=128)
    common.add_argument("--heldout-tokens", type=int, default=64, help="tokens of each held-out row (the cpu preset's)")
    common.add_argument("--corpus", default="auto")
    common.add_argument("--precision", default="auto")
    common.add_argument("--device", default="auto")
    kd = modes.add_parser(
        "kd", parents=[common], help="distillation: slimnas (cached and live teacher) against TRL's GKDTrainer"
    )
    kd.add_argument("--student", help="a checkpoint of the student; default: a uniform cut of the teacher")
    kd.add_argument("--tokens", type=int, default=32768, help="KD tokens of every run")
    kd.add_argument("--batch", type=int, default=4, help="rows per step (the cpu preset's)")
    kd.add_argument("--lr", type=float, default=3e-4)
    kd.add_argument("--top-k", type=int, default=64, help="the cached arm's teacher logits per position")
    kd.add_argument("--repeats", type=int, default=3, help="rounds of A B C; an interval needs at least 2")
    kd.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    kd.add_argument("--seed", type=int, default=0, help="the order of the rows")
    kd.add_argument("--no-profile", action="store_true", help="leave out the profiled step")
    kd.add_argument("--out", type=Path, default=Path("runs/peers/kd.json"))
    roofline = modes.add_parser(
        "roofline", parents=[common], help="the screen (prune + KL) and evaluation against the machine's peak (MFU)"
    )
    roofline.add_argument("--repeats", type=int, default=5, help="rounds of screen, evaluation, teacher targets")
    roofline.add_argument("--out", type=Path, default=Path("runs/peers/roofline.json"))
    return parser.parse_args(argv)


def check_cut(args: argparse.Namespace) -> None:
    if not 0 < args.params <= 1:
        raise SlimnasError(f"--params must be in (0, 1], not {args.params}")


def checked_arms(args: argparse.Namespace) -> list[str]:
    """The arms asked for, and every other flag checked before anything loads."""
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        raise SlimnasError(f"--arms: unknown arm {', '.join(unknown) or '(none)'}; choose from {', '.join(ARMS)}")
    if TRL in arms and importlib.util.find_spec("trl") is None:
        raise SlimnasError(f"the {TRL} arm needs TRL: {TRL_EXTRA}, or leave it out with --arms")
    if args.repeats < 1 or args.tokens < 1:
        raise SlimnasError("--repeats and --tokens must be at least 1")
    check_cut(args)
    if args.student and not Path(args.student).is_dir():
        raise SlimnasError(f"--student {args.student}: no such checkpoint directory")
    return arms


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # as the slimnas command: no per-tensor bars, no advisory warnings
    transformers_logging.set_verbosity_error()
    started = time.perf_counter()
    report: KDReport | RooflineReport
    try:
        if args.mode == "kd":
            arms = checked_arms(args)
            job, evaluation = load_job(args)
            started = time.perf_counter()
            report = run_kd(job, evaluation, arms, args.repeats, profile=not args.no_profile)
        else:
            check_cut(args)
            if args.repeats < 2:
                raise SlimnasError(f"--repeats must be at least 2 (an interval needs two), not {args.repeats}")
            report = run_roofline(args)
    except SlimnasError as error:
        print(f"slimnas: error: {one_line(error)}", file=sys.stderr)
        return 2
    print(format_report(report) if isinstance(report, KDReport) else format_roofline(report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, asdict(report) | {"command": " ".join(sys.argv), "seconds": time.perf_counter() - started})
    print(f"\nwritten {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
