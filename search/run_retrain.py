"""slimnas retrain: full distillation and full scoring of a search's best candidates and its references.

    slimnas retrain runs/demo retrain.top_k=2 retrain.budget_tokens=400000

Every candidate is re-pruned from the run's cached importance and distilled through the same budget:
the same tokens, corpus rows, schedule and seed, so the comparison is fair. Then it is scored like
the teacher: the full-vocabulary KL and perplexity on the evaluation rows (never used to choose),
the lm-eval suite, speed against the teacher, peak memory on its own, and greedy continuations of a
few prompts. Resumable per candidate: finished candidates are not redone, a killed one resumes from
its last KD checkpoint. Each result is a Hugging Face checkpoint with slimnas.json and a model card.
"""

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from bench.memory import measure_memory
from bench.quality import QualitySettings, score_model, summary_score
from bench.speed import SpeedSettings, compare_speed, measure_speed
from bench.tasks import TaskSuite, prepare_suite
from compress.arch import Architecture, flops_per_token, param_count
from compress.context import load_teacher_context
from compress.corpus import DataSettings
from compress.distill import STATE_FILE, Distiller, DistillSettings, distill_to_budget, make_teacher_targets
from compress.heldout import HeldoutSet
from compress.importance import ImportanceSettings
from compress.models import cache_root
from compress.prune import PrunePolicy, plan_pruning, prune_model, save_checkpoint
from compress.runtime.config import settings_from
from compress.runtime.device import hardware
from compress.runtime.errors import SlimnasError
from compress.runtime.files import write_json
from reports.model_card import model_card
from reports.tables import format_table, plus_minus
from search.objectives import front_of, objectives_from_config
from search.records import (
    COMPLETE,
    RECORD_FILE,
    RetrainRecord,
    TrialRecord,
    read_records,
    read_retrained,
    read_run,
    update_run,
)

RETRAIN_COLUMNS = ["name", "label", "params %", "KD tokens", "held-out KL", "perplexity", "summary", "decode speed-up"]


def choose_candidates(records: list[TrialRecord], run: dict, top_k: int, references: bool) -> list[TrialRecord]:
    """The top_k of the run's front by quality, then the reference trials that reached the last rung."""
    complete = [r for r in records if r.state == COMPLETE]
    if not complete:
        raise SlimnasError("the run has no trial that reached the last rung: nothing to retrain")
    search = run["settings"]["search"]
    objectives = objectives_from_config(list(search["objectives"]))
    on_front = set(front_of(records, objectives, search["budget"]["latency_ms"]))
    front = [r for r in complete if r.trial in on_front]
    if top_k > len(front):
        raise SlimnasError(f"retrain.top_k={top_k} is larger than the run's front ({len(front)} trials)")
    chosen = sorted(front, key=lambda r: -r.final["quality"])[:top_k]
    return chosen + [r for r in complete if references and r.reference and r not in chosen]


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
    """Scores any model the same way: evaluation rows, lm-eval suite, continuations of the prompts."""

    tokenizer: object
    evaluation: HeldoutSet
    suite: TaskSuite | None
    quality: QualitySettings
    precision: str
    prompts: tuple[str, ...]
    new_tokens: int
    seed: int
    log_to: Path

    def __call__(self, model, name: str) -> dict:
        started = time.perf_counter()
        part = {"heldout": asdict(self.evaluation.evaluate(model)), "scores": [], "summary": None}
        part["summary_stderr"], seconds = None, {"heldout": time.perf_counter() - started}
        if self.suite is not None:
            started = time.perf_counter()
            records = score_model(
                model, self.tokenizer, self.suite, self.quality.limit, self.quality.batch_size, self.seed, name,
                self.precision, self.quality.max_length, self.log_to,
            )  # fmt: skip
            part["scores"] = [asdict(r) for r in records]
            if any(r.metric in ("acc", "acc_norm") for r in records):
                part["summary"], part["summary_stderr"] = summary_score(records)
            seconds["lm_eval"] = time.perf_counter() - started
        part["generations"] = generate(model, self.tokenizer, list(self.prompts), self.new_tokens)
        return part | {"seconds": seconds}


