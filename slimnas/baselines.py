"""slimnas baselines: does the search find better pruned models than simple choices? (the proof benchmark)

    slimnas baselines preset=baselines-cpu run_dir=runs/baselines

For one teacher and one parameter budget, each method picks one finalist; every finalist is then
retrained with the same KD tokens, rows, schedule and seed and scored on text no method saw, so the
table compares the choices alone:
  search      the search as users run it (default sampler, multi-fidelity), its best by selection quality
  random      random search, same trials and the same KD tokens per trial
  zero_shot   the best feasible candidate by selection KL right after pruning (NVIDIA ModelOpt's pick)
  uniform     one ratio on every dimension (when the space can express one)
  depth_only  the teacher's width, one contiguous block of layers dropped
  width_only  the teacher's depth, narrower hidden / FFN / heads (Minitron's choice for models <= 15B)
The whole comparison repeats per seed (the sampler's seed and the KD row order); per method the
table gives the mean and a 95% t-interval over seeds, and each method is compared with the search
seed by seed (paired). Results go to RUN_DIR/proof/: proof.md and proof.json (the tables as shown;
`slimnas report RUN_DIR` shows them), methods.* and paired.* (the numbers), per_seed.json, proof.png.
"""

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from slimnas.bench.quality import QualitySettings
from slimnas.bench.tasks import prepare_suite
from slimnas.compress.arch import Architecture, param_count
from slimnas.compress.corpus import DataSettings
from slimnas.compress.distill import DistillSettings
from slimnas.compress.heldout import HeldoutSet
from slimnas.compress.prune import PrunePolicy
from slimnas.compress.runtime.config import settings_from
from slimnas.compress.runtime.data import find_data_dir
from slimnas.compress.runtime.errors import SlimnasError
from slimnas.compress.runtime.files import atomic_write_text, write_json
from slimnas.compress.runtime.stats import mean_ci95
from slimnas.compress.runtime.tables import plus_minus, save_records
from slimnas.search.records import COMPLETE, RetrainRecord, add_wall_seconds, update_run
from slimnas.search.references import find_reference
from slimnas.search.retraining import Candidate, RetrainSettings, prepare_retraining, retrain, score_teacher
from slimnas.search.setup import build_setup
from slimnas.search.study import run_study
from slimnas.search.tables import write_trial_tables

METHODS = ("search", "random", "zero_shot", "uniform", "depth_only", "width_only")


@dataclass(frozen=True)
class BaselineSettings:
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = METHODS
    heldout_text: str | None = "wikitext2/wiki.valid.tokens"  # under data.dir: text no method trained on or chose by
    heldout_text_rows: int = 32

    def __post_init__(self):
        if len(self.seeds) < 2:
            raise SlimnasError("baselines.seeds needs at least two seeds for a confidence interval")
        unknown = set(self.methods) - set(METHODS)
        if unknown or "search" not in self.methods:
            raise SlimnasError(f"baselines.methods must include search and come from {', '.join(METHODS)}")


def text_rows(path: Path, tokenizer, seq_len: int, n_rows: int) -> torch.Tensor:
    ids = tokenizer(path.read_text(), add_special_tokens=False)["input_ids"][: n_rows * seq_len]
    if len(ids) < n_rows * seq_len:
        raise SlimnasError(f"{path} holds fewer than {n_rows} rows of {seq_len} tokens")
    return torch.tensor(ids).view(n_rows, seq_len)


def seeded(cfg: DictConfig, run_dir: Path, seed: int, sampler: str) -> DictConfig:
    """One search of the comparison: its own run directory, the seed for sampler and KD order, no references."""
    run_cfg = cfg.copy()
    with open_dict(run_cfg):
        run_cfg.run_dir, run_cfg.search.seed, run_cfg.distill.seed = str(run_dir), seed, seed
        run_cfg.search.references.kinds = []
        run_cfg.search.sampler = sampler
    return run_cfg


def search_sampler(configured: str) -> str:
    """The search as users run it; auto and enumerate would evaluate every candidate of a small space, so the
    comparison pins TPE there: the search and random search then get the same number of trials."""
    return "tpe" if configured in ("auto", "enumerate") else configured


