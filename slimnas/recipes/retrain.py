"""slimnas retrain: full distillation and full scoring of a search's best candidates and its references.

    slimnas retrain runs/demo retrain.top_k=2 retrain.budget_tokens=400000

Every candidate is re-pruned from the run's cached importance and distilled through the same budget:
the same tokens, corpus rows, schedule and seed, so the comparison is fair. Then it is scored like
the teacher: the full-vocabulary KL and perplexity on the evaluation documents (never used to choose),
lm-eval on each task's evaluation pool, speed against the teacher, peak memory on its own, and greedy
continuations of a few prompts. Resumable per candidate: a finished candidate is kept when its record
was made with the same settings (another budget or scorer is refused before any compute), a killed
one resumes from its last KD checkpoint. Each result is a Hugging Face checkpoint with slimnas.json
and a model card.
"""

import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from slimnas.bench.tasks import prepare_suite
from slimnas.compress.arch import shape_of
from slimnas.compress.context import load_teacher_context
from slimnas.compress.heldout import HeldoutSet
from slimnas.compress.models import cache_root, load_model
from slimnas.compress.settings import PruningSettings
from slimnas.core import distributed
from slimnas.core.errors import SlimnasError
from slimnas.core.launch import launch
from slimnas.core.rundir import (
    COMPLETE,
    RECORD_FILE,
    REFERENCE,
    REFERENCE_DIR,
    RetrainRecord,
    TrialRecord,
    add_wall_seconds,
    read_front,
    read_records,
    read_retrained,
    read_run,
    search_pick,
    update_run,
)
from slimnas.core.settings import settings_of
from slimnas.core.tables import format_table, plus_minus
from slimnas.retrain.retraining import (
    Candidate,
    distil,
    prepare_retraining,
    retrain,
    retrain_hash,
    reusable,
    score_teacher,
)

RETRAIN_COLUMNS = ["name", "label", "params %", "KD tokens", "held-out KL", "perplexity", "summary", "decode speed-up"]


def choose_candidates(run_dir: Path, top_k: int, references: bool) -> list[TrialRecord]:
    """The search's pick, then the best of the run's front by quality up to top_k (fewer when the front is
    smaller: said, not refused), then the reference trials that reached the last rung."""
    records = read_records(run_dir)
    complete = [r for r in records if r.state == COMPLETE]
    if not complete:
        raise SlimnasError("the run has no trial that reached the last rung: nothing to retrain")
    front = [r for r in complete if r.trial in read_front(run_dir)["trials"]]
    pick = search_pick(run_dir, records)
    if pick is None:
        over = "; ".join(f"trial {r.trial}: {r.over_budget}" for r in complete)
        raise SlimnasError(f"no trial that reached the last rung meets every budget ({over}): nothing to retrain")
    ranked = [pick] + sorted((r for r in front if r is not pick), key=lambda r: -r.final["quality"])
    if top_k > len(ranked):
        print(f"note: retrain.top_k={top_k} but the front has {len(ranked)} candidate(s): retraining {len(ranked)}")
    chosen = ranked[:top_k]
    return chosen + [r for r in complete if references and r.reference and r not in chosen]


def effective_config(cfg: DictConfig, run: dict) -> DictConfig:
    """The run's teacher, corpus, importance, pruning and precision (candidates are re-cut exactly as they were
    searched) and its lm-eval pools (the search chose on its selection pool: no final score reads it), with
    retrain's own distillation, scoring and timing settings."""
    searched = OmegaConf.create(run["settings"])
    keys = ("teacher", "data", "importance", "pruning", "precision")
    merged = OmegaConf.merge(cfg, {key: searched[key] for key in keys})
    if "quality" in searched:
        pools = settings_of(merged, "quality").on_search_pools(searched.quality.seed, searched.quality.selection_share)
        merged.quality.seed, merged.quality.selection_share = pools.seed, pools.selection_share
    return merged


def retrain_row(r: RetrainRecord) -> dict:
    return {
        "name": r.name,
        "label": r.label,
        "params %": f"{100 * r.params_fraction:.1f}",
        "KD tokens": r.kd_tokens,
        "held-out KL": "0" if r.name == "teacher" else plus_minus(r.heldout["kl"], r.heldout["kl_stderr"]),
        "perplexity": plus_minus(r.heldout["perplexity"], r.heldout["perplexity_stderr"]),
        "summary": plus_minus(r.summary["value"], r.summary["stderr"]),
        "decode speed-up": plus_minus(r.speed.get("decode_speedup"), r.speed.get("decode_speedup_stderr")),
    }


def candidate_of(record: TrialRecord, out: Path, policy: PruningSettings) -> Candidate:
    """A searched trial as retraining takes it: re-cut exactly as it was searched, its search-time quality kept."""
    return Candidate(
        name=out.name,
        arch=shape_of(record.architecture),
        policy=replace(policy, **record.pruning),
        trial=record.trial,
        reference=record.reference,
        search={"quality": record.final["quality"], "quality_stderr": record.final["quality_stderr"],
                "kd_tokens": record.kd_tokens, "rung": record.rung},
        expected_plan=record.plan,
    )  # fmt: skip


