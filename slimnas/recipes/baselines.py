"""slimnas baselines: does the search pick better pruned models than simpler choices, at equal size? (the proof)

    slimnas baselines preset=baselines-cpu run_dir=runs/baselines
    slimnas baselines preset=baselines-hetero-cpu run_dir=runs/proof-hetero      # with per-layer students

For one teacher and one parameter cap (`search.budget.cap=true`: every candidate of every method has at
most the target's parameters, and at least the target less `window`), each method picks one finalist:
  search      the search as users run it: the screen's best first, TPE told the screen, the race, the leaders'
              extension, within `search.budget.kd_tokens`
  modelopt    NVIDIA ModelOpt's recipe: the screen's best `baselines.modelopt_top_k`, each distilled with the same
              KD budget split evenly among them, the best kept
  random      feasible candidates drawn uniformly at random, the same race and the same KD budget
  zero_shot   the screen's best, no KD (ModelOpt's NAS pick without distillation)
  uniform, depth_only, width_only: the rule-based cuts, no KD
and in the per-layer space (search.space.per_layer; search.proposals=per_layer for these methods alone):
  hetero      the per-layer search: the screen of a sample and the block library's seeds, the sampler
              (baselines.hetero_sampler, else search.sampler), the race
  mip         the block library's best MIP pick, no KD (Puzzle's selection; search.block_seeds)
  proportional  the importance-proportional allocation, no search, no KD
The methods that spend KD tokens to choose get the same budget; every finalist is then retrained
with the same KD tokens, rows, schedule and seed and scored on the evaluation documents, on a text no
method saw (WikiText-2 valid, one row per article) and on lm-eval's evaluation pool. All of it repeats
per seed (the sampler's seed and the KD row order). The tables give, per method, the finalist's size, the
mean and a 95% interval over seeds, how stable its pick was (how many seeds chose the same finalist, the
spread of their retrained KL), what choosing cost (KD tokens; wall time, each method charged the screen it
uses, the block library counting as one), and each method minus the reference (baselines.reference, the search
by default): paired by seed, and for the KL also paired by document (each document's difference averaged over the
seeds, then a 95% interval over documents; reports/verdicts.py).
Results go to RUN_DIR/proof/ (proof.md, proof.json: the tables as shown, which `slimnas report RUN_DIR`
shows; methods.*, paired.*, per_seed.json; proof.png). With one `search.storage.url` every method of every
seed is a study of its own (`search.study_name`-seed_S-METHOD).
"""

import math
import time
from dataclasses import replace
from pathlib import Path

import optuna
import pandas as pd
from omegaconf import DictConfig, OmegaConf, open_dict

from slimnas.bench.tasks import prepare_suite
from slimnas.compress.arch import Architecture, Shape, param_count, shape_of
from slimnas.compress.corpus import text_rows
from slimnas.compress.heldout import HeldoutSet
from slimnas.compress.settings import PruningSettings
from slimnas.core.data import find_data_dir
from slimnas.core.errors import SlimnasError
from slimnas.core.files import atomic_write_text, hash_json, write_json
from slimnas.core.rundir import RetrainRecord, add_wall_seconds, read_records, read_screen, search_pick, update_run
from slimnas.core.settings import settings_of
from slimnas.core.stats import mean_ci95
from slimnas.core.tables import plus_minus, save_records
from slimnas.recipes.settings import BLOCK_PICKS, PER_LAYER, RULES, SEARCHING, BaselinesSettings, sampler_file
from slimnas.reports.verdicts import paired as paired_over_seeds
from slimnas.reports.verdicts import pick_stability
from slimnas.retrain.retraining import Candidate, prepare_retraining, retrain, score_teacher
from slimnas.search.front import write_trial_tables
from slimnas.search.race import kd_spent
from slimnas.search.references import find_reference
from slimnas.search.screen import run_screen
from slimnas.search.setup import SearchSetup, build_setup
from slimnas.search.study import run_study


