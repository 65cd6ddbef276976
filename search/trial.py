"""One trial, top to bottom: prune -> screen -> KD rungs -> score -> speed -> record.

Multi-fidelity: after the zero-KD screen and after each KD rung but the last, `promote(rung, quality)`
says whether the candidate earns more KD (successive halving across all workers of the study); a
candidate that does not is returned as stopped, with every metric it earned on its record. The KD
rungs are points on one run to the last rung's budget (one warmup + cosine schedule, one optimizer,
fresh corpus rows), so a promoted candidate continues where it stood. A trial writes no KD
checkpoint: a killed trial is retried from the start.
"""

import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

from bench.quality import score_model, summary_score
from bench.speed import compare_speed
from compress.arch import Architecture, param_count, weight_bytes
from compress.distill import Distiller, HiddenStateMatch, make_teacher_targets
from compress.heldout import HeldoutMetrics
from compress.models import cache_root
from compress.prune import plan_pruning, prune_model, save_checkpoint
from compress.runtime import interrupt
from search.records import COMPLETE, STOPPED, TrialRecord
from search.setup import SearchSetup
from search.space import Reference

Promote = Callable[[int, float], bool]  # (rung, quality there) -> earns the next rung?


def quality_of(setup: SearchSetup, heldout: HeldoutMetrics, summary: tuple[float, float] | None) -> dict:
    """The ranked number with its error bar: -held-out KL, or the lm-eval summary score."""
    if setup.settings.quality_metric == "summary" and summary is not None:
        return {"quality": summary[0], "quality_stderr": summary[1]}
    return {"quality": -heldout.kl, "quality_stderr": heldout.kl_stderr}


def run_trial(
    setup: SearchSetup,
    number: int,
    arch: Architecture,
    promote: Promote,
    reference: Reference | None = None,
    retry_of: int | None = None,
    worker: str = "",
) -> TrialRecord:
    started = time.perf_counter()
    teacher = setup.context.teacher
    teacher_params = param_count(teacher.model.config)
    policy = (
        replace(setup.policy, depth_strategy=reference.depth_strategy)
        if reference and reference.depth_strategy
        else setup.policy
    )
    record = TrialRecord(
        trial=number,
        architecture=arch.as_dict(),
        label=arch.label(),
        params=param_count(teacher.model.config, arch),
        params_fraction=param_count(teacher.model.config, arch) / teacher_params,
        weight_bytes_bf16=weight_bytes(teacher.model.config, arch=arch),
        pruning=asdict(policy),
        reference=reference.kind if reference else None,
        reference_note=reference.note if reference else None,
        retry_of=retry_of,
        worker=worker,
        command=setup.command,
        hardware=setup.hardware,
    )

    def finish(state: str, heldout: HeldoutMetrics, summary: tuple[float, float] | None = None) -> TrialRecord:
        record.state = state
        record.final = {
            **quality_of(setup, heldout, summary),
            "params": record.params,
            "heldout_kl": heldout.kl,
            "heldout_kl_stderr": heldout.kl_stderr,
            "perplexity": heldout.perplexity,
            "perplexity_stderr": heldout.perplexity_stderr,
            "kl_per_row": heldout.kl_per_row,
            **record.final,
        }
        record.seconds = time.perf_counter() - started
        return record

    # 1. Prune from the cached importance
    stage_started = time.perf_counter()
    plan = plan_pruning(setup.context.importance, teacher.model.config, arch, policy)
    student = prune_model(teacher.model, plan, arch)
    record.plan = plan.as_dict()
    record.add_stage("prune", time.perf_counter() - stage_started, 0)

    # 2. Screen: held-out KL before any KD
    stage_started = time.perf_counter()
    heldout = setup.selection.evaluate(student)
    record.add_stage("screen", time.perf_counter() - stage_started, 0, heldout.summary())
    if not promote(0, -heldout.kl):
        return finish(STOPPED, heldout)

    # 3. KD rungs: one schedule to the last rung, ranked at the end of each
    match = None
    if setup.distill.hidden_weight > 0:
        hidden = teacher.model.config.hidden_size
        match = HiddenStateMatch.build(setup.distill.hidden_layers, plan.layers, plan.channels, hidden)
        targets = make_teacher_targets(setup.distill, teacher, setup.context.corpus.train, cache_root(), match)
    else:
        targets = setup.teacher_targets
    kd = Distiller(student, targets, setup.context.corpus.train, setup.distill, match)
    for rung, steps in enumerate(setup.rung_steps, start=1):
        stage_started = time.perf_counter()
        kd.train_until(steps)
        heldout = setup.selection.evaluate(student)
        record.add_stage(
            f"kd_{rung}", time.perf_counter() - stage_started, kd.step * kd.tokens_per_step, heldout.summary()
        )
        if rung < len(setup.rung_steps) and not promote(rung, -heldout.kl):
            if setup.speed is not None and setup.timings_rank:  # the sampler needs every objective's value
                measure_speed_into(setup, student, arch, record)
            return finish(STOPPED, heldout)
    interrupt.check()

    # 4. lm-eval scores on fixed seeded subsets
    summary = None
    if setup.suite is not None:
        stage_started = time.perf_counter()
        scores = score_model(
            student, teacher.tokenizer, setup.suite, setup.quality.trial_limit, setup.quality.batch_size,
            model_name=arch.label(), precision=setup.distill.precision, max_length=setup.quality.max_length,
            log_to=setup.log_file,
        )  # fmt: skip
        summary = summary_score(scores)
        record.final.update(summary=summary[0], summary_stderr=summary[1])
        record.stages.append(
            {"stage": "score", "seconds": time.perf_counter() - stage_started, "scores": [asdict(s) for s in scores]}
        )

    # 5. Speed, timed in alternation with the teacher
    if setup.speed is not None:
        measure_speed_into(setup, student, arch, record)

    # 6. The checkpoint, when asked for (front trials keep theirs)
    if setup.settings.keep_checkpoints:
        save_checkpoint(student, teacher.tokenizer, trial_dir_of(setup, number) / "model", {"trial": number})
    return finish(COMPLETE, heldout, summary)


def measure_speed_into(setup: SearchSetup, student, arch: Architecture, record: TrialRecord) -> None:
    stage_started = time.perf_counter()
    comparison = compare_speed(student, setup.context.teacher.model, setup.speed, arch.label(), "teacher")
    record.final.update(
        decode_speedup=comparison.decode_speedup,
        decode_speedup_stderr=comparison.decode_speedup_stderr,
        decode_tokens_per_s=comparison.model.decode_tokens_per_s,
        prefill_tokens_per_s=comparison.model.prefill_tokens_per_s,
        latency_p50_ms=comparison.model.latency_p50_ms,
    )
    record.stages.append(
        {"stage": "speed", "seconds": time.perf_counter() - stage_started, **comparison.as_row(),
         "model": asdict(comparison.model), "reference": asdict(comparison.reference)}
    )  # fmt: skip


def trial_dir_of(setup: SearchSetup, number: int) -> Path:
    return setup.run_dir / "trials" / f"{number:04d}"
