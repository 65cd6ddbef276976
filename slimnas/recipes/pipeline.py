"""slimnas pipeline: [correct ->] search -> retrain [-> next stage] -> report; `make demo` runs it with preset=cpu.

    slimnas pipeline preset=cpu run_dir=runs/demo
    slimnas pipeline preset=cpu correct.budget_tokens=49152 run_dir=runs/corrected     (Minitron's correction)
    slimnas pipeline preset=cpu chain=[0.6,0.4] run_dir=runs/chain                    (prune iteratively)

The stages are the commands, run one after the other on one configuration; rerunning the same command
resumes whichever stage was interrupted (a finished stage is kept: its study, records and checkpoints).
- correct (correct.budget_tokens > 0): the teacher fine-tuned on the KD corpus (RUN_DIR/corrected/model)
  becomes the teacher of everything after it; every student is also scored against the original.
- chain=[f1, f2, ...]: one search + retrain per stage in RUN_DIR/stage_N, the stage's target f_N of the
  original teacher's parameters; the search's pick of stage N, retrained, is stage N+1's teacher (its
  importance, logit cache and screen recomputed for it: the caches are keyed by the teacher's weights).
  The pick is chosen on selection documents, as in any search; the evaluation documents only report.
"""

import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from slimnas.bench.tasks import prepare_suite
from slimnas.compress.arch import param_count
from slimnas.compress.corpus import resolve_corpus
from slimnas.compress.models import load_model, local_fingerprint
from slimnas.config import check_chain
from slimnas.core.data import find_data_dir
from slimnas.core.errors import SlimnasError
from slimnas.core.files import hash_file, hash_json
from slimnas.core.rundir import (
    CORRECTED_DIR,
    RUN_FILE,
    add_wall_seconds,
    read_run,
    stage_dir,
    stage_dirs,
    update_run,
)
from slimnas.core.settings import settings_of
from slimnas.recipes import correct as run_correct
from slimnas.recipes import report as run_report
from slimnas.recipes import retrain as run_retrain
from slimnas.recipes import search as run_search
from slimnas.reports.chain import retrained_pick, write_chain, write_correction
from slimnas.search.constraints import Budget


def budgets(cfg: DictConfig, chain: list[float]) -> list[str]:
    search, retrain, correct = cfg.search, cfg.retrain, cfg.correct
    rungs = ", ".join(f"{t:,}" for t in search.race.rung_tokens)
    scored = f"{', '.join(cfg.quality.tasks)} ({cfg.quality.limit} documents each)" if cfg.quality.tasks else "no tasks"
    targets = (
        f"stages at {', '.join(f'{f:g}' for f in chain)} of the teacher's parameters"
        if chain
        else f"budget {search.budget.params} of the teacher's parameters {Budget(**search.budget).window_text()}"
    )
    lines = [f"pipeline in {cfg.run_dir}, teacher {cfg.teacher}:"]
    if correct.budget_tokens:
        lines.append(f"  0. correct: the teacher fine-tuned on the KD corpus for {correct.budget_tokens:,} tokens")
    lines += [
        f"  1. search: screen, then {search.n_trials} trials to the last rung, KD rungs at {rungs} tokens, {targets}"
        + (f", {search.budget.kd_tokens:,} KD tokens in all" if search.budget.kd_tokens else ""),
        f"  2. retrain: the best {retrain.top_k} of the front"
        + (" and the references" if retrain.references else "")
        + f", {retrain.budget_tokens:,} KD tokens each; scored on {cfg.data.evaluation_docs} evaluation documents"
        f" and {scored} (evaluation pool)",
        f"  3. report: {cfg.run_dir}/report/index.html",
    ]
    return lines


def stage_config(cfg: DictConfig, run_dir: Path, teacher: str, original: str, params: int | None) -> DictConfig:
    """One stage's configuration: its run directory, its teacher, its target, the original as reference."""
    stage = cfg.copy()
    with open_dict(stage):
        stage.run_dir, stage.teacher = str(run_dir), teacher
        if teacher != original:
            stage.retrain.reference_teacher = original
        if params is not None:  # a count: the fraction is of the original teacher, not of this stage's
            stage.search.budget.params = params
            stage.search.study_name = f"{cfg.search.study_name}-{run_dir.name}"  # one storage may hold every stage
    return stage


