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
from dataclasses import replace
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from slimnas.bench.quality import QualitySettings
from slimnas.bench.speed import SpeedSettings
from slimnas.bench.tasks import prepare_suite
from slimnas.compress.arch import Architecture
from slimnas.compress.context import load_teacher_context
from slimnas.compress.corpus import DataSettings
from slimnas.compress.distill import DistillSettings
from slimnas.compress.importance import ImportanceSettings
from slimnas.compress.models import cache_root
from slimnas.compress.prune import PrunePolicy
from slimnas.compress.runtime.config import settings_from
from slimnas.compress.runtime.errors import SlimnasError
from slimnas.compress.runtime.tables import format_table, plus_minus
from slimnas.search.records import (
    COMPLETE,
    RetrainRecord,
    TrialRecord,
    add_wall_seconds,
    read_records,
    read_retrained,
    read_run,
    update_run,
)
from slimnas.search.retraining import Candidate, RetrainSettings, prepare_retraining, retrain, score_teacher
from slimnas.search.tables import run_front

RETRAIN_COLUMNS = ["name", "label", "params %", "KD tokens", "held-out KL", "perplexity", "summary", "decode speed-up"]


def choose_candidates(records: list[TrialRecord], run: dict, top_k: int, references: bool) -> list[TrialRecord]:
    """The top_k of the run's front by quality, then the reference trials that reached the last rung."""
    complete = [r for r in records if r.state == COMPLETE]
    if not complete:
        raise SlimnasError("the run has no trial that reached the last rung: nothing to retrain")
    on_front = set(run_front(run, records))
    front = [r for r in complete if r.trial in on_front]
    if top_k > len(front):
        raise SlimnasError(f"retrain.top_k={top_k} is larger than the run's front ({len(front)} trials)")
    chosen = sorted(front, key=lambda r: -r.final["quality"])[:top_k]
    return chosen + [r for r in complete if references and r.reference and r not in chosen]


def effective_config(cfg: DictConfig, run: dict) -> DictConfig:
    """The run's teacher, corpus, importance, pruning and precision (candidates are re-cut exactly as they were
    searched), with retrain's own distillation, scoring and timing settings."""
    searched = OmegaConf.create(run["settings"])
    keys = ("teacher", "data", "importance", "pruning", "precision")
    return OmegaConf.merge(cfg, {key: searched[key] for key in keys})


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


def main(cfg: DictConfig) -> None:
    started = time.perf_counter()
    # 1. The run, its candidates and every setting, checked before any compute or any write
    run_dir = Path(cfg.run_dir)
    run = read_run(run_dir)
    cfg = effective_config(cfg, run)
    settings = settings_from(RetrainSettings, cfg.retrain, "retrain")
    candidates = choose_candidates(read_records(run_dir), run, settings.top_k, settings.references)
    data = settings_from(DataSettings, cfg.data, "data")
    distill = settings_from(DistillSettings, cfg.distill, "distill", precision=cfg.precision)
    quality = settings_from(QualitySettings, cfg.quality, "quality")
    speed = settings_from(SpeedSettings, cfg.speed, "speed", precision=cfg.precision)
    importance = settings_from(ImportanceSettings, cfg.importance, "importance", precision=cfg.precision)
    policy = settings_from(PrunePolicy, cfg.pruning, "pruning")
    suite = prepare_suite(list(quality.tasks), data.dir) if quality.tasks else None
    print(
        f"retrain: {len(candidates)} candidates of {run_dir} (trials {', '.join(str(c.trial) for c in candidates)}), "
        f"{settings.budget_tokens:,} KD tokens each; scored on {data.evaluation_rows} evaluation rows"
        + (f" and {suite.describe()}, {quality.limit} documents each" if suite else "")
    )
    update_run(run_dir, retrain={"command": cfg.command, "budget_tokens": settings.budget_tokens})

    # 2. Teacher, corpus, importance (the search's, from the cache), the teacher's logits, the scorer
    context = load_teacher_context(cfg.teacher, cfg.device, data, cache_root(), importance)
    retraining = prepare_retraining(
        context, cfg.teacher, distill, settings, quality, suite, speed, log_to=run_dir / "log.txt", command=cfg.command
    )

    # 3. The teacher, scored the same way (once)
    print("teacher: scoring")
    teacher = score_teacher(retraining, run_dir / "retrain" / "teacher")

    # 4. Each candidate: re-prune, distil through the budget (resumable), save, score; finished ones are kept
    for record in candidates:
        out = run_dir / "retrain" / f"{record.trial:04d}"
        kept = (out / "record.json").is_file()
        print(f"trial {record.trial} ({record.label}, {record.reference or 'front'}): "
              + ("retrained before, kept" if kept else "distilling"))  # fmt: skip
        candidate = Candidate(
            name=f"{record.trial:04d}",
            arch=Architecture(**record.architecture),
            policy=replace(policy, **record.pruning),
            trial=record.trial,
            reference=record.reference,
            search={"quality": record.final["quality"], "quality_stderr": record.final["quality_stderr"],
                    "kd_tokens": record.kd_tokens},
            expected_plan=record.plan,
        )  # fmt: skip
        retrain(retraining, candidate, out, teacher)

    # 5. The retrained candidates beside the teacher
    add_wall_seconds(run_dir, "retrain", time.perf_counter() - started)
    print(format_table([retrain_row(r) for r in read_retrained(run_dir)], RETRAIN_COLUMNS))
