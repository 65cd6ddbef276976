"""Retraining: one candidate distilled through the full budget, then scored exactly like the teacher.

Used by `slimnas retrain` (a search's best candidates and references) and by the search-vs-baselines
benchmark (each method's finalist). Every candidate of one `Retraining` gets the same KD tokens,
corpus rows, order, schedule and seed, and the same scorer, so their numbers compare fairly.
"""

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel

from slimnas.bench.memory import measure_memory
from slimnas.bench.quality import score_model, summary_score
from slimnas.bench.settings import QualitySettings, SpeedSettings
from slimnas.bench.speed import check_engine, compare_speed, measure_speed
from slimnas.bench.tasks import TaskSuite
from slimnas.compress.arch import Shape, architecture_of, flops_per_token, param_count
from slimnas.compress.context import TeacherContext
from slimnas.compress.distill import DistillResult, build_distiller, distill_to_budget, make_teacher_targets
from slimnas.compress.heldout import HeldoutSet
from slimnas.compress.models import LoadedModel, cache_root
from slimnas.compress.prune import PrunePlan, plan_pruning, prune_model, save_checkpoint
from slimnas.compress.settings import DistillSettings, PruningSettings
from slimnas.compress.teacher_targets import TeacherTargets
from slimnas.core.device import hardware
from slimnas.core.errors import SlimnasError
from slimnas.core.files import hash_json, hash_tensor, read_json, write_json
from slimnas.core.rundir import KD_DIR, MODEL_DIR, RECORD_FILE, STATE_FILE, TEACHER, RetrainRecord
from slimnas.retrain.model_card import Lineage, save_model_card
from slimnas.retrain.settings import RetrainSettings


def generate(model, tokenizer, prompts: list[str], new_tokens: int) -> list[dict]:
    """Greedy continuations, for a side-by-side look at what the numbers mean."""
    outputs = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(model.device)
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        outputs.append({"prompt": prompt, "text": tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)})
    return outputs


@dataclass(frozen=True)
class Scorer:
    """Scores any model the same way: evaluation rows (and other held-out text), lm-eval, continuations."""

    tokenizer: object
    evaluation: HeldoutSet
    other_heldout: tuple[HeldoutSet, ...]
    suite: TaskSuite | None
    quality: QualitySettings
    precision: str
    prompts: list[str]
    new_tokens: int
    log_to: Path

    def __call__(self, model, name: str) -> dict:
        started = time.perf_counter()
        part = {
            "heldout": asdict(self.evaluation.evaluate(model)),
            "heldout_other": {h.split: asdict(h.evaluate(model)) for h in self.other_heldout},
            "scores": [],
            "summary": asdict(summary_score([])),
        }
        seconds = {"heldout": time.perf_counter() - started}
        if self.suite is not None:
            started = time.perf_counter()
            records = score_model(
                model, self.tokenizer, self.suite, self.quality, "evaluation", name, self.precision, self.log_to
            )
            part["scores"] = [asdict(r) for r in records]
            part["summary"] = asdict(summary_score(records))
            seconds["lm_eval"] = time.perf_counter() - started
        part["generations"] = generate(model, self.tokenizer, list(self.prompts), self.new_tokens)
        return part | {"seconds": seconds}


@dataclass(frozen=True)
class Retraining:
    """What every candidate of one retraining shares."""

    context: TeacherContext
    lineage: Lineage  # the teacher as named, and the original model it was made from (for the model cards)
    targets: TeacherTargets
    distill: DistillSettings
    budget_tokens: int  # retrain.budget_tokens: every candidate's KD
    scorer: Scorer
    speed: SpeedSettings | None  # None: no timing and no memory measurement
    command: str
    settings_hash: str  # of everything above that changes a result: a record of other settings is not reused


def retrain_hash(
    context: TeacherContext,
    distill: DistillSettings,
    settings: RetrainSettings,
    quality: QualitySettings,
    suite: TaskSuite | None,
    speed: SpeedSettings | None,
    other_rows: dict[str, object] | None = None,
) -> str:
    """Everything that changes a retrained candidate's numbers, hashed: its record is reused only on a match."""
    other = {name: hash_tensor(rows) for name, rows in (other_rows or {}).items()}
    scoring = [asdict(quality), suite.tasks if suite else None, speed.identity() if speed else None]
    teacher = [context.teacher.fingerprint, context.corpus.fingerprint]
    shown = [settings.prompts, settings.new_tokens, settings.reference_teacher]
    distilled = asdict(distill) | {"budget_tokens": settings.budget_tokens}
    return hash_json([*teacher, distilled, *scoring, *shown, other])