def search_best(cfg: DictConfig, run_dir: Path, seed: int, sampler: str) -> tuple[Architecture, dict]:
    """Run (or resume) one search; its best trial by selection quality, and what it cost."""
    run_cfg = seeded(cfg, run_dir, seed, sampler)
    setup = build_setup(run_cfg)
    update_run(run_dir, settings=OmegaConf.to_container(run_cfg, resolve=True), command=cfg.command)
    run_study(setup)
    records, _ = write_trial_tables(run_dir, list(setup.objectives), setup.budget.latency_ms)
    complete = [r for r in records if r.state == COMPLETE]
    if not complete:
        raise SlimnasError(f"the search in {run_dir} completed no trial")
    best = max(complete, key=lambda r: r.final["quality"])
    # what every trial spent, from the records: a resumed search counts what its earlier runs did
    cost = {"search_kd_tokens": sum(r.kd_tokens for r in records), "search_seconds": sum(r.seconds for r in records)}
    return Architecture(**best.architecture), cost


METRICS = {  # what the table reports per finalist: name -> how to read it from a retrain record
    "kl": lambda r: r.heldout["kl"],
    "perplexity": lambda r: r.heldout["perplexity"],
    "text_perplexity": lambda r: next(iter(r.heldout_other.values()))["perplexity"] if r.heldout_other else None,
    "text_kl": lambda r: next(iter(r.heldout_other.values()))["kl"] if r.heldout_other else None,
    "summary": lambda r: r.summary,
    "summary_stderr": lambda r: r.summary_stderr,
}


def summarise(results: dict[str, dict[int, dict]], seeds: list[int]) -> tuple[list[dict], list[dict]]:
    """Per method mean ± 95% CI over seeds, and each method minus the search, paired by seed."""
    rows, paired = [], []
    for method, per_seed in results.items():
        row = {"method": method, "seeds": len(per_seed), "label": per_seed[seeds[0]]["label"]}
        for metric in (*METRICS, "params", "kd_tokens", "search_kd_tokens", "seconds"):
            values = [per_seed[s][metric] for s in seeds if per_seed[s].get(metric) is not None]
            if len(values) == len(seeds):
                row[metric], row[f"{metric}_ci95"] = mean_ci95(values)
        rows.append(row)
        if method == "search":
            continue
        for metric in ("kl", "text_perplexity", "summary"):
            differences = [
                results[method][s][metric] - results["search"][s][metric]
                for s in seeds
                if results[method][s].get(metric) is not None and results["search"][s].get(metric) is not None
            ]
            if len(differences) == len(seeds):
                difference, half_width = mean_ci95(differences)
                paired.append(
                    {"method": method, "metric": metric, "minus_search": difference, "ci95": half_width,
                     "significant": abs(difference) > half_width}
                )  # fmt: skip
    rows.sort(key=lambda row: row.get("kl", math.inf))
    return rows, paired


