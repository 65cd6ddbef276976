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
seed by seed (paired). Results go to RUN_DIR/proof/, where `slimnas report RUN_DIR` shows them.
"""

import math
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from scipy.stats import t as student_t

from bench.quality import QualitySettings
from compress.arch import Architecture, param_count
from compress.corpus import DataSettings, find_data_dir
from compress.distill import DistillSettings
from compress.heldout import HeldoutSet
from compress.models import cache_root
from compress.prune import PrunePolicy
from compress.runtime.config import settings_from
from compress.runtime.errors import SlimnasError
from compress.runtime.files import write_json
from reports.tables import plus_minus, save_records
from search.records import COMPLETE, RetrainRecord, update_run, write_trial_tables
from search.retraining import Candidate, prepare_retraining, retrain, score_teacher
from search.setup import build_setup
from search.space import depth_only_reference, uniform_reference, width_only_reference
from search.study import run_study, zero_shot_reference

METHODS = ("search", "random", "zero_shot", "uniform", "depth_only", "width_only")
SEARCHED = {"search": None, "random": "random"}  # method -> sampler (None: the configured default)


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


def seeded(cfg: DictConfig, run_dir: Path, seed: int, sampler: str | None) -> DictConfig:
    """One search of the comparison: its own run directory, the seed for sampler and KD order, no references."""
    run_cfg = cfg.copy()
    with open_dict(run_cfg):
        run_cfg.run_dir, run_cfg.search.seed, run_cfg.distill.seed = str(run_dir), seed, seed
        run_cfg.search.references.kinds = []
        if sampler:
            run_cfg.search.sampler = sampler
    return run_cfg


def search_best(cfg: DictConfig, run_dir: Path, seed: int, sampler: str | None) -> tuple[Architecture, dict]:
    """Run (or resume) one search; its best trial by selection quality, and what it cost."""
    run_cfg = seeded(cfg, run_dir, seed, sampler)
    started = time.perf_counter()
    setup = build_setup(run_cfg)
    update_run(run_dir, settings=OmegaConf.to_container(run_cfg, resolve=True), command=cfg.command)
    run_study(setup)
    records, _ = write_trial_tables(run_dir, list(setup.objectives), setup.budget.latency_ms)
    complete = [r for r in records if r.state == COMPLETE]
    if not complete:
        raise SlimnasError(f"the search in {run_dir} completed no trial")
    best = max(complete, key=lambda r: r.final["quality"])
    cost = {"search_kd_tokens": sum(r.kd_tokens for r in records), "search_seconds": time.perf_counter() - started}
    return Architecture(**best.architecture), cost


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval over seeds."""
    mean = statistics.fmean(values)
    return mean, float(student_t.ppf(0.975, len(values) - 1)) * statistics.stdev(values) / math.sqrt(len(values))


METRICS = {  # what the table reports per finalist: name -> how to read it from a retrain record
    "kl": lambda r: r.heldout["kl"],
    "perplexity": lambda r: r.heldout["perplexity"],
    "text_perplexity": lambda r: next(iter(r.heldout_other.values()))["perplexity"] if r.heldout_other else None,
    "text_kl": lambda r: next(iter(r.heldout_other.values()))["kl"] if r.heldout_other else None,
    "summary": lambda r: r.summary,
}