def method_config(cfg: DictConfig, method: str, seed: int, run_dir: Path, top_k: int) -> DictConfig:
    """One method's search: its own run directory, the seed for sampler and KD order, no reference cuts, quality
    alone as the objective (every candidate lies under the same cap: the best one is the finalist), and a study of its
    own in a shared storage (in SQLite each run directory has its own file). The per-layer methods propose per-layer
    candidates; the others keep the uniform space."""
    run_cfg = cfg.copy()
    with open_dict(run_cfg):
        run_cfg.run_dir, run_cfg.search.seed, run_cfg.distill.seed = str(run_dir), seed, seed
        if cfg.search.storage.url:
            run_cfg.search.study_name = f"{cfg.search.study_name}-seed_{seed}-{method}"
        run_cfg.search.references.kinds = []
        run_cfg.search.objectives = ["quality"]
        run_cfg.search.measure_speed = False
        if method == "modelopt":  # the screen's best k, one rung each, sharing the KD budget; nothing else
            share = cfg.search.budget.kd_tokens // top_k
            run_cfg.search.screen.top_k, run_cfg.search.n_trials = top_k, top_k
            run_cfg.search.race.rung_tokens, run_cfg.search.race.extensions = [share], 0
        if method == "random":
            run_cfg.search.proposals = "uniform"
        if method in PER_LAYER:
            run_cfg.search.proposals = "per_layer"
        if method == "hetero" and cfg.baselines.hetero_sampler:
            run_cfg.search.sampler = OmegaConf.load(sampler_file(cfg.baselines.hetero_sampler))
    return run_cfg


Pick = tuple[Shape, PruningSettings, dict]  # a method's finalist, the cut's policy, what choosing it cost


def search_finalist(cfg: DictConfig) -> Pick:
    """Run (or resume) one method's search; its pick, and what choosing cost (from the records: a resumed run
    counts what its earlier runs did). The screen it read, and the block library it was seeded from, are charged at
    the seconds they took when they were computed, even when they came from the cache: every method that uses a
    screen pays for one."""
    setup = build_setup(cfg)
    update_run(setup.run_dir, settings=OmegaConf.to_container(cfg, resolve=True), command=cfg.command)
    study = run_study(setup)
    records, _ = write_trial_tables(setup.run_dir, study, list(setup.objectives))
    pick = search_pick(setup.run_dir, read_records(setup.run_dir))
    if pick is None:
        raise SlimnasError(f"the search in {setup.run_dir} completed no trial")
    screen_seconds = sum(line["seconds"] for line in read_screen(setup.run_dir)) + setup.library_seconds
    cost = {"search_kd_tokens": kd_spent(study), "screen_seconds": screen_seconds,
            "search_seconds": sum(r.seconds for r in records)}  # fmt: skip
    return shape_of(pick.architecture), PruningSettings(**pick.pruning), cost


def block_picks(setup: SearchSetup, methods: list[str]) -> tuple[dict[str, Pick], list[str]]:
    """mip and proportional, from a per-layer set-up's block seeds (search.block_seeds): the MIP's best predicted
    pick is charged the block library like the screen (at the seconds its cuts took when measured, cached or not);
    the proportional allocation reads only the importance scores. A method with no shape (the allocation cannot meet
    the budget) is left out, with a note, like a rule-based cut with no candidate."""
    blocks = setup.blocks
    if blocks is None:  # hetero alone with search.blocks.enabled=false: no library, no seeds (main refuses mip then)
        return {}, []
    config = setup.context.teacher.model.config
    shapes = {"mip": blocks.mip[0], "proportional": blocks.proportional}
    costs = {"mip": NO_COST | {"screen_seconds": blocks.library_seconds}, "proportional": NO_COST}
    picks, notes = {}, []
    for method in [m for m in methods if m in BLOCK_PICKS]:
        shape = shapes[method]
        if shape is None:
            notes.append(f"{method}: left out, no allocation within the budget (or search.blocks.proportional=false)")
            continue
        picks[method] = (shape, setup.policy, costs[method])
        notes.append(f"{method}: {finalist_name(shape, setup.policy)} ({param_count(config, shape):,} parameters)")
    notes.append(f"the block library counts as a screen: mip and hetero are charged its {blocks.library_seconds:.0f} s "
                 "(its cuts when they were measured, cached or not); hetero also its own per-layer screen")  # fmt: skip
    return picks, notes


