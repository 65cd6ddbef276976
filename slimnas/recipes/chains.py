"""slimnas chains: does pruning in stages (and correcting the teacher first) beat one cut, as Minitron says?

    slimnas chains preset=chains-cpu run_dir=runs/chains

Four arms reach the same final size (under a cap of `chains.stages[-1]` of the teacher's parameters,
`search.budget.cap=true`, down to `search.budget.window` below it) with the same
distillation tokens in all (`search.budget.kd_tokens` to choose + `retrain.budget_tokens` to retrain,
split evenly among a chain's stages):
  one_shot            the original teacher cut to the final size in one search + retrain
  one_shot_corrected  the same from the corrected teacher (`chains.correct_tokens` of next-token fine-tuning,
                      done once in RUN_DIR/corrected for both corrected arms)
  chain               search + retrain at each of `chains.stages`, each stage's pick the next one's teacher
  chain_corrected     the chain from the corrected teacher
Each arm is a `slimnas pipeline` run in RUN_DIR/ARM (resumable, with its own report). The final
students are compared on the evaluation documents against the ORIGINAL teacher: KL (each arm minus
one_shot, paired by document, 95% interval over documents) and perplexity. Correction tokens are
counted apart: they are spent once per teacher, before any pruning. Results: RUN_DIR/proof/ (shown by
`slimnas report RUN_DIR`).
"""

import time
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf, open_dict

from slimnas.core.errors import SlimnasError
from slimnas.core.files import atomic_write_text, write_json
from slimnas.core.rundir import (
    CORRECTED_DIR,
    REFERENCE,
    add_wall_seconds,
    read_records,
    read_retrained,
    search_pick,
    stage_dirs,
    update_run,
)
from slimnas.core.settings import settings_of
from slimnas.core.stats import mean_ci95
from slimnas.core.tables import plus_minus
from slimnas.recipes import pipeline
from slimnas.recipes.settings import ChainsSettings


def arm_config(cfg: DictConfig, arm: str, settings: ChainsSettings, run_dir: Path) -> DictConfig:
    """One arm as a pipeline configuration: its stages, its share of the KD tokens, its correction."""
    stages = settings.stages if arm.startswith("chain") else settings.stages[-1:]
    arm_cfg = cfg.copy()
    with open_dict(arm_cfg):
        arm_cfg.run_dir = str(run_dir / arm)
        arm_cfg.chain = list(stages) if len(stages) > 1 else []
        arm_cfg.search.budget.params = stages[-1]
        arm_cfg.search.budget.kd_tokens = cfg.search.budget.kd_tokens // len(stages)
        arm_cfg.retrain.budget_tokens = cfg.retrain.budget_tokens // len(stages)
        arm_cfg.correct.budget_tokens = settings.correct_tokens if arm.endswith("corrected") else 0
    return arm_cfg


def share_corrected_teacher(run_dir: Path, arm: str) -> None:
    """The corrected arms share one corrected teacher: the first one's pipeline corrects it, the next keeps it.

    RUN_DIR/corrected is where it lies; each corrected arm's own `corrected` (where its pipeline looks) links
    there, so the correction is spent once, as it would be once per teacher in practice."""
    (run_dir / CORRECTED_DIR).mkdir(parents=True, exist_ok=True)
    link = run_dir / arm / CORRECTED_DIR
    if not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path("..") / CORRECTED_DIR, target_is_directory=True)


def final_student(run_dir: Path, chained: bool) -> dict:
    """The arm's last stage's pick, retrained: its numbers against the original teacher, and the KD it took."""
    stages = stage_dirs(run_dir) if chained else [run_dir]
    spent, record = 0, None
    for stage in stages:
        records = read_records(stage)
        pick = search_pick(stage, records)
        record = next(r for r in read_retrained(stage) if r.trial == pick.trial)
        spent += sum(r.kd_tokens for r in records) + record.kd_tokens
    original = record.heldout_other.get(REFERENCE, record.heldout)  # the original teacher's view
    return {"label": record.label, "params": record.params, "kd_tokens": spent, **original}


def main(cfg: DictConfig) -> None:
    started = time.perf_counter()
    settings: ChainsSettings = settings_of(cfg, "chains")
    if not cfg.search.budget.cap or not cfg.search.budget.kd_tokens:
        raise SlimnasError("the arms compare at equal size and equal KD tokens: set search.budget.cap=true and "
                           "search.budget.kd_tokens (preset=chains-cpu does)")  # fmt: skip
    run_dir = Path(cfg.run_dir)
    print(
        f"chains: {', '.join(settings.arms)} to {settings.stages[-1]:g} of {cfg.teacher}'s parameters (chain "
        f"{' -> '.join(f'{s:g}' for s in settings.stages)}); {cfg.search.budget.kd_tokens:,} KD tokens to choose and "
        f"{cfg.retrain.budget_tokens:,} to retrain per arm, split among a chain's stages"
    )
    results = {}
    for arm in settings.arms:
        print(f"\n==== {arm}")
        if arm.endswith("corrected"):
            share_corrected_teacher(run_dir, arm)
        pipeline.main(arm_config(cfg, arm, settings, run_dir))
        results[arm] = final_student(run_dir / arm, arm.startswith("chain"))

    base = results["one_shot"]["kl_per_doc"]
    rows = []
    for arm, r in results.items():
        differences = [a - b for a, b in zip(r["kl_per_doc"], base, strict=True)]
        difference, half = mean_ci95(differences)
        rows.append(
            {
                "arm": arm,
                "final student": r["label"],
                "params": f"{r['params'] / 1e6:.2f}M",
                "KL to the original (evaluation docs)": plus_minus(r["kl"], r["kl_stderr"]),
                "minus one_shot (95% over documents)": "" if arm == "one_shot" else plus_minus(difference, half),
                "perplexity": plus_minus(r["perplexity"], r["perplexity_stderr"]),
                "KD tokens": f"{r['kd_tokens']:,}",
                "correction tokens": f"{settings.correct_tokens:,}" if arm.endswith("corrected") else "0",
            }
        )
    documents = len(base)
    notes = [
        f"every arm ends under the same cap, {settings.stages[-1]:g} of the original teacher's parameters and at "
        f"least {1 - cfg.search.budget.window:.0%} of it (each chain stage under its own cap); KD tokens = every "
        "stage's search + its pick's retraining",
        f"KL from the original teacher on {documents} evaluation documents (± standard error; the paired column is a "
        "95% t-interval over documents); one seed",
        "the corrected arms also spent the correction tokens (next-token fine-tuning of the teacher, once)",
    ]
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