def effective_config(cfg: DictConfig, run: dict) -> DictConfig:
    """The run's teacher, corpus, importance and pruning (candidates are re-cut exactly as searched), with
    retrain's own distillation, scoring and timing settings."""
    searched = OmegaConf.create(run["settings"])
    return OmegaConf.merge(cfg, {key: searched[key] for key in ("teacher", "data", "importance", "pruning")})


def main(cfg: DictConfig) -> None:
    started_all = time.perf_counter()
    # 1. The run and its candidates, checked before any compute
    run_dir = Path(cfg.run_dir)
    run = read_run(run_dir)
    cfg = effective_config(cfg, run)
    candidates = choose_candidates(read_records(run_dir), run, cfg.retrain.top_k, cfg.retrain.references)
    data = settings_from(DataSettings, cfg.data, "data")
    distill = settings_from(DistillSettings, cfg.distill, "distill", precision=cfg.precision)
    distill = replace(distill, budget_tokens=cfg.retrain.budget_tokens)
    quality = settings_from(QualitySettings, cfg.quality, "quality")
    speed = settings_from(SpeedSettings, cfg.speed, "speed", precision=cfg.precision)
    importance = settings_from(ImportanceSettings, cfg.importance, "importance", precision=cfg.precision)
    policy = settings_from(PrunePolicy, cfg.pruning, "pruning")
    print(
        f"retrain: {len(candidates)} candidates of {run_dir} (trials {', '.join(str(c.trial) for c in candidates)}), "
        f"{distill.budget_tokens:,} KD tokens each; scored on {data.evaluation_rows} evaluation rows"
        + (f" and {', '.join(quality.tasks)} ({quality.limit} documents each)" if quality.tasks else "")
    )

    # 2. Teacher, corpus, importance (the search's, from the cache), the teacher's logits, the scorer
    cache_dir = cache_root(cfg.cache_dir)
    context = load_teacher_context(cfg.teacher, cfg.device, data, cache_dir, importance)
    teacher = context.teacher
    targets = make_teacher_targets(distill, teacher, context.corpus.train, cache_dir)
    scorer = Scorer(
        tokenizer=teacher.tokenizer,
        evaluation=HeldoutSet("evaluation", context.corpus.evaluation, teacher.model, cfg.precision),
        suite=prepare_suite(list(quality.tasks), data.dir, run_dir / "retrain" / "tasks") if quality.tasks else None,
        quality=quality,
        precision=cfg.precision,
        prompts=tuple(cfg.retrain.prompts),
        new_tokens=cfg.retrain.new_tokens,
        seed=data.seed,
        log_to=run_dir / "log.txt",
    )
    done = {r.name for r in read_retrained(run_dir)}

    # 3. The teacher, scored the same way (once)
    if "teacher" not in done:
        print("teacher: scoring")
        scored = scorer(teacher.model, "teacher")
        arch = Architecture.of(teacher.model.config)
        teacher_record = RetrainRecord(
            name="teacher", trial=None, label=arch.label(), architecture=arch.as_dict(),
            params=param_count(teacher.model.config), params_fraction=1.0, reference=None, kd_tokens=0, search={},
            kd={}, speed=asdict(measure_speed(teacher.model, speed, "teacher")),
            flops_per_token=flops_per_token(teacher.model.config, speed.prompt_len),
            memory=asdict(measure_memory(cfg.teacher, speed, context.device)), model_dir=None,
            command=cfg.command, hardware=hardware(context.device), **scored,
        )  # fmt: skip
        write_json(run_dir / "retrain" / "teacher" / RECORD_FILE, asdict(teacher_record))
    teacher_record = next(r for r in read_retrained(run_dir) if r.name == "teacher")

    # 4. Each candidate: re-prune, distil through the budget (resumable), save, score
    for candidate in candidates:
        name, out = f"{candidate.trial:04d}", run_dir / "retrain" / f"{candidate.trial:04d}"
        if name in done:
            print(f"trial {candidate.trial} ({candidate.label}): retrained before, kept")
            continue
        arch = Architecture(**candidate.architecture)
        plan = plan_pruning(context.importance, teacher.model.config, arch, replace(policy, **candidate.pruning))
        if candidate.plan and plan.as_dict() != candidate.plan:
            raise SlimnasError(
                f"re-pruning trial {candidate.trial} gave another cut than the search did: the importance scores "
                f"or settings changed since ({run_dir / 'run.json'})"
            )
        student = prune_model(teacher.model, plan, arch)
        print(f"trial {candidate.trial} ({candidate.label}, {candidate.reference or 'front'}): distilling")
        started = time.perf_counter()
        kd = Distiller(student, targets, context.corpus.train, distill)
        identity = {"plan": plan.as_dict(), "teacher": teacher.fingerprint, "corpus": context.corpus.fingerprint}
        result = distill_to_budget(kd, scorer.evaluation, out / "kd", identity)
        kd_seconds = time.perf_counter() - started
        provenance = {
            "trial": candidate.trial,
            "teacher": cfg.teacher,
            "kd_tokens": result.tokens,
            "plan": plan.as_dict(),
        }
        save_checkpoint(student, teacher.tokenizer, out / "model", provenance | {"command": cfg.command})
        scored = scorer(student, candidate.label)
        started = time.perf_counter()
        comparison = compare_speed(student, teacher.model, speed, candidate.label, "teacher")
        scored["seconds"] |= {"kd": kd_seconds, "speed": time.perf_counter() - started}
        record = RetrainRecord(
            name=name, trial=candidate.trial, label=candidate.label, architecture=candidate.architecture,
            params=candidate.params, params_fraction=candidate.params_fraction, reference=candidate.reference,
            kd_tokens=result.tokens, kd=asdict(result),
            search={"quality": candidate.final["quality"], "quality_stderr": candidate.final["quality_stderr"],
                    "kd_tokens": candidate.kd_tokens},
            speed=comparison.as_row() | {"model": asdict(comparison.model), "reference": asdict(comparison.reference)},
            flops_per_token=flops_per_token(student.config, speed.prompt_len),
            memory=asdict(measure_memory(str(out / "model"), speed, context.device)), model_dir=str(out / "model"),
            command=cfg.command, hardware=hardware(context.device), **scored,
        )  # fmt: skip
        (out / "model" / "README.md").write_text(model_card(record, teacher_record, cfg.teacher))
        write_json(out / RECORD_FILE, asdict(record))
        (out / "kd" / STATE_FILE).unlink(missing_ok=True)  # finished: its optimizer state is not needed again

    # 5. The retrained candidates beside the teacher
    update_run(run_dir, retrain={"command": cfg.command, "budget_tokens": distill.budget_tokens})
    update_run(run_dir, wall_seconds={"retrain": time.perf_counter() - started_all})
    print(format_table([retrain_row(r) for r in read_retrained(run_dir)], RETRAIN_COLUMNS))


def retrain_row(r: RetrainRecord) -> dict:
    return {
        "name": r.name,
        "label": r.label,
        "params %": f"{100 * r.params_fraction:.1f}",
        "KD tokens": r.kd_tokens,
        "held-out KL": plus_minus(r.heldout["kl"], r.heldout["kl_stderr"]),
        "perplexity": plus_minus(r.heldout["perplexity"], r.heldout["perplexity_stderr"], 1),
        "summary": plus_minus(r.summary, r.summary_stderr),
        "decode speed-up": plus_minus(r.speed.get("decode_speedup"), r.speed.get("decode_speedup_stderr"), 2),
    }