def listing(names: list[str]) -> str:
    """'a, b and c'."""
    return " and ".join(filter(None, [", ".join(names[:-1]), names[-1]]))


def finalist_name(arch: Shape, policy: PruningSettings) -> str:
    """The finalist's directory: its label, or for a per-layer shape (a label as long as its layers) a digest of it."""
    label = arch.label() if isinstance(arch, Architecture) else f"per_layer-{hash_json(arch.as_dict())[:12]}"
    return f"{label}-{policy.depth_strategy}"


METRICS = {  # what the tables report per finalist: name -> how to read it from a retrain record
    "kl": lambda r: r.heldout["kl"],
    "perplexity": lambda r: r.heldout["perplexity"],
    "text_perplexity": lambda r: next(iter(r.heldout_other.values()))["perplexity"] if r.heldout_other else None,
    "text_kl": lambda r: next(iter(r.heldout_other.values()))["kl"] if r.heldout_other else None,
    "summary": lambda r: r.summary["value"],
    "summary_stderr": lambda r: r.summary["stderr"],
}


def result(record: RetrainRecord, cost: dict) -> dict:
    values = {metric: read(record) for metric, read in METRICS.items()}
    retrain_seconds = sum(record.seconds.values())
    seconds = cost["screen_seconds"] + cost["search_seconds"] + retrain_seconds
    return {"finalist": record.name, "label": record.label, "params": record.params, "kd_tokens": record.kd_tokens,
            **cost, "retrain_seconds": retrain_seconds, "seconds": seconds, "kl_per_doc": record.heldout["kl_per_doc"],
            **values}  # fmt: skip


NO_COST = {"search_kd_tokens": 0, "screen_seconds": 0.0, "search_seconds": 0.0}  # a rule: no screen, no search
COSTS = ("params", "kd_tokens", "search_kd_tokens", "screen_seconds", "search_seconds", "retrain_seconds", "seconds")


def over(per_seed: dict[int, dict], key: str, seeds: list[int]) -> list:
    """One value of every seed's result, in seed order."""
    return [per_seed[s][key] for s in seeds]


def summarise(results: dict[str, dict[int, dict]], seeds: list[int], reference: str) -> tuple[list[dict], list[dict]]:
    """Per method mean ± 95% CI over seeds and its pick's stability; each method minus the reference method, paired
    by seed (and by document for KL)."""
    rows, paired = [], []
    against = results[reference]
    for method, per_seed in results.items():
        stability = pick_stability(over(per_seed, "finalist", seeds), over(per_seed, "kl", seeds))
        label = next(per_seed[s]["label"] for s in seeds if per_seed[s]["finalist"] == stability.finalist)
        row = {"method": method, "seeds": len(per_seed), "label": label, "same_finalist": stability.same,
               "kl_spread": stability.kl_spread}  # fmt: skip
        for metric in (*METRICS, *COSTS):
            values = [per_seed[s][metric] for s in seeds if per_seed[s].get(metric) is not None]
            if len(values) == len(seeds):
                row[metric], row[f"{metric}_ci95"] = mean_ci95(values)
        row["params_range"] = (min(per_seed[s]["params"] for s in seeds), max(per_seed[s]["params"] for s in seeds))
        rows.append(row)
        if method == reference:
            continue
        for metric in ("kl", "text_perplexity", "summary"):
            if any(r[s].get(metric) is None for r in (per_seed, against) for s in seeds):
                continue
            by_doc = metric == "kl"
            difference = paired_over_seeds(
                over(per_seed, metric, seeds), over(against, metric, seeds),
                over(per_seed, "kl_per_doc", seeds) if by_doc else None,
                over(against, "kl_per_doc", seeds) if by_doc else None, higher_is_better=metric == "summary",
            )  # fmt: skip
            pair = {"method": method, "metric": metric, f"minus_{reference}": difference.difference,
                    "ci95_seeds": difference.ci95_seeds,
                    f"wins_for_{reference}": difference.reference_better}  # fmt: skip
            if difference.ci95_documents is not None:
                pair["ci95_documents"], pair["documents"] = difference.ci95_documents, difference.documents
            pair["significant"] = difference.significant
            paired.append(pair)
    rows.sort(key=lambda row: row.get("kl", math.inf))
    return rows, paired


