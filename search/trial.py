"""One trial, top to bottom: prune -> rung 0 (the screen's KL) -> KD rungs -> (score -> speed -> checkpoint) -> record.

The KD rungs are points on one KD run to the last rung's budget (one warmup + cosine schedule, one
optimizer, fresh corpus rows), so a candidate that goes on continues where it stood. After each rung
the race (search.race) reserves the next rung's KD tokens and says whether the candidate goes on. A
candidate that stops ends there: `finish` records it with everything it earned and why it stopped,
plus what the sampler must be told (its speed when speed is an objective, its lm-eval summary when
that is the quality). A trial writes no KD checkpoint: a killed trial is retried afresh.
"""

import time
from dataclasses import asdict, replace

from slimnas.bench.quality import score_model, summary_score
from slimnas.bench.speed import compare_speed
from slimnas.compress.arch import Shape, param_count, weight_bytes
from slimnas.compress.distill import Distiller, build_distiller
from slimnas.compress.heldout import HeldoutMetrics
from slimnas.compress.models import cache_root
from slimnas.compress.prune import PrunePlan, plan_pruning, prune_model, save_checkpoint
from slimnas.compress.settings import PruningSettings
from slimnas.core import interrupt
from slimnas.core.rundir import COMPLETE, STOPPED, TrialRecord, trial_dir
from slimnas.search.race import Race
from slimnas.search.setup import SearchSetup


def new_record(setup: SearchSetup, number: int, arch: Shape, policy: PruningSettings, attrs: dict) -> TrialRecord:
    """A trial's record before anything is measured; `attrs` are the study trial's user attributes."""
    config = setup.context.teacher.model.config
    return TrialRecord(
        trial=number,
        architecture=arch.as_dict(),
        label=arch.label(),
        params=param_count(config, arch),
        params_fraction=param_count(config, arch) / param_count(config),
        weight_bytes_bf16=weight_bytes(config, arch=arch),
        pruning=asdict(policy),
        predicted_kl=setup.blocks.library.predict(arch) if setup.blocks is not None else None,
        proposed_by=attrs.get("proposed_by", "sampler"),
        reference=attrs.get("reference"),
        reference_note=attrs.get("reference_note"),
        retry_of=attrs.get("retry_of"),
        worker=attrs.get("worker", ""),
        command=setup.command,
        hardware=setup.hardware,
    )


def policy_of(setup: SearchSetup, attrs: dict) -> PruningSettings:
    """The search's pruning policy, with a reference's own depth strategy (depth-only drops one block)."""
    strategy = attrs.get("depth_strategy")
    return replace(setup.policy, depth_strategy=strategy) if strategy else setup.policy


def distiller(setup: SearchSetup, student, plan: PrunePlan, budget_tokens: int | None = None) -> Distiller:
    """A KD run of this candidate to the last rung (or another budget: the leaders' extended rung)."""
    return build_distiller(
        student, setup.context.teacher, setup.context.corpus.train, setup.distill, budget_tokens or setup.trial_tokens,
        cache_root(), cut=(plan.layers, plan.channels), targets=setup.teacher_targets,
    )  # fmt: skip