def prepare_retraining(
    context: TeacherContext,
    teacher_name: str,
    distill: DistillSettings,
    settings: RetrainSettings,
    quality: QualitySettings,
    suite: TaskSuite | None,
    speed: SpeedSettings | None,
    log_to: Path,
    command: str,
    other_heldout: tuple[HeldoutSet, ...] = (),
) -> Retraining:
    """The teacher's logits for every KD row (filled once, up front) and the scorer."""
    if speed is not None:
        check_engine(speed, context.teacher.model.config, teacher_name)
    hashed = retrain_hash(context, distill, settings, quality, suite, speed, {h.split: h.rows for h in other_heldout})
    targets = make_teacher_targets(distill, context.teacher, context.corpus.train, cache_root())
    targets.prepare(distill.rows_for(settings.budget_tokens, context.corpus.seq_len))
    scorer = Scorer(
        tokenizer=context.teacher.tokenizer,
        evaluation=HeldoutSet("evaluation", context.corpus.evaluation, context.teacher.model, distill.precision),
        other_heldout=other_heldout,
        suite=suite,
        quality=quality,
        precision=distill.precision,
        prompts=list(settings.prompts),
        new_tokens=settings.new_tokens,
        log_to=log_to,
    )
    lineage = Lineage.of(teacher_name, settings.reference_teacher)
    return Retraining(context, lineage, targets, distill, settings.budget_tokens, scorer, speed, command, hashed)


def reusable(out: Path, settings_hash: str) -> RetrainRecord | None:
    """The record of a finished candidate, reused only when it was made with the same settings (else one line)."""
    if not (out / RECORD_FILE).is_file():
        return None
    values = read_json(out / RECORD_FILE)
    if values.get("settings_hash") != settings_hash:
        raise SlimnasError(
            f"{out} was retrained with other settings (budget, corpus, scoring or teacher): use another run "
            f"directory, or delete {out} to redo it"
        )
    return RetrainRecord(**values)


def score_teacher(retraining: Retraining, out: Path, model: LoadedModel | None = None) -> RetrainRecord:
    """The teacher (or another unpruned model: the original of a corrected teacher) scored by the same scorer,
    once per directory."""
    if (record := reusable(out, retraining.settings_hash)) is not None:
        return record
    loaded = model or retraining.context.teacher
    teacher, speed = loaded.model, retraining.speed
    arch = architecture_of(teacher.config)  # a chain's earlier student may be per layer
    scored = retraining.scorer(teacher, "teacher")
    timed, memory = {}, {}
    if speed is not None:
        started = time.perf_counter()
        timed = asdict(measure_speed(teacher, speed, "teacher", loaded.tokenizer))
        scored["seconds"]["speed"] = time.perf_counter() - started
        started = time.perf_counter()
        memory = asdict(measure_memory(loaded.source, speed, retraining.context.device))
        scored["seconds"]["memory"] = time.perf_counter() - started
    record = RetrainRecord(
        name=TEACHER, trial=None, label=arch.label(), architecture=arch.as_dict(), params=param_count(teacher.config),
        params_fraction=1.0, reference=None, kd_tokens=0, search={}, kd={}, speed=timed,
        flops_per_token=flops_per_token(teacher.config, speed.prompt_len if speed else 128), memory=memory,
        model_dir=None, command=retraining.command, hardware=hardware(retraining.context.device),
        corpus=retraining.context.corpus.describe(), settings_hash=retraining.settings_hash, **scored,
    )  # fmt: skip
    write_json(out / RECORD_FILE, asdict(record))
    return record


@dataclass(frozen=True)
class Candidate:
    name: str
    arch: Shape
    policy: PruningSettings
    trial: int | None = None
    reference: str | None = None
    search: dict | None = None  # its search-time quality, when it came from a search
    expected_plan: dict | None = None  # the cut the search made, to check the re-cut against