def display_tables(rows: list[dict], paired: list[dict], reference: str) -> tuple[list[dict], list[dict]]:
    """The two tables as people read them (± 95% intervals, rounded): proof.md, proof.json and the report show these."""
    table = [
        {
            "method": r["method"],
            "finalist (most seeds)": r["label"],
            "same finalist (seeds)": f"{r['same_finalist']} of {r['seeds']}",
            "params (seeds)": " - ".join(f"{p / 1e6:.2f}M" for p in sorted(set(r["params_range"]))),
            "KL (evaluation docs)": plus_minus(r.get("kl"), r.get("kl_ci95")),
            "KL spread (seeds)": f"{r['kl_spread']:.3f}",
            "perplexity (unseen text)": plus_minus(r.get("text_perplexity"), r.get("text_perplexity_ci95")),
            "lm-eval summary": plus_minus(r.get("summary"), r.get("summary_ci95")),
            "KD tokens to choose": f"{r['search_kd_tokens']:,.0f}",
            "wall s: screen + search + retrain": f"{r['screen_seconds']:.0f} + {r['search_seconds']:.0f} + "
            f"{r['retrain_seconds']:.0f} = {r['seconds']:.0f}",
        }
        for r in rows
    ]
    minus = f"minus_{reference}"
    pairs = [
        {"method": p["method"], "metric": p["metric"], f"minus {reference} (95% over seeds)": plus_minus(p[minus],
         p["ci95_seeds"]), "95% over documents": plus_minus(p[minus], p["ci95_documents"])
         if "ci95_documents" in p else "", f"seeds where the {reference} is better": p[f"wins_for_{reference}"],
         "significant": "yes" if p["significant"] else "no"}
        for p in paired
    ]  # fmt: skip
    return table, pairs


def markdown(table: list[dict], pairs: list[dict], notes: list[str], reference: str) -> str:
    parts = [pd.DataFrame(table).to_markdown(index=False), "", f"Each method minus the {reference}, paired:", ""]
    parts += [pd.DataFrame(pairs).to_markdown(index=False) if pairs else "(no other method)", ""]
    return "\n".join(parts + [f"- {note}" for note in notes])