def plot(rows: list[dict], results: dict[str, dict[int, dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("kl", "KL to the teacher (evaluation rows)"), ("text_perplexity", "perplexity on unseen text")]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    methods = [row["method"] for row in rows]
    for axis, (metric, title) in zip(axes, panels, strict=True):
        for x, method in enumerate(methods):
            row = next(r for r in rows if r["method"] == method)
            if metric not in row:
                continue
            axis.errorbar(x, row[metric], yerr=row[f"{metric}_ci95"], fmt="o", capsize=6, color="tab:blue")
            values = [v[metric] for v in results[method].values() if v.get(metric) is not None]
            axis.scatter([x + 0.12] * len(values), values, s=12, color="tab:gray", label="seeds" if x == 0 else None)
        axis.set_xticks(range(len(methods)), methods, rotation=20)
        axis.set_title(f"{title}: mean ± 95% CI over seeds")
        axis.grid(alpha=0.3)
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path.with_suffix(".png"), dpi=110)
    figure.savefig(path.with_suffix(".svg"))
    plt.close(figure)


def main(cfg: DictConfig) -> None:
    started = time.perf_counter()
    # 1. Settings, task files and the unseen text, checked before any compute
    run_dir = Path(cfg.run_dir)
    settings = settings_from(BaselineSettings, cfg.baselines, "baselines")
    data = settings_from(DataSettings, cfg.data, "data")
    distill = settings_from(DistillSettings, cfg.distill, "distill", precision=cfg.precision)
    quality = settings_from(QualitySettings, cfg.quality, "quality")
    retrain_settings = RetrainSettings(budget_tokens=cfg.retrain.budget_tokens, prompts=())  # no continuations
    policy = settings_from(PrunePolicy, cfg.pruning, "pruning")
    suite = prepare_suite(list(quality.tasks), data.dir) if quality.tasks else None
    text_path = None
    if settings.heldout_text:
        data_dir = find_data_dir(data.dir)
        text_path = (data_dir / settings.heldout_text) if data_dir else None
        if text_path is None or not text_path.is_file():
            raise SlimnasError(f"baselines.heldout_text {settings.heldout_text} not found under data.dir ({data_dir})")
    seeds = list(settings.seeds)
    samplers = {"search": search_sampler(cfg.search.sampler), "random": "random"}
    print(
        f"baselines: {', '.join(settings.methods)} at {cfg.search.budget.params} ± {cfg.search.budget.window} of the "
        f"teacher's parameters; seeds {seeds}; searches of {cfg.search.n_trials} trials (rungs "
        f"{list(cfg.search.fidelity.rung_tokens)}, sampler {samplers['search']}); every finalist retrained with "
        f"{retrain_settings.budget_tokens:,} KD tokens"
    )

    # 2. The fixed baselines, from the first search's set-up (its feasible set; the zero-shot screen sees all of it)
    screen_all = seeded(cfg, run_dir / f"seed_{seeds[0]}" / "search", seeds[0], samplers["search"])
    with open_dict(screen_all):
        screen_all.search.references.zero_shot_candidates = 10**9
    first_setup = build_setup(screen_all)
    context, teacher_config = first_setup.context, first_setup.context.teacher.model.config
    fixed: dict[str, tuple[Architecture, PrunePolicy, dict]] = {}
    notes = []
    for method in [m for m in settings.methods if m not in samplers]:
        reference, note = find_reference(method, first_setup)
        notes.append(note)
        print(f"{method}: {note}")
        if reference is not None:
            method_policy = replace(policy, depth_strategy=reference.depth_strategy or policy.depth_strategy)
            cost = {"search_kd_tokens": 0, "search_seconds": reference.seconds}
            fixed[method] = (reference.arch, method_policy, cost)

    # 3. Per seed: the two searches, then every finalist retrained alike and scored on unseen text
    heldout_text = ()
    if text_path is not None:
        rows = text_rows(text_path, context.teacher.tokenizer, data.seq_len, settings.heldout_text_rows)
        heldout_text = (HeldoutSet(text_path.stem, rows, context.teacher.model, cfg.precision),)
    methods = [m for m in settings.methods if m in samplers or m in fixed]
    results: dict[str, dict[int, dict]] = {method: {} for method in methods}
    teacher = None
    for seed in seeds:
        chosen = dict(fixed)
        for method in [m for m in settings.methods if m in samplers]:
            arch, cost = search_best(cfg, run_dir / f"seed_{seed}" / method, seed, samplers[method])
            chosen[method] = (arch, policy, cost)
        retraining = prepare_retraining(
            context, cfg.teacher, replace(distill, seed=seed), retrain_settings, quality, suite, speed=None,
            log_to=run_dir / "log.txt", command=cfg.command, other_heldout=heldout_text,
        )  # fmt: skip
        teacher = teacher or score_teacher(retraining, run_dir / "teacher")  # the scale every row is read against
        picks = {}
        for method, (arch, method_policy, cost) in chosen.items():
            name = f"{arch.label()}-{method_policy.depth_strategy}"
            out = run_dir / f"seed_{seed}" / "finalists" / name
            print(f"seed {seed}, {method}: {arch.label()} ({param_count(teacher_config, arch):,} params)")
            record = retrain(retraining, Candidate(name, arch, method_policy), out, teacher)
            results[method][seed] = _result(record, cost)
            picks[method] = {"finalist": name, **cost}
        write_json(run_dir / f"seed_{seed}" / "methods.json", picks)  # methods that chose alike share a finalist

    # 4. The table: mean and 95% CI per method, each method against the search paired by seed; and a plot
    rows, paired = summarise(results, seeds)
    proof_dir = run_dir / "proof"
    notes += [
        f"seeds {seeds}: the sampler's seed and the KD row order; every finalist retrained with "
        f"{cfg.retrain.budget_tokens:,} KD tokens; kl on {data.evaluation_rows} evaluation rows of "
        f"{context.corpus.source}; text_perplexity on {settings.heldout_text_rows} rows of {settings.heldout_text}",
        f"the teacher: kl 0, perplexity on unseen text {METRICS['text_perplexity'](teacher) or float('nan'):.2f}, "
        f"lm-eval summary {plus_minus(teacher.summary, teacher.summary_stderr)}",
        "a paired difference is significant when its 95% interval over seeds excludes zero",
        "wall s: the method's own cost from the records (its search's trials or the zero-shot screen, plus the "
        "finalist's retraining; a resumed run counts what its earlier runs did, but a trial lost with a killed "
        "worker counts 0 s)",
    ]
    summary_errors = [row["summary_stderr"] for row in rows if "summary_stderr" in row]
    if summary_errors:
        typical = sum(summary_errors) / len(summary_errors)
        notes.append(
            f"lm-eval: one finalist's summary score has a standard error of about {typical:.3f} ({quality.limit} "
            "documents per task), so a single seed cannot separate gaps smaller than about twice that"
        )
    table, pairs = display_tables(rows, paired)
    write_json(proof_dir / "proof.json", {"columns": list(table[0]), "rows": table,
                                         "paired_columns": list(pairs[0]) if pairs else [], "paired": pairs,
                                         "notes": notes})  # fmt: skip
    save_records(rows, proof_dir / "methods")
    save_records(paired, proof_dir / "paired")
    write_json(proof_dir / "per_seed.json", results)
    atomic_write_text(proof_dir / "proof.md", _markdown(table, pairs, notes))
    plot(rows, results, proof_dir / "proof")
    update_run(run_dir, kind="baselines", teacher=cfg.teacher, settings=OmegaConf.to_container(cfg, resolve=True))
    add_wall_seconds(run_dir, "baselines (runs that finished)", time.perf_counter() - started)
    print(_markdown(table, pairs, notes))
    print(f"written to {proof_dir} (proof.md, proof.json, methods.csv, paired.csv, per_seed.json, proof.png); "
          f"wall time {time.perf_counter() - started:.0f} s")  # fmt: skip


def _result(record: RetrainRecord, cost: dict) -> dict:
    values = {metric: read(record) for metric, read in METRICS.items()}
    seconds = cost["search_seconds"] + sum(record.seconds.values())
    return {"label": record.label, "params": record.params, "kd_tokens": record.kd_tokens, **cost,
            "seconds": seconds, **values}  # fmt: skip


def display_tables(rows: list[dict], paired: list[dict]) -> tuple[list[dict], list[dict]]:
    """The two tables as people read them (± intervals, rounded): proof.md, proof.json and the report show these."""
    table = [
        {
            "method": r["method"],
            "finalist (first seed)": r["label"],
            "params": f"{r['params'] / 1e6:.1f}M",
            "KL (eval rows)": plus_minus(r.get("kl"), r.get("kl_ci95")),
            "perplexity (unseen text)": plus_minus(r.get("text_perplexity"), r.get("text_perplexity_ci95"), 1),
            "lm-eval summary": plus_minus(r.get("summary"), r.get("summary_ci95")),
            "search KD tokens": f"{r['search_kd_tokens']:,.0f}",
            "wall s": f"{r['seconds']:.0f}",
        }
        for r in rows
    ]
    pairs = [
        {"method": p["method"], "metric": p["metric"],
         "minus search": plus_minus(p["minus_search"], p["ci95"], 1 if "perplexity" in p["metric"] else 3),
         "significant": "yes" if p["significant"] else "no"}
        for p in paired
    ]  # fmt: skip
    return table, pairs


def _markdown(table: list[dict], pairs: list[dict], notes: list[str]) -> str:
    parts = [pd.DataFrame(table).to_markdown(index=False), "", "Each method minus the search, paired by seed:", ""]
    parts += [pd.DataFrame(pairs).to_markdown(index=False) if pairs else "(no other method)", ""]
    return "\n".join(parts + [f"- {note}" for note in notes])