def run_trial(setup: SearchSetup, number: int, arch: Shape, race: Race, attrs: dict) -> TrialRecord:
    started = time.perf_counter()
    teacher = setup.context.teacher.model
    policy = policy_of(setup, attrs)
    record = new_record(setup, number, arch, policy, attrs)

    # 1. Prune from the cached importance
    stage_started = time.perf_counter()
    plan = plan_pruning(setup.context.importance, teacher.config, arch, policy)
    student = prune_model(teacher, plan, arch)
    record.plan = plan.as_dict()
    record.timings["prune"] = time.perf_counter() - stage_started

    # 2. Rung 0: held-out KL before any KD (the screen's number; it ranks, it never stops a candidate)
    stage_started = time.perf_counter()
    heldout = setup.selection.evaluate(student)
    record.add_rung(0, time.perf_counter() - stage_started, 0, asdict(heldout))
    race.report(0, heldout)

    # 3. KD rungs: one schedule to the last rung; the race decides after each
    kd = distiller(setup, student, plan)
    for rung, steps in enumerate(setup.rung_steps, start=1):
        if reason := race.reserve(rung):
            return finish(setup, record, STOPPED, reason, heldout, student, started)
        stage_started = time.perf_counter()
        kd.train_until(steps)
        heldout = setup.selection.evaluate(student)
        record.add_rung(rung, time.perf_counter() - stage_started, kd.step * kd.tokens_per_step, asdict(heldout))
        if reason := race.report(rung, heldout):
            return finish(setup, record, STOPPED, reason, heldout, student, started)
    return finish(setup, record, COMPLETE, None, heldout, student, started)


def finish(
    setup: SearchSetup,
    record: TrialRecord,
    state: str,
    stop_reason: str | None,
    heldout: HeldoutMetrics,
    student,
    started: float,
) -> TrialRecord:
    """Where a trial ends: score, time and keep what the record and the sampler need; then the record."""
    interrupt.check()
    complete = state == COMPLETE
    quality = {"quality": -heldout.kl, "quality_stderr": heldout.kl_stderr}

    # 4. lm-eval on the selection pool (of stopped trials too, when the summary is the quality)
    if setup.suite is not None and (complete or setup.settings.quality_metric == "summary"):
        stage_started = time.perf_counter()
        scores = score_model(
            student, setup.context.teacher.tokenizer, setup.suite, setup.quality, "selection", record.label,
            setup.distill.precision, setup.log_file,
        )  # fmt: skip
        summary = summary_score(scores)
        record.scores = [asdict(s) for s in scores]
        record.final.update(summary=summary.value, summary_stderr=summary.stderr)
        if setup.settings.quality_metric == "summary":
            quality = {"quality": summary.value, "quality_stderr": summary.stderr}
        record.timings["score"] = time.perf_counter() - stage_started

    # 5. Speed, timed in ABBA blocks with the teacher (of stopped trials too, when speed is an objective)
    if setup.speed is not None and (complete or setup.timings_rank):
        stage_started = time.perf_counter()
        teacher = setup.context.teacher
        comparison = compare_speed(student, teacher.model, setup.speed, record.label, "teacher", teacher.tokenizer)
        record.final.update(
            decode_speedup=comparison.decode_speedup,
            decode_speedup_stderr=comparison.decode_speedup_stderr,
            decode_tokens_per_s=comparison.model.decode_tokens_per_s,
            prefill_tokens_per_s=comparison.model.prefill_tokens_per_s,
            latency_p50_ms=comparison.model.latency_p50_ms,
            latency_vs_teacher=comparison.model.latency_p50_ms / comparison.reference.latency_p50_ms,
        )
        record.speed = comparison.as_row() | {
            "model": asdict(comparison.model),
            "reference": asdict(comparison.reference),
        }
        record.timings["speed"] = time.perf_counter() - stage_started

    # 6. The checkpoint, when asked for
    if complete and setup.settings.keep_checkpoints:
        model_dir = trial_dir(setup.run_dir, record.trial) / "model"
        save_checkpoint(student, setup.context.teacher.tokenizer, model_dir, {"trial": record.trial})

    record.state, record.stop_reason = state, stop_reason
    record.final = {
        **quality,
        "params": record.params,
        "heldout_kl": heldout.kl,
        "heldout_kl_stderr": heldout.kl_stderr,
        "perplexity": heldout.perplexity,
        "perplexity_stderr": heldout.perplexity_stderr,
        "kl_per_doc": heldout.kl_per_doc,
        **record.final,
    }
    record.over_budget = setup.settings.budget.over(record.final) if complete else None
    record.seconds = time.perf_counter() - started
    return record