def summarise(results: dict[str, dict[int, dict]], seeds: list[int]) -> tuple[list[dict], list[dict]]:
    """Per method mean ± 95% CI over seeds, and each method minus the search, paired by seed."""
    rows, paired = [], []
    for method, per_seed in results.items():
        row = {"method": method, "seeds": len(per_seed), "label": per_seed[seeds[0]]["label"]}
        for metric in (*METRICS, "params", "kd_tokens", "search_kd_tokens", "seconds"):
            values = [per_seed[s][metric] for s in seeds if per_seed[s].get(metric) is not None]
            if len(values) == len(seeds):
                row[metric], row[f"{metric}_ci95"] = mean_ci(values)
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
                difference, half_width = mean_ci(differences)
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
    # 1. Settings, checked before any compute
    run_dir = Path(cfg.run_dir)
    settings = settings_from(BaselineSettings, cfg.baselines, "baselines")
    data = settings_from(DataSettings, cfg.data, "data")
    distill = settings_from(DistillSettings, cfg.distill, "distill", precision=cfg.precision)
    quality = settings_from(QualitySettings, cfg.quality, "quality")
    policy = settings_from(PrunePolicy, cfg.pruning, "pruning")
    text_path = None
    if settings.heldout_text:
        data_dir = find_data_dir(data.dir)
        text_path = (data_dir / settings.heldout_text) if data_dir else None
        if text_path is None or not text_path.is_file():
            raise SlimnasError(f"baselines.heldout_text {settings.heldout_text} not found under data.dir ({data_dir})")
    seeds = list(settings.seeds)
    print(
        f"baselines: {', '.join(settings.methods)} at {cfg.search.budget.params} ± {cfg.search.budget.window} of the "
        f"teacher's parameters; seeds {seeds}; searches of {cfg.search.n_trials} trials (rungs "
        f"{list(cfg.search.fidelity.rung_tokens)}); every finalist retrained with {cfg.retrain.budget_tokens:,} "
        "KD tokens"
    )

    # 2. The fixed baselines, from the first search's set-up: feasible set, zero-shot screen of every candidate
    with open_dict(cfg):
        cfg.search.references.zero_shot_candidates = 10**9  # screen every feasible candidate
    first_search = run_dir / f"seed_{seeds[0]}" / "search"
    first_setup = build_setup(seeded(cfg, first_search, seeds[0], None))
    context, teacher_config = first_setup.context, first_setup.context.teacher.model.config
    feasible, budget = list(first_setup.feasible), first_setup.budget
    fixed: dict[str, tuple[Architecture, PrunePolicy, dict]] = {}
    finders = {
        "zero_shot": lambda: zero_shot_reference(first_setup),
        "uniform": lambda: uniform_reference(feasible, teacher_config, budget, cfg.search.references.uniform_tolerance),
        "depth_only": lambda: depth_only_reference(feasible, teacher_config, budget),
        "width_only": lambda: width_only_reference(feasible, teacher_config, budget),
    }
    notes = []
    for method in [m for m in settings.methods if m in finders]:
        screen_started = time.perf_counter()
        reference, note = finders[method]()
        notes.append(note)
        print(f"{method}: {note}")
        if reference is not None:
            strategy = reference.depth_strategy or policy.depth_strategy
            cost = {"search_kd_tokens": 0, "search_seconds": time.perf_counter() - screen_started}
            fixed[method] = (reference.arch, replace(policy, depth_strategy=strategy), cost)

    # 3. Per seed: the two searches, then every finalist retrained alike and scored on unseen text
    heldout_text = ()
    if text_path is not None:
        rows = text_rows(text_path, context.teacher.tokenizer, data.seq_len, settings.heldout_text_rows)
        heldout_text = (HeldoutSet(text_path.stem, rows, context.teacher.model, cfg.precision),)
    methods = [m for m in settings.methods if m in SEARCHED or m in fixed]
    results: dict[str, dict[int, dict]] = {method: {} for method in methods}
    teacher = None
    for seed in seeds:
        chosen = dict(fixed)
        for method in [m for m in settings.methods if m in SEARCHED]:
            arch, cost = search_best(cfg, run_dir / f"seed_{seed}" / method, seed, SEARCHED[method])
            chosen[method] = (arch, policy, cost)
        retraining = prepare_retraining(
            context, cfg.teacher, replace(distill, budget_tokens=cfg.retrain.budget_tokens, seed=seed), quality, None,
            data.dir, run_dir / f"seed_{seed}", (), 0, cache_root(cfg.cache_dir), cfg.command,
            other_heldout=heldout_text, subset_seed=data.seed,
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
    columns = ["method", "label", "params", "kl", "kl_ci95", "text_perplexity", "text_perplexity_ci95", "summary",
               "summary_ci95", "kd_tokens", "search_kd_tokens", "seconds"]  # fmt: skip
    paired_columns = ["method", "metric", "minus_search", "ci95", "significant"]
    notes += [
        f"seeds {seeds}: the sampler's seed and the KD row order; every finalist retrained with "
        f"{cfg.retrain.budget_tokens:,} KD tokens; kl on {data.evaluation_rows} evaluation rows of "
        f"{context.corpus.source}; text_perplexity on {settings.heldout_text_rows} rows of {settings.heldout_text}",
        f"the teacher: kl 0, perplexity on unseen text {METRICS['text_perplexity'](teacher) or float('nan'):.2f}, "
        f"lm-eval summary {plus_minus(teacher.summary, teacher.summary_stderr)}",
        "a paired difference is significant when its 95% interval over seeds excludes zero",
    ]
    write_json(proof_dir / "proof.json", {"columns": columns, "rows": rows, "paired_columns": paired_columns,
                                         "paired": paired, "notes": notes, "per_seed": results})  # fmt: skip
    save_records(rows, proof_dir / "methods")
    save_records(paired, proof_dir / "paired")
    (proof_dir / "proof.md").write_text(_markdown(rows, paired, notes))
    plot(rows, results, proof_dir / "proof")
    update_run(run_dir, kind="baselines", teacher=cfg.teacher, settings=OmegaConf.to_container(cfg, resolve=True),
               wall_seconds={"baselines": time.perf_counter() - started})  # fmt: skip
    print(_markdown(rows, paired, notes))
    print(f"written to {proof_dir} (proof.md, methods.csv, paired.csv, proof.png); wall time "
          f"{time.perf_counter() - started:.0f} s")  # fmt: skip


def _result(record: RetrainRecord, cost: dict) -> dict:
    values = {metric: read(record) for metric, read in METRICS.items()}
    seconds = cost["search_seconds"] + sum(record.seconds.values())
    return {"label": record.label, "params": record.params, "kd_tokens": record.kd_tokens, **cost,
            "seconds": seconds, **values}  # fmt: skip


def _markdown(rows: list[dict], paired: list[dict], notes: list[str]) -> str:
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
        {"method": p["method"], "metric": p["metric"], "minus search": plus_minus(p["minus_search"], p["ci95"]),
         "significant": "yes" if p["significant"] else "no"}
        for p in paired
    ]  # fmt: skip
    parts = [pd.DataFrame(table).to_markdown(index=False), "", "Each method minus the search, paired by seed:", ""]
    parts += [pd.DataFrame(pairs).to_markdown(index=False) if pairs else "(no other method)", ""]
    return "\n".join(parts + [f"- {note}" for note in notes])
