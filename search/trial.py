"""One trial, top to bottom: prune -> screen -> KD rungs -> (score -> speed -> checkpoint) -> record.

Multi-fidelity: after the zero-KD screen and after each KD rung but the last, `promote(rung, quality)`
says whether the candidate earns more KD (successive halving across all workers of the study, ranked
by -KL on the selection rows). A candidate that is not promoted ends there: `finish` records it as
stopped with everything it earned, plus whatever the sampler needs to be told (its speed when speed is
an objective, its lm-eval summary when that is the quality). The KD rungs are points on one run to
the last rung's budget (one warmup + cosine schedule, one optimizer, fresh corpus rows), so a promoted
candidate continues where it stood. A trial writes no KD checkpoint: a killed trial is retried afresh.
"""

import time
from collections.abc import Callable
from dataclasses import asdict, replace

from slimnas.bench.quality import score_model, summary_score
from slimnas.bench.speed import compare_speed
from slimnas.compress.arch import Architecture, param_count, weight_bytes
from slimnas.compress.distill import Distiller, HiddenStateMatch, make_teacher_targets
from slimnas.compress.heldout import HeldoutMetrics
from slimnas.compress.models import cache_root
from slimnas.compress.prune import plan_pruning, prune_model, save_checkpoint
from slimnas.compress.runtime import interrupt
from slimnas.search.records import COMPLETE, STOPPED, TrialRecord, trial_dir
from slimnas.search.references import Reference
from slimnas.search.setup import SearchSetup

Promote = Callable[[int, float], bool]  # (rung, -KL there) -> earns the next rung?


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
    policy = setup.policy
    if reference is not None and reference.depth_strategy:
        policy = replace(policy, depth_strategy=reference.depth_strategy)
    record = TrialRecord(
        trial=number,
        architecture=arch.as_dict(),
        label=arch.label(),
        params=param_count(teacher.model.config, arch),
        params_fraction=param_count(teacher.model.config, arch) / param_count(teacher.model.config),
        weight_bytes_bf16=weight_bytes(teacher.model.config, arch=arch),
        pruning=asdict(policy),
        reference=reference.kind if reference else None,
        reference_note=reference.note if reference else None,
        retry_of=retry_of,
        worker=worker,
        command=setup.command,
        hardware=setup.hardware,
    )

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
        return finish(setup, record, STOPPED, heldout, student, started)

    # 3. KD rungs: one schedule to the last rung, ranked at the end of each
    match, targets = None, setup.teacher_targets
    if setup.distill.hidden_weight > 0:  # the teacher layers to match depend on this candidate's cut
        hidden = teacher.model.config.hidden_size
        match = HiddenStateMatch.build(setup.distill.hidden_layers, plan.layers, plan.channels, hidden)
        targets = make_teacher_targets(setup.distill, teacher, setup.context.corpus.train, cache_root(), match)
    kd = Distiller(student, targets, setup.context.corpus.train, setup.distill, match)
    for rung, steps in enumerate(setup.rung_steps, start=1):
        stage_started = time.perf_counter()
        kd.train_until(steps)
        heldout = setup.selection.evaluate(student)
        seconds = time.perf_counter() - stage_started
        record.add_stage(f"kd_{rung}", seconds, kd.step * kd.tokens_per_step, heldout.summary())
        if not promote(rung, -heldout.kl):  # the last rung is recorded only
            return finish(setup, record, STOPPED, heldout, student, started)
    return finish(setup, record, COMPLETE, heldout, student, started)


def finish(
    setup: SearchSetup, record: TrialRecord, state: str, heldout: HeldoutMetrics, student, started: float
) -> TrialRecord:
    """Where a trial ends: score, time and keep what the record and the sampler need; then the record."""
    interrupt.check()
    complete = state == COMPLETE
    summary = None

    # 4. lm-eval scores on fixed seeded subsets (of stopped trials too, when the summary is the quality)
    if setup.suite is not None and (complete or setup.settings.quality_metric == "summary"):
        stage_started = time.perf_counter()
        scores = score_model(
            student, setup.context.teacher.tokenizer, setup.suite, limit=setup.quality.trial_limit,
            batch_size=setup.quality.batch_size, seed=setup.quality.seed, model_name=record.label,
            precision=setup.distill.precision, max_length=setup.quality.max_length, log_to=setup.log_file,
        )  # fmt: skip
        summary = summary_score(scores)
        record.final.update(summary=summary[0], summary_stderr=summary[1])
        record.stages.append(
            {"stage": "score", "seconds": time.perf_counter() - stage_started, "scores": [asdict(s) for s in scores]}
        )

    # 5. Speed, timed in alternation with the teacher (of stopped trials too, when speed is an objective)
    if setup.speed is not None and (complete or setup.timings_rank):
        stage_started = time.perf_counter()
        comparison = compare_speed(student, setup.context.teacher.model, setup.speed, record.label, "teacher")
        record.final.update(
            decode_speedup=comparison.decode_speedup,
            decode_speedup_stderr=comparison.decode_speedup_stderr,
            decode_tokens_per_s=comparison.model.decode_tokens_per_s,
            prefill_tokens_per_s=comparison.model.prefill_tokens_per_s,
            latency_p50_ms=comparison.model.latency_p50_ms,
            latency_vs_teacher=comparison.model.latency_p50_ms / comparison.reference.latency_p50_ms,
        )
        record.stages.append(
            {"stage": "speed", "seconds": time.perf_counter() - stage_started, **comparison.as_row(),
             "model": asdict(comparison.model), "reference": asdict(comparison.reference)}
        )  # fmt: skip

    # 6. The checkpoint, when asked for
    if complete and setup.settings.keep_checkpoints:
        model_dir = trial_dir(setup.run_dir, record.trial) / "model"
        save_checkpoint(student, setup.context.teacher.tokenizer, model_dir, {"trial": record.trial})

    if setup.settings.quality_metric == "summary" and summary is not None:
        quality = {"quality": summary[0], "quality_stderr": summary[1]}
    else:
        quality = {"quality": -heldout.kl, "quality_stderr": heldout.kl_stderr}
    record.state = state
    record.final = {
        **quality,
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