@dataclass(frozen=True)
class Distilled:
    """A candidate distilled through the budget: the student in memory, its cut, and how the KD went."""

    student: PreTrainedModel
    plan: PrunePlan
    result: DistillResult


def distil(retraining: Retraining, candidate: Candidate, out: Path) -> Distilled:
    """Re-prune, then distil through the budget, resuming from OUT's KD state (a finished one only loads). Under
    torchrun every rank runs it: each trains its share of every batch, rank 0 alone evaluates and checkpoints."""
    context = retraining.context
    plan = plan_pruning(context.importance, context.teacher.model.config, candidate.arch, candidate.policy)
    if candidate.expected_plan and plan.as_dict() != candidate.expected_plan:
        raise SlimnasError(
            f"re-pruning {candidate.name} gave another cut than the search did: the importance scores or settings "
            f"changed since the search"
        )
    student = prune_model(context.teacher.model, plan, candidate.arch)
    kd = build_distiller(
        student, context.teacher, context.corpus.train, retraining.distill, retraining.budget_tokens, cache_root(),
        cut=(plan.layers, plan.channels), targets=retraining.targets,
    )  # fmt: skip
    identity = {"plan": plan.as_dict(), "teacher": context.teacher.fingerprint, "corpus": context.corpus.fingerprint}
    return Distilled(student, plan, distill_to_budget(kd, retraining.scorer.evaluation, out / KD_DIR, identity))


def retrain(
    retraining: Retraining,
    candidate: Candidate,
    out: Path,
    teacher: RetrainRecord,
    distilled: DistillResult | None = None,
) -> RetrainRecord:
    """Distil (resuming a killed run), save the checkpoint, score it, write its card and record: one process.

    `distilled`: how this candidate's data-parallel KD went, when all ranks ran it before the others left (see
    the recipe); its finished state then only loads here, and the record keeps that run's numbers."""
    if (record := reusable(out, retraining.settings_hash)) is not None:
        return record
    context = retraining.context
    done = distil(retraining, candidate, out)
    student, plan, result = done.student, done.plan, distilled or done.result
    provenance = {"trial": candidate.trial, "kd_tokens": result.tokens, "plan": plan.as_dict(),
                  "corpus": context.corpus.describe(), "teacher": retraining.lineage.teacher}  # fmt: skip
    save_checkpoint(student, context.teacher.tokenizer, out / MODEL_DIR, provenance | {"command": retraining.command})
    scored = retraining.scorer(student, candidate.arch.label())
    scored["seconds"]["kd"] = result.seconds
    speed, memory = {}, {}
    if retraining.speed is not None:
        started = time.perf_counter()
        comparison = compare_speed(
            student, context.teacher.model, retraining.speed, candidate.arch.label(), "teacher",
            context.teacher.tokenizer,
        )  # fmt: skip
        speed = comparison.as_row() | {"model": asdict(comparison.model), "reference": asdict(comparison.reference)}
        scored["seconds"]["speed"] = time.perf_counter() - started
        started = time.perf_counter()
        memory = asdict(measure_memory(str(out / MODEL_DIR), retraining.speed, context.device))
        scored["seconds"]["memory"] = time.perf_counter() - started
    params = param_count(context.teacher.model.config, candidate.arch)
    record = RetrainRecord(
        name=candidate.name, trial=candidate.trial, label=candidate.arch.label(), architecture=candidate.arch.as_dict(),
        params=params, params_fraction=params / param_count(context.teacher.model.config),
        reference=candidate.reference, kd_tokens=result.tokens, search=candidate.search or {}, kd=asdict(result),
        speed=speed, flops_per_token=flops_per_token(student.config, retraining.speed.prompt_len if retraining.speed
                                                     else 128),
        memory=memory, model_dir=str(out / MODEL_DIR), command=retraining.command,
        hardware=hardware(context.device), corpus=context.corpus.describe(), settings_hash=retraining.settings_hash,
        **scored,
    )  # fmt: skip
    save_model_card(record, teacher, retraining.lineage, plan.as_dict(), out / MODEL_DIR)
    write_json(out / RECORD_FILE, asdict(record))
    (out / KD_DIR / STATE_FILE).unlink(missing_ok=True)  # finished: its optimizer state is not needed again
    return record