def plot(rows: list[dict], results: dict[str, dict[int, dict]], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [("kl", "KL to the teacher (evaluation documents)"), ("text_perplexity", "perplexity on unseen text")]
    figure = Figure(figsize=(11, 4), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2)
    methods = [row["method"] for row in rows]
    for axis, (metric, title) in zip(axes, panels, strict=True):
        for x, row in enumerate(rows):
            if metric not in row:
                continue
            axis.errorbar(x, row[metric], yerr=row[f"{metric}_ci95"], fmt="o", capsize=6, color="tab:blue")
            values = [v[metric] for v in results[row["method"]].values() if v.get(metric) is not None]
            axis.scatter([x + 0.12] * len(values), values, s=12, color="tab:gray", label="seeds" if x == 0 else None)
        axis.set_xticks(range(len(methods)), methods, rotation=20)
        axis.set_title(f"{title}: mean ± 95% CI over seeds", fontsize=10)
        axis.grid(alpha=0.3)
    axes[0].legend()
    figure.savefig(path.with_suffix(".png"), dpi=110)
    figure.savefig(path.with_suffix(".svg"))


def main(cfg: DictConfig) -> None:
    started = time.perf_counter()
    # 1. Settings, task files and the unseen text, checked before any compute
    run_dir = Path(cfg.run_dir)
    settings: BaselinesSettings = settings_of(cfg, "baselines")
    data, distill, quality = settings_of(cfg, "data"), settings_of(cfg, "distill"), settings_of(cfg, "quality")
    retrain_settings = replace(settings_of(cfg, "retrain"), prompts=[])  # no continuations
    search = settings_of(cfg, "search")
    if not search.budget.cap or search.budget.kd_tokens is None:
        raise SlimnasError("the proof compares at equal size and equal KD: set search.budget.cap=true and "
                           "search.budget.kd_tokens (preset=baselines-cpu does)")  # fmt: skip
    if search.proposals == "per_layer":
        raise SlimnasError("baselines: search.proposals=per_layer would make the uniform methods per-layer; the "
                           "per-layer methods (hetero, mip, proportional) set it themselves")  # fmt: skip
    if set(settings.methods) & set(BLOCK_PICKS) and not search.blocks.enabled:
        raise SlimnasError("baselines.methods mip and proportional need search.blocks.enabled=true")
    suite = prepare_suite(list(quality.tasks), data.dir) if quality.tasks else None
    text_path = None
    if settings.heldout_text:
        data_dir = find_data_dir(data.dir)
        text_path = (data_dir / settings.heldout_text) if data_dir else None
        if text_path is None or not text_path.is_file():
            raise SlimnasError(f"baselines.heldout_text {settings.heldout_text} not found under data.dir ({data_dir})")
    seeds = list(settings.seeds)
    print(
        f"baselines: {', '.join(settings.methods)} under a cap of {search.budget.params} of the teacher's parameters "
        f"(down to -{search.budget.window:.0%}); seeds {seeds}; {search.budget.kd_tokens:,} KD tokens to choose for "
        f"{', '.join(m for m in SEARCHING if m in settings.methods)}; every finalist retrained with "
        f"{retrain_settings.budget_tokens:,} KD tokens"
    )

    # 2. The screen and the rule-based cuts, from the first seed's set-up (the screen is cached for every method);
    # the block library's picks from a per-layer set-up (the library is cached for every per-layer method)
    first = build_setup(method_config(cfg, "search", seeds[0], run_dir / f"seed_{seeds[0]}" / "search", 1))
    layered = None
    if set(settings.methods) & set(PER_LAYER):
        layered = build_setup(method_config(cfg, "mip", seeds[0], run_dir / "blocks", 1))
    screened = run_screen(first)
    context = first.context
    fixed: dict[str, Pick] = {}
    screen_seconds = sum(s.seconds for s in screened)
    if "zero_shot" in settings.methods:
        fixed["zero_shot"] = (screened[0].arch, first.policy, NO_COST | {"screen_seconds": screen_seconds})
    notes = [f"zero_shot: {screened[0].arch.label()}, the best of {len(screened)} screened candidates"]
    for method in [m for m in settings.methods if m in RULES]:
        reference, note = find_reference(method, first)
        notes.append(note)
        print(f"{method}: {note}")
        if reference is not None:
            policy = replace(first.policy, depth_strategy=reference.depth_strategy or first.policy.depth_strategy)
            fixed[method] = (reference.arch, policy, NO_COST)
    if layered is not None:
        picks, lines = block_picks(layered, settings.methods)
        fixed |= picks
        print("\n".join(lines))
        per_layer = listing([m for m in settings.methods if m in PER_LAYER])
        notes += [f"{per_layer} choose among {layered.layer_space.describe()}", *lines]

    # 3. Per seed: the methods that search, then every finalist retrained alike and scored on unseen text
    heldout_text = ()
    if text_path is not None:
        rows, unit = text_rows(text_path, context.teacher.tokenizer, data.seq_len, data.seed)
        heldout_text = (HeldoutSet(text_path.stem, rows, context.teacher.model, cfg.precision),)
        notes.append(f"unseen text: {len(rows)} {unit}s of {settings.heldout_text}, one row each")
    methods = [m for m in settings.methods if m in SEARCHING or m in fixed]
    results: dict[str, dict[int, dict]] = {method: {} for method in methods}
    teacher = None
    for seed in seeds:
        chosen = dict(fixed)
        for method in [m for m in settings.methods if m in SEARCHING]:
            method_dir = run_dir / f"seed_{seed}" / method
            chosen[method] = search_finalist(method_config(cfg, method, seed, method_dir, settings.modelopt_top_k))
        retraining = prepare_retraining(
            context, cfg.teacher, replace(distill, seed=seed), retrain_settings, quality, suite, speed=None,
            log_to=run_dir / "log.txt", command=cfg.command, other_heldout=heldout_text,
        )  # fmt: skip
        teacher = teacher or score_teacher(retraining, run_dir / "teacher")  # the scale every row is read against
        picks = {}
        for method, (arch, policy, cost) in chosen.items():
            name = finalist_name(arch, policy)
            out = run_dir / f"seed_{seed}" / "finalists" / name
            print(f"seed {seed}, {method}: {arch.label()}")
            record = retrain(retraining, Candidate(name, arch, policy), out, teacher)
            results[method][seed] = result(record, cost)
            picks[method] = {"finalist": name, **cost}
        write_json(run_dir / f"seed_{seed}" / "methods.json", picks)  # methods that chose alike share a finalist

    # 4. The tables, each method against the reference paired by seed and by document; a plot
    rows, paired = summarise(results, seeds, settings.reference)
    last_rung = first.tokens_at(first.last_rung)
    notes += [
        f"seeds {seeds}: the sampler's seed and the KD row order; every finalist retrained with "
        f"{retrain_settings.budget_tokens:,} KD tokens; KL over {context.corpus.documents('evaluation')} evaluation "
        f"documents of {context.corpus.source}",
        f"every method chooses under one cap: {search.budget.describe(context.teacher.model.config)}; "
        f"the params column gives each finalist's size over the seeds",
        f"{listing([m for m in SEARCHING if m in settings.methods])} may spend {search.budget.kd_tokens:,} KD "
        f"tokens to choose; enumerating all "
        f"{len(first.feasible)} feasible candidates to the last rung ({last_rung:,} tokens each) would cost "
        f"{len(first.feasible) * last_rung:,}",
        f"the teacher: perplexity on unseen text {METRICS['text_perplexity'](teacher) or float('nan'):.2f}"
        + (f", lm-eval summary {plus_minus(teacher.summary['value'], teacher.summary['stderr'])}" if suite else ""),
        "a paired difference is significant when it lies outside both 95% intervals (over seeds, and for KL over "
        "documents, each document's difference averaged over the seeds)",
        "same finalist: how many seeds chose the finalist shown; KL spread: the largest minus the smallest retrained "
        "KL of the method's finalists over the seeds",
        f"wall s, from the records: every method that uses the screen is charged it, at the seconds it took when it "
        f"was computed (search, modelopt and zero_shot; {screen_seconds:.0f} s for the first seed's screen, which is "
        "cached and read by the others), then its search's trials, then its finalist's retraining; random search and "
        "the rule-based cuts use no screen",
    ]
    table, pairs = display_tables(rows, paired, settings.reference)
    proof_dir = run_dir / "proof"
    write_json(proof_dir / "proof.json", {"columns": list(table[0]), "rows": table,
                                         "paired_columns": list(pairs[0]) if pairs else [], "paired": pairs,
                                         "notes": notes})  # fmt: skip
    save_records([{k: v for k, v in row.items() if k != "params_range"} for row in rows], proof_dir / "methods")
    save_records(paired, proof_dir / "paired")
    write_json(proof_dir / "per_seed.json", results)
    atomic_write_text(proof_dir / "proof.md", markdown(table, pairs, notes, settings.reference))
    plot(rows, results, proof_dir / "proof")
    update_run(run_dir, kind="baselines", teacher=cfg.teacher, settings=OmegaConf.to_container(cfg, resolve=True))
    add_wall_seconds(run_dir, "baselines (runs that finished)", time.perf_counter() - started)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    print(markdown(table, pairs, notes, settings.reference))
    print(f"written to {proof_dir} (proof.md, proof.json, methods.csv, paired.csv, per_seed.json, proof.png); "
          f"wall time {time.perf_counter() - started:.0f} s")  # fmt: skip
