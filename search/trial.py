"""One trial: prune from the cached importance -> screen -> KD rungs -> score -> speed -> record.

Multi-fidelity: after the zero-KD screen and after each KD rung but the last, `promote(rung, value)`
decides whether the candidate earns more KD (successive halving); a candidate that does not is
stopped with every metric it earned kept on its record.
"""

import dataclasses
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.quality import score_model, summary_score
from bench.speed import SpeedSettings, measure_speed
from compress import interrupt
from compress.arch import Architecture, param_count, weight_bytes
from compress.commands import TeacherContext
from compress.distill import CachedTeacher, Distiller, DistillSettings
from compress.prune import plan_pruning, prune_model, save_checkpoint


class StoppedEarly(Exception):
    """The candidate was not promoted to the next rung; `record` holds what it earned."""

    def __init__(self, rung: int, record: dict):
        super().__init__(f"stopped after rung {rung}")
        self.rung, self.record = rung, record


@dataclass
class TrialSettings:
    rung_tokens: list[int]  # cumulative KD tokens at the end of each rung
    distill: DistillSettings
    quality_metric: str  # heldout_kl or summary
    score_tasks: list[str]
    score_limit: int | None
    data_dir: Path
    speed: SpeedSettings | None
    layer_metric: str
    depth_strategy: str
    keep_checkpoint: bool


def hardware() -> dict:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    return {"device": device, "torch": torch.__version__, "threads": torch.get_num_threads()}


def run_trial(
    context: TeacherContext,
    teacher_source: CachedTeacher,
    arch: Architecture,
    settings: TrialSettings,
    trial_dir: Path,
    promote: Callable[[int, float], bool],
    depth_strategy: str | None = None,
) -> dict:
    """Evaluate one candidate; returns its record (metrics under 'final')."""
    started = time.perf_counter()
    teacher = context.teacher.model
    record = {
        "architecture": arch.as_dict(),
        "label": arch.label(),
        "params": param_count(teacher.config, arch),
        "weight_bytes_bf16": weight_bytes(teacher.config, arch=arch),
        "stages": {},
        "kd_tokens": 0,
        "hardware": hardware(),
    }
    plan = plan_pruning(
        context.importance, teacher.config, arch, settings.layer_metric, depth_strategy or settings.depth_strategy
    )
    student = prune_model(teacher, plan, arch)
    record["stages"]["prune"] = {"seconds": time.perf_counter() - started, "layers": plan.layers}

    # One KD run to the last rung's budget: rungs are points on a single schedule and data stream, so a
    # promoted candidate continues where it stopped instead of restarting its optimizer.
    kd_settings = dataclasses.replace(settings.distill, budget_tokens=max(settings.rung_tokens, default=1))
    kd = Distiller(student, teacher_source, context.data.train, context.data.heldout, kd_settings, trial_dir / "kd")
    stage_ends = {0: 0} | {max(1, tokens // kd.tokens_per_step): i for i, tokens in enumerate(settings.rung_tokens, 1)}
    latest, stage_started, stage_first_step = {}, time.perf_counter(), 0

    def end_of_stage(step: int, metrics: dict | None) -> None:
        """Record the screen (step 0) or a rung; stop the candidate here unless it is promoted."""
        nonlocal latest, stage_started, stage_first_step
        if step not in stage_ends:
            return
        rung, seconds = stage_ends[step], time.perf_counter() - stage_started
        tokens = (step - stage_first_step) * kd.tokens_per_step
        latest = metrics
        record["kd_tokens"] = step * kd.tokens_per_step
        stage = {**metrics, "seconds": seconds}
        if rung > 0:
            stage.update(tokens=tokens, tokens_per_second=tokens / max(seconds, 1e-9))
        record["stages"]["screen" if rung == 0 else f"kd_{rung}"] = stage
        stage_started, stage_first_step = time.perf_counter(), step
        if rung < len(settings.rung_tokens) and not promote(rung, -metrics["heldout_kl"]):
            raise StoppedEarly(rung, record)

    if settings.rung_tokens:
        # A trial never resumes mid-KD (a killed one is retried afresh): no model + optimizer checkpoints
        # (about 1 GB each for a SmolLM2 student).
        kd.run(on_step=end_of_stage, progress_bar=False, eval_steps=stage_ends, resumable=False)
    else:
        end_of_stage(0, kd.evaluate())

    final = {"heldout_kl": latest["heldout_kl"], "heldout_perplexity": latest["heldout_perplexity"]}
    final["params"] = record["params"]
    interrupt.check()
    if settings.score_tasks:
        stage_started = time.perf_counter()
        scores = score_model(
            student,
            context.teacher.tokenizer,
            settings.score_tasks,
            trial_dir,
            settings.data_dir,
            settings.score_limit,
            precision=settings.distill.precision,
            model_name=arch.label(),
        )
        final["summary"] = summary_score(scores)
        record["stages"]["score"] = {
            "scores": [dataclasses.asdict(s) for s in scores],
            "seconds": time.perf_counter() - stage_started,
        }
    final["quality"] = final["summary"] if settings.quality_metric == "summary" else -final["heldout_kl"]
    if settings.speed is not None:
        stage_started = time.perf_counter()
        speed = measure_speed(student, settings.speed, arch.label())
        final.update(
            decode_tokens_per_s=speed.decode_tokens_per_s,
            prefill_tokens_per_s=speed.prefill_tokens_per_s,
            latency_p50_ms=speed.latency_p50_ms,
            peak_memory_bytes=speed.peak_memory_bytes,
        )
        record["stages"]["speed"] = {**dataclasses.asdict(speed), "seconds": time.perf_counter() - stage_started}
    if settings.keep_checkpoint:
        save_checkpoint(student, context.teacher.tokenizer, trial_dir / "model", {"trial": record})
    record["final"] = final
    record["seconds"] = time.perf_counter() - started
    return record
