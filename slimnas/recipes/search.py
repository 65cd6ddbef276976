"""slimnas search: an Optuna study over pruned architectures of the teacher, under a budget.

    slimnas search preset=cpu run_dir=runs/demo

Candidates are screened by held-out KL right after pruning; the best go first, then the sampler
proposes more. Each trial distils its candidate in rungs and the race stops it once a peer is better
on the same documents with confidence; the two leaders get more KD while they cannot be told apart.
The Pareto front of quality against size (and speed, when asked for) is printed at the end. Running
the same command again resumes the study; several processes on one study share the work.
"""

import time
from pathlib import Path

import optuna
from omegaconf import DictConfig, OmegaConf

from slimnas.compress.arch import Architecture, param_count
from slimnas.core.launch import check_storage, launch, launcher_of, wants_workers
from slimnas.core.rundir import TrialRecord, add_wall_seconds, search_pick, update_run
from slimnas.core.settings import settings_of
from slimnas.core.stats import paired_difference
from slimnas.core.tables import format_table, plus_minus
from slimnas.search.front import write_trial_tables
from slimnas.search.setup import build_setup
from slimnas.search.study import describe, run_study, summary_lines

FRONT_COLUMNS = ["trial", "label", "params", "quality", "KL vs best", "perplexity", "kd_tokens", "reference"]


def front_table(records: list[TrialRecord], front: list[int]) -> list[dict]:
    """The front with each member's held-out KL minus the best's, paired over the selection documents."""
    members = [r for r in records if r.trial in front]
    best = max(members, key=lambda r: r.final["quality"], default=None)
    rows = []
    for r in sorted(members, key=lambda r: r.params):
        difference, stderr = paired_difference(r.final["kl_per_doc"], best.final["kl_per_doc"])
        rows.append(
            {
                "trial": r.trial,
                "label": r.label,
                "params": r.params,
                "quality": plus_minus(r.final["quality"], r.final["quality_stderr"]),
                "KL vs best": "best" if r is best else plus_minus(difference, stderr),
                "perplexity": plus_minus(r.final["perplexity"], r.final["perplexity_stderr"]),
                "kd_tokens": r.kd_tokens,
                "reference": r.reference,
            }
        )
    return rows


def worker(cfg: DictConfig) -> None:
    """One of the workers a Hydra launcher started (search.launch): the same search, joining the same study."""
    main(cfg)


def main(cfg: DictConfig) -> None:
    if wants_workers(cfg):  # N workers through a Hydra launcher, each running this function with workers=1
        settings_of(cfg, "search")  # bad settings fail here, once, before any worker starts
        check_storage(cfg, launcher_of(list(cfg.get("launcher", []))))
        launch(cfg, worker, f"++worker=range({cfg.search.workers})", cfg.search.workers, "search workers")
        return
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
        budget=setup.settings.budget.describe(setup.context.teacher.model.config),
        hardware=setup.hardware,
        search={"command": setup.command, "plan": describe(setup)},
    )

    # 2. The study: screen, trials until search.n_trials reached the last rung, the leaders' race
    try:
        study = run_study(setup)
    finally:
        # 3. The front (computed once) and the tables, also when interrupted: completed work is kept
        study = optuna.load_study(study_name=setup.settings.study_name, storage=setup.storage)
        records, front = write_trial_tables(setup.run_dir, study, list(setup.objectives))
    seconds = time.perf_counter() - started
    add_wall_seconds(setup.run_dir, "search", seconds)

    # 4. What happened, and the front
    print("\ntrials:")
    print("\n".join(summary_lines(study, setup)))
    meaning = (
        "-held-out KL" if setup.settings.quality_metric == "heldout_kl" else "the lm-eval summary (selection pool)"
    )
    print(f"\nPareto front (quality = {meaning}; KL on the selection documents, 'KL vs best' paired over them):")
    print(format_table(front_table(records, front), FRONT_COLUMNS) if front else "no trial reached the last rung")
    if (pick := search_pick(setup.run_dir, records)) is not None:
        print(f"the search's pick: trial {pick.trial} ({pick.label}, {pick.params:,} params)")
    print(f"\nrun directory: {Path(setup.run_dir)} (trials.csv, pareto.csv, front.json, study.db); "
          f"search wall time {seconds:.0f} s")  # fmt: skip