def job(cfg: DictConfig) -> None:
    """One candidate's retraining in a launcher job (retrain.jobs=true): this command with retrain.only set."""
    main(cfg)


def main(cfg: DictConfig) -> None:
    started = time.perf_counter()
    distributed.init(settings_of(cfg, "retrain").ddp_timeout_s)  # under torchrun: data-parallel KD
    if not distributed.is_main():
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of this rank)
    # 1. The run, its candidates and every setting, checked before any compute or any write
    run_dir = Path(cfg.run_dir)
    run = read_run(run_dir)
    cfg = effective_config(cfg, run)
    settings = settings_of(cfg, "retrain")
    data, distill, quality = settings_of(cfg, "data"), settings_of(cfg, "distill"), settings_of(cfg, "quality")
    speed, importance, policy = settings_of(cfg, "speed"), settings_of(cfg, "importance"), settings_of(cfg, "pruning")
    distributed.check_batch(distill.batch_size)
    chosen = choose_candidates(run_dir, settings.top_k, settings.references)
    if settings.only is not None:  # one job of retrain.jobs=true: its candidate alone
        chosen = [c for c in chosen if c.trial == settings.only]
        if not chosen:
            raise SlimnasError(f"retrain.only={settings.only} is not one of the candidates to retrain")
    suite = prepare_suite(list(quality.tasks), data.dir) if quality.tasks else None

    # 2. Teacher, corpus, importance (the search's, from the cache); records of other settings refused here
    context = load_teacher_context(cfg.teacher, cfg.device, data, cache_root(), importance)
    reference, other = None, ()
    if settings.reference_teacher:  # every candidate's KL to it too (the original teacher of a corrected one)
        reference = load_model(settings.reference_teacher, context.device)
        other = (HeldoutSet(REFERENCE, context.corpus.evaluation, reference.model, cfg.precision),)
    hashed = retrain_hash(context, distill, settings, quality, suite, speed, {h.split: h.rows for h in other})
    outs = [run_dir / "retrain" / name for name in ["teacher", *(f"{r.trial:04d}" for r in chosen)]]
    for out in [*outs, run_dir / REFERENCE_DIR]:
        reusable(out, hashed)
    print(
        f"retrain: {len(chosen)} candidates of {run_dir} (trials {', '.join(str(c.trial) for c in chosen)}), "
        f"{settings.budget_tokens:,} KD tokens each; scored on {context.corpus.documents('evaluation')} evaluation "
        f"{context.corpus.unit}s" + (f" and {suite.describe()}, {quality.limit} documents each (evaluation pool of "
                                      f"quality.seed={quality.seed}, the search's)" if suite else "")
    )  # fmt: skip
    if distributed.is_main():
        update_run(run_dir, retrain={"command": cfg.command, "budget_tokens": settings.budget_tokens})
    retraining = prepare_retraining(
        context, cfg.teacher, distill, settings, quality, suite, speed, log_to=run_dir / "log.txt",
        command=cfg.command, other_heldout=other,
    )  # fmt: skip
    candidates = [
        (candidate_of(record, out, policy), record, out) for record, out in zip(chosen, outs[1:], strict=True)
    ]

    # 3. Under torchrun every rank distils every candidate first; then the others leave and rank 0 goes on alone,
    #    so no rank waits on the process group (retrain.ddp_timeout_s) while rank 0 scores
    distilled = {}
    if distributed.world() > 1:
        for candidate, record, out in candidates:
            if not (out / RECORD_FILE).is_file():
                print(f"trial {record.trial} ({record.label}): distilling on {distributed.world()} processes")
                distilled[out] = distil(retraining, candidate, out).result
        if not distributed.leave():
            return

    # 4. The teacher, scored the same way (once), and the reference teacher beside it
    print("teacher: scoring")
    teacher = score_teacher(retraining, outs[0])
    if reference is not None:
        print(f"reference teacher {settings.reference_teacher}: scoring")
        score_teacher(retraining, run_dir / REFERENCE_DIR, reference)

    # 5. Each candidate: re-prune, distil through the budget (resumable), save, score; finished ones are kept.
    #    With retrain.jobs=true each goes to a job of its own through the Hydra launcher, and this waits for them
    if settings.jobs and len(candidates) > 1:
        sweep = "retrain.only=" + ",".join(str(record.trial) for _, record, _ in candidates)
        launch(cfg, job, sweep, len(candidates), "retrain jobs (one per candidate)")
        candidates = []
    for candidate, record, out in candidates:
        step = "scoring" if out in distilled else "distilling"
        kept = (out / RECORD_FILE).is_file()
        print(f"trial {record.trial} ({record.label}, {record.reference or 'front'}): "
              + ("retrained before, kept" if kept else step))  # fmt: skip
        retrain(retraining, candidate, out, teacher, distilled.get(out))

    # 6. The retrained candidates beside the teacher
    add_wall_seconds(run_dir, "retrain", time.perf_counter() - started)
    print(format_table([retrain_row(r) for r in read_retrained(run_dir)], RETRAIN_COLUMNS))
