"""slimnas search: an Optuna study over pruned architectures of the teacher, under a budget.

    slimnas search preset=cpu run_dir=runs/demo

Each trial prunes the teacher to a candidate, distils it briefly in successive-halving rungs, and is
scored; the Pareto front of quality against size (and speed, when asked for) is printed at the end.
Running the same command again resumes the study; several processes on one study share the work.
"""

import math
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from slimnas.compress.arch import Architecture, param_count
from slimnas.compress.runtime.stats import paired_difference
from slimnas.compress.runtime.tables import format_table, plus_minus
from slimnas.search.records import TrialRecord, add_wall_seconds, update_run
from slimnas.search.setup import build_setup, describe
from slimnas.search.study import run_study, summary_lines
from slimnas.search.tables import write_trial_tables

FRONT_COLUMNS = ["trial", "label", "params", "quality", "vs best", "perplexity", "kd_tokens", "reference"]


def versus(record: TrialRecord, best: TrialRecord, quality_metric: str) -> tuple[float, float]:
    """Quality minus the best's: paired over the same selection rows for -KL; independent errors for lm-eval."""
    if quality_metric == "heldout_kl":
        difference, stderr = paired_difference(best.final["kl_per_row"], record.final["kl_per_row"])
        return difference, stderr
    difference = record.final["quality"] - best.final["quality"]
    return difference, math.hypot(record.final["quality_stderr"], best.final["quality_stderr"])


def front_table(records: list[TrialRecord], front: list[int], quality_metric: str) -> list[dict]:
    """The front with each member's quality against the best."""
    members = [r for r in records if r.trial in front]
    best = max(members, key=lambda r: r.final["quality"], default=None)
    rows = []
    for r in sorted(members, key=lambda r: r.params):
        difference, stderr = versus(r, best, quality_metric)
        rows.append(
            {
                "trial": r.trial,
                "label": r.label,
                "params": r.params,
                "quality": plus_minus(r.final["quality"], r.final["quality_stderr"]),
                "vs best": "best" if r is best else plus_minus(difference, stderr),
                "perplexity": plus_minus(r.final["perplexity"], r.final["perplexity_stderr"], 1),
                "kd_tokens": r.kd_tokens,
                "reference": r.reference,
            }
        )
    return rows


def main(cfg: DictConfig) -> None:
    started = time.perf_counter()
    # 1. Set-up, checked before any compute and built once: teacher, corpus, importance, space, caches
    setup = build_setup(cfg)
    for line in describe(setup):
        print(line)
    update_run(
        setup.run_dir,
        teacher=cfg.teacher,
        teacher_params=param_count(setup.context.teacher.model.config),
        teacher_architecture=Architecture.of(setup.context.teacher.model.config).as_dict(),
        corpus=setup.context.corpus.describe(),
        importance=str(setup.context.importance_path),
        settings=OmegaConf.to_container(cfg, resolve=True),
        budget=setup.budget.describe(setup.context.teacher.model.config),
        hardware=setup.hardware,
        search={"command": setup.command, "plan": describe(setup)},
    )

    # 2. The study, until search.n_trials candidates reached the last rung
    try:
        study = run_study(setup)
    finally:
        # 3. Tables derived from the records, also when interrupted: completed work is kept
        records, front = write_trial_tables(setup.run_dir, list(setup.objectives), setup.budget.latency_ms)
    seconds = time.perf_counter() - started
    add_wall_seconds(setup.run_dir, "search", seconds)

    # 4. What happened, and the front
    print("\ntrials:")
    print("\n".join(summary_lines(study, setup)))
    metric = setup.settings.quality_metric
    meaning = (
        "-held-out KL on the selection rows, 'vs best' paired over them"
        if metric == "heldout_kl"
        else ("the lm-eval summary score")
    )
    print(f"\nPareto front (quality = {meaning}):")
    print(
        format_table(front_table(records, front, metric), FRONT_COLUMNS) if front else "no trial reached the last rung"
    )
    print(
        f"\nrun directory: {Path(setup.run_dir)} (trials.csv, pareto.csv, study.db); search wall time {seconds:.0f} s"
    )
