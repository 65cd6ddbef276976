"""slimnas pipeline: search -> retrain -> report in one run directory; `make demo` runs it with preset=cpu.

    slimnas pipeline preset=cpu run_dir=runs/demo

The three stages are the three commands, run one after the other on one configuration; rerunning
the same command resumes whichever stage was interrupted.
"""

import time

from omegaconf import DictConfig, OmegaConf

from slimnas.bench.tasks import prepare_suite
from slimnas.compress.runtime.config import settings_of
from slimnas.reports import run_report
from slimnas.search import run_retrain, run_search


def budgets(cfg: DictConfig) -> list[str]:
    search, retrain = cfg.search, cfg.retrain
    rungs = ", ".join(f"{t:,}" for t in search.race.rung_tokens)
    scored = f"{', '.join(cfg.quality.tasks)} ({cfg.quality.limit} documents each)" if cfg.quality.tasks else "no tasks"
    return [
        f"pipeline in {cfg.run_dir}, teacher {cfg.teacher}:",
        f"  1. search: screen, then {search.n_trials} trials to the last rung, KD rungs at {rungs} tokens, "
        f"budget {search.budget.params} of the teacher's parameters ± {search.budget.window}"
        + (f", {search.budget.kd_tokens:,} KD tokens in all" if search.budget.kd_tokens else ""),
        f"  2. retrain: the best {retrain.top_k} of the front"
        + (" and the references" if retrain.references else "")
        + f", {retrain.budget_tokens:,} KD tokens each; scored on {cfg.data.evaluation_docs} evaluation documents"
        f" and {scored} (evaluation pool)",
        f"  3. report: {cfg.run_dir}/report/index.html",
    ]


def main(cfg: DictConfig) -> None:
    started = time.perf_counter()
    # 0. The later stages' own settings, checked before the search spends anything (the search checks its own)
    settings_of(cfg, "retrain")
    quality = settings_of(cfg, "quality")
    if quality.tasks:
        prepare_suite(list(quality.tasks), cfg.data.dir)
    print("\n".join(budgets(cfg)))
    print("\n== 1. search")  # the three stages are the three commands on one configuration
    run_search.main(cfg)
    print("\n== 2. retrain")
    run_retrain.main(cfg)
    print("\n== 3. report")
    run_report.main(OmegaConf.create({"run_dirs": [cfg.run_dir], "out": None, "command": cfg.command}))
    print(f"\npipeline wall time: {time.perf_counter() - started:.0f} s")