def search_and_retrain(cfg: DictConfig) -> None:
    run_search.main(cfg)
    print(f"\n== retrain ({cfg.run_dir})")
    run_retrain.main(cfg)


def finished_key(cfg: DictConfig) -> str | None:
    """What a finished pipeline's results depend on: every setting, the teacher's files and the corpus file. None for
    a hub teacher (its weights are known only once loaded): such a run is resumed stage by stage, as any other."""
    teacher = local_fingerprint(cfg.teacher)
    if teacher is None:
        return None
    settings = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in ("command", "launcher")}
    corpus = Path(resolve_corpus(cfg.data.corpus, find_data_dir(cfg.data.dir)))
    return hash_json([settings, teacher, hash_file(corpus) if corpus.is_file() else str(corpus)])


def report(cfg: DictConfig, report_dirs: list[Path]) -> None:
    print("\n== report")
    out = str(Path(cfg.run_dir) / "report")
    run_report.main(OmegaConf.create({"run_dirs": [str(d) for d in report_dirs], "out": out, "command": cfg.command}))


def main(cfg: DictConfig) -> None:
    started = time.perf_counter()
    # 0. The later stages' own settings, checked before the first stage spends anything
    retrain = settings_of(cfg, "retrain")
    correct = settings_of(cfg, "correct")
    chain = check_chain(cfg.chain)
    if chain and retrain.top_k < 1:
        raise SlimnasError("a chain's next stage is taught by this stage's pick, retrained: set retrain.top_k >= 1 "
                           "(retrain.top_k=0 retrains only the references)")  # fmt: skip
    quality = settings_of(cfg, "quality")
    if quality.tasks:
        prepare_suite(list(quality.tasks), cfg.data.dir)
    run_dir, original = Path(cfg.run_dir), cfg.teacher
    print("\n".join(budgets(cfg, chain)))
    key = finished_key(cfg)
    if (
        key is not None
        and (run_dir / RUN_FILE).is_file()
        and read_run(run_dir).get("pipeline", {}).get("finished") == key
    ):
        print(f"\nfinished before with these settings, teacher and corpus: kept ({run_dir})")
        report(cfg, [run_dir, *stage_dirs(run_dir)] if chain else [run_dir])
        return

    teacher = original
    if correct.budget_tokens:
        print("\n== 0. correct")
        correct_cfg = cfg.copy()
        with open_dict(correct_cfg):
            correct_cfg.out = str(run_dir / CORRECTED_DIR)
        teacher = str(run_correct.main(correct_cfg))

    if not chain:
        print("\n== 1. search")
        stage = stage_config(cfg, run_dir, teacher, original, None)
        search_and_retrain(stage)
        if teacher != original:
            write_correction(run_dir, [run_dir])
        report_dirs = [run_dir]
    else:
        original_params = param_count(load_model(original).model.config)
        stages = []
        for number, fraction in enumerate(chain, 1):
            stage = stage_dir(run_dir, number)
            print(f"\n== stage {number}: {fraction:g} of {original}'s parameters, teacher {teacher}")
            search_and_retrain(stage_config(cfg, stage, teacher, original, int(fraction * original_params)))
            teacher = str(retrained_pick(stage).model_dir)
            stages.append(stage)
        update_run(run_dir, kind="chain", teacher=original, chain=chain, stages=[str(d) for d in stages],
                   settings=OmegaConf.to_container(cfg, resolve=True))  # fmt: skip
        if correct.budget_tokens:
            write_correction(run_dir, stages)
        write_chain(run_dir, stages, original_params)
        report_dirs = [run_dir, *stages]

    report(cfg, report_dirs)
    update_run(run_dir, pipeline={"finished": key})
    if chain:
        add_wall_seconds(run_dir, "pipeline (runs that finished)", time.perf_counter() - started)
    print(f"\npipeline wall time: {time.perf_counter() - started:.0f} s")
