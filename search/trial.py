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

    def distiller(budget: int, stage: str) -> Distiller:
        run_settings = dataclasses.replace(settings.distill, budget_tokens=max(1, budget))
        return Distiller(
            student, teacher_source, context.data.train, context.data.heldout, run_settings, trial_dir / stage
        )

    stage_started = time.perf_counter()
    screen = distiller(settings.rung_tokens[0] if settings.rung_tokens else 1, "screen").evaluate()
    record["stages"]["screen"] = {**screen, "seconds": time.perf_counter() - stage_started}
    if settings.rung_tokens and not promote(0, -screen["heldout_kl"]):
        raise StoppedEarly(0, record)

    done, latest = 0, screen
    for rung, tokens in enumerate(settings.rung_tokens, start=1):
        stage_started = time.perf_counter()
        result = distiller(tokens - done, f"kd_{rung}").run(progress_bar=False)
        done = tokens
        latest = result.final
        record["kd_tokens"] += result.tokens
        record["stages"][f"kd_{rung}"] = {
            **result.final,
            "tokens": result.tokens,
            "tokens_per_second": result.tokens_per_second,
            "seconds": time.perf_counter() - stage_started,
        }
        if rung < len(settings.rung_tokens) and not promote(rung, -latest["heldout_kl"]):
            raise StoppedEarly(rung, record)

    final = {"heldout_kl": latest["heldout_kl"], "heldout_perplexity": latest["heldout_perplexity"]}
    final["params"] = record["params"]
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
