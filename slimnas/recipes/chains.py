"""slimnas chains: does pruning in stages (and correcting the teacher first) beat one cut, as Minitron says?

    slimnas chains preset=chains-cpu run_dir=runs/chains

Four arms reach the same final size (under a cap of `chains.stages[-1]` of the teacher's parameters,
`search.budget.cap=true`, down to `search.budget.window` below it) with the same
distillation tokens in all (`search.budget.kd_tokens` to choose + `retrain.budget_tokens` to retrain,
split evenly among a chain's stages):
  one_shot            the original teacher cut to the final size in one search + retrain
  one_shot_corrected  the same from the corrected teacher (`chains.correct_tokens` of next-token fine-tuning,
                      done once in RUN_DIR/corrected for both corrected arms and every seed)
  chain               search + retrain at each of `chains.stages`, each stage's pick the next one's teacher
  chain_corrected     the chain from the corrected teacher
Every arm runs once per seed of `chains.seeds` (the sampler's seed and the KD row order), as a `slimnas
pipeline` run in RUN_DIR/seed_S/ARM (resumable, with its own report; with one `search.storage.url`, a study
of its own: `search.study_name`-seed_S-ARM). A small search's pick moves with its seed, so the final
students are compared on the evaluation documents against the ORIGINAL teacher over seeds: KL and
perplexity (mean and 95% interval over seeds), each arm minus one_shot paired by seed and by document
(reports/verdicts.py: significant only outside both intervals), and how many seeds ended with the same
student. Correction tokens are counted apart: they are spent once per teacher, before any pruning.
Results: RUN_DIR/proof/ (shown by `slimnas report RUN_DIR`).
"""

import os
import statistics
import time
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf, open_dict

from slimnas.core.errors import SlimnasError
from slimnas.core.files import atomic_write_text, write_json
from slimnas.core.rundir import CORRECTED_DIR, REFERENCE, add_wall_seconds, read_records, stage_dirs, update_run
from slimnas.core.settings import settings_of
from slimnas.core.stats import mean_ci95
from slimnas.core.tables import plus_minus
from slimnas.recipes import pipeline
from slimnas.recipes.settings import ChainsSettings
from slimnas.reports.chain import retrained_pick
from slimnas.reports.verdicts import paired, pick_stability


def arm_dir(run_dir: Path, seed: int, arm: str) -> Path:
    return run_dir / f"seed_{seed}" / arm


def arm_config(cfg: DictConfig, arm: str, seed: int, settings: ChainsSettings, run_dir: Path) -> DictConfig:
    """One arm at one seed as a pipeline configuration: its run directory, its seed, its stages, its share of the KD
    tokens, its correction, and in a shared storage a study name of its own (the pipeline adds each stage's)."""
    stages = settings.stages if arm.startswith("chain") else settings.stages[-1:]
    arm_cfg = cfg.copy()
    with open_dict(arm_cfg):
        arm_cfg.run_dir = str(arm_dir(run_dir, seed, arm))
        arm_cfg.search.seed, arm_cfg.distill.seed = seed, seed
        if cfg.search.storage.url:  # in SQLite each run directory has its own file
            arm_cfg.search.study_name = f"{cfg.search.study_name}-seed_{seed}-{arm}"
        arm_cfg.chain = list(stages) if len(stages) > 1 else []
        arm_cfg.search.budget.params = stages[-1]
        arm_cfg.search.budget.kd_tokens = cfg.search.budget.kd_tokens // len(stages)
        arm_cfg.retrain.budget_tokens = cfg.retrain.budget_tokens // len(stages)
        arm_cfg.correct.budget_tokens = settings.correct_tokens if arm.endswith("corrected") else 0
    return arm_cfg


def share_corrected_teacher(run_dir: Path, arm_run_dir: Path) -> None:
    """The corrected arms share one corrected teacher: the first one's pipeline corrects it, the next keeps it.

    RUN_DIR/corrected is where it lies; each corrected arm's own `corrected` (where its pipeline looks) links
    there, so the correction is spent once for every arm and seed, as it would be once per teacher in practice."""
    (run_dir / CORRECTED_DIR).mkdir(parents=True, exist_ok=True)
    link = arm_run_dir / CORRECTED_DIR
    if not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(run_dir / CORRECTED_DIR, arm_run_dir), target_is_directory=True)


def final_student(run_dir: Path, chained: bool) -> dict:
    """The arm's last stage's pick, retrained: its numbers against the original teacher, the KD it took, and every
    stage's pick (`finalist`: two seeds ended with the same student only when every stage picked alike)."""
    picks, spent = [], 0
    for stage in stage_dirs(run_dir) if chained else [run_dir]:
        record = retrained_pick(stage)
        picks.append(record.label)
        spent += sum(r.kd_tokens for r in read_records(stage)) + record.kd_tokens
    original = record.heldout_other.get(REFERENCE, record.heldout)  # the original teacher's view
    return {"label": record.label, "finalist": " -> ".join(picks), "params": record.params, "kd_tokens": spent,
            **original}  # fmt: skip


def arm_row(arm: str, per_seed: dict[int, dict], one_shot: dict[int, dict], seeds: list[int], correction: int) -> dict:
    """One arm over the seeds: its final student and how stable it was, KL and perplexity (mean ± 95% over seeds),
    and its KL minus one_shot's, paired by seed and by document."""
    runs = [per_seed[s] for s in seeds]
    stability = pick_stability([r["finalist"] for r in runs], [r["kl"] for r in runs])
    label = next(r["label"] for r in runs if r["finalist"] == stability.finalist)
    params = [r["params"] for r in runs]
    row = {
        "arm": arm,
        "final student (most seeds)": label,
        "same final student (seeds)": stability.text(),
        "params (seeds)": " - ".join(f"{p / 1e6:.2f}M" for p in sorted({min(params), max(params)})),
        "KL to the original (95% over seeds)": plus_minus(*mean_ci95([r["kl"] for r in runs])),
        "KL spread (seeds)": f"{stability.kl_spread:.3f}",
        "minus one_shot (95% over seeds)": "",
        "minus one_shot (95% over documents)": "",
        "significant": "",
        "seeds where one_shot is better": "",
        "perplexity (95% over seeds)": plus_minus(*mean_ci95([r["perplexity"] for r in runs])),
        "KD tokens": f"{statistics.fmean(r['kd_tokens'] for r in runs):,.0f}",
        "correction tokens": f"{correction:,}" if arm.endswith("corrected") else "0",
    }
    if arm != "one_shot":
        base = [one_shot[s] for s in seeds]
        difference = paired([r["kl"] for r in runs], [r["kl"] for r in base], [r["kl_per_doc"] for r in runs],
                            [r["kl_per_doc"] for r in base])  # fmt: skip
        row |= {
            "minus one_shot (95% over seeds)": plus_minus(difference.difference, difference.ci95_seeds),
            "minus one_shot (95% over documents)": plus_minus(difference.difference, difference.ci95_documents),
            "significant": "yes" if difference.significant else "no",
            "seeds where one_shot is better": f"{difference.reference_better} of {len(seeds)}",
        }
    return row


def main(cfg: DictConfig) -> None:
    started = time.perf_counter()
    settings: ChainsSettings = settings_of(cfg, "chains")
    if not cfg.search.budget.cap or not cfg.search.budget.kd_tokens:
        raise SlimnasError("the arms compare at equal size and equal KD tokens: set search.budget.cap=true and "
                           "search.budget.kd_tokens (preset=chains-cpu does)")  # fmt: skip
    if settings_of(cfg, "retrain").top_k < 1:
        raise SlimnasError("the arms compare their picks, retrained: set retrain.top_k >= 1 (retrain.top_k=0 "
                           "retrains only the references)")  # fmt: skip
    run_dir, seeds = Path(cfg.run_dir), list(settings.seeds)
    print(
        f"chains: {', '.join(settings.arms)} to {settings.stages[-1]:g} of {cfg.teacher}'s parameters (chain "
        f"{' -> '.join(f'{s:g}' for s in settings.stages)}); seeds {seeds}; {cfg.search.budget.kd_tokens:,} KD "
        f"tokens to choose and {cfg.retrain.budget_tokens:,} to retrain per arm, split among a chain's stages"
    )
    results: dict[str, dict[int, dict]] = {arm: {} for arm in settings.arms}
    for seed in seeds:
        for arm in settings.arms:
            print(f"\n==== seed {seed}, {arm}")
            if arm.endswith("corrected"):
                share_corrected_teacher(run_dir, arm_dir(run_dir, seed, arm))
            pipeline.main(arm_config(cfg, arm, seed, settings, run_dir))
            results[arm][seed] = final_student(arm_dir(run_dir, seed, arm), arm.startswith("chain"))

    rows = [arm_row(arm, results[arm], results["one_shot"], seeds, settings.correct_tokens) for arm in results]
    documents = len(results["one_shot"][seeds[0]]["kl_per_doc"])
    notes = [
        f"every arm ends under the same cap, {settings.stages[-1]:g} of the original teacher's parameters and at "
        f"least {1 - cfg.search.budget.window:.0%} of it (each chain stage under its own cap); KD tokens = every "
        "stage's search + its pick's retraining (mean over seeds)",
        f"seeds {seeds} (each arm's sampler and KD row order); KL from the original teacher on {documents} evaluation "
        "documents; minus one_shot is paired by seed (95% interval over seeds) and by document (each document's "
        "difference averaged over the seeds, 95% interval over documents), and significant only outside both",
        "same final student: how many seeds ended with the student shown (a chain's: the same pick at every stage); "
        "KL spread: the largest minus the smallest KL of the arm's final students over the seeds",
        "the corrected arms also spent the correction tokens (next-token fine-tuning of the teacher, once for every "
        "arm and seed)",
    ]
    if len(seeds) == 1:
        notes.insert(2, "one seed: no interval over seeds, so no difference is called significant (chains.seeds)")
    proof_dir = run_dir / "proof"
    table = {"title": "Chain vs one shot, with and without teacher correction", "columns": list(rows[0]),
             "rows": rows, "notes": notes}  # fmt: skip
    write_json(proof_dir / "proof.json", table)
    write_json(proof_dir / "arms.json", results)
    text = "\n".join([pd.DataFrame(rows).to_markdown(index=False), "", *(f"- {n}" for n in notes)])
    atomic_write_text(proof_dir / "proof.md", text + "\n")
    update_run(run_dir, kind="baselines", teacher=cfg.teacher, settings=OmegaConf.to_container(cfg, resolve=True))
    add_wall_seconds(run_dir, "chains (runs that finished)", time.perf_counter() - started)
    print(text)
    print(f"written to {proof_dir}; wall time {time.perf_counter() - started:.0f} s")
