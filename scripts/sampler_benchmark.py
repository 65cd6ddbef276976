"""Which sampler proposes the best per-layer candidates? Each told the same screen, asked the same number of times,
every proposal scored without KD.

    python scripts/sampler_benchmark.py preset=hetero-cpu run_dir=runs/samplers \
        [--samplers tpe cmaes nsga2 evolution random] [--seeds 0 1 2] [--proposals 20]

For each seed, the per-layer search's screen (search.screen.per_layer_samples candidates sampled by size with that
seed, plus the block library's MIP picks and the proportional allocation; read from the screen cache) is told to a
fresh in-memory study of each sampler (conf/search/sampler), with one objective: the KL on the selection documents
right after pruning (CMA-ES takes one objective only, and the race ranks by KL). Each sampler is then asked until
`--proposals` new candidates were scored; a proposal of a candidate its study holds already is told as failed and
does not count, as in the search. This is the search without its KD: what a sampler contributes is which candidates
it proposes.

Compared: the best candidate of each study by selection KL (the pick), scored on the evaluation documents that
chose nothing, paired against the first sampler's pick (TPE, the default) over documents (the per-document
difference averaged over seeds) and over seeds (Student t, reports.verdicts.paired), 95% family-wise over the
comparisons (Bonferroni). The screen's best with no proposal at all is a row too. Also, per sampler, the mean
selection KL of its proposals, the candidates a search would spend KD on, paired over seeds against the
reference's. Scores are cached in RUN_DIR/scores.jsonl (a killed run resumes; samplers proposing the same candidate
share one scoring); the table goes to RUN_DIR/samplers.csv.
"""

import argparse
import json
import math
import statistics
import time
import warnings
from pathlib import Path

import optuna
import pandas as pd
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict
from optuna.exceptions import ExperimentalWarning
from optuna.trial import TrialState, create_trial

from slimnas.compress.arch import PerLayerArchitecture
from slimnas.compress.heldout import HeldoutSet
from slimnas.compress.prune import plan_pruning, prune_model
from slimnas.config import check, compose
from slimnas.core.files import read_jsonl
from slimnas.core.tables import format_table, plus_minus
from slimnas.reports.verdicts import paired, pick_stability
from slimnas.search.screen import run_screen
from slimnas.search.setup import SearchSetup, build_setup

SCREEN_BEST = "screen's best"  # the row of no proposal: the screen's best candidate


class Scores:
    """Per-document KL of candidates right after pruning, on the selection and evaluation documents; appended to a
    JSON-lines file as each is scored, read back on a rerun."""

    def __init__(self, path: Path, setup: SearchSetup, evaluation: HeldoutSet):
        self.path, self.setup, self.evaluation = path, setup, evaluation
        self.sets = {"selection": setup.selection, "evaluation": evaluation}
        self.done: dict[tuple[str, str], list[float]] = {}
        for line in read_jsonl(path) if path.is_file() else []:
            self.done[line["split"], line["label"]] = line["kl_per_doc"]
        self.seconds: list[float] = []

    def per_doc(self, arch: PerLayerArchitecture, split: str) -> list[float]:
        key = (split, arch.label())
        if key not in self.done:
            started = time.perf_counter()
            teacher = self.setup.context.teacher.model
            plan = plan_pruning(self.setup.context.importance, teacher.config, arch, self.setup.policy)
            self.done[key] = self.sets[split].evaluate(prune_model(teacher, plan, arch)).kl_per_doc
            self.seconds.append(time.perf_counter() - started)
            with open(self.path, "a") as lines:
                lines.write(json.dumps({"split": split, "label": arch.label(), "architecture": arch.as_dict(),
                                        "kl_per_doc": self.done[key]}) + "\n")  # fmt: skip
        return self.done[key]

    def kl(self, arch: PerLayerArchitecture, split: str = "selection") -> float:
        return statistics.fmean(self.per_doc(arch, split))


def run_study(name: str, sampler_cfg: dict, seed: int, setup: SearchSetup, screen: list, scores: Scores, n: int):
    """One sampler told the screen, asked until n new candidates were scored: (pick, the proposals, rejections)."""
    space = setup.layer_space
    sampler = instantiate(sampler_cfg, seed=seed)
    study = optuna.create_study(sampler=sampler, direction="minimize", study_name=f"{name}-{seed}")
    with warnings.catch_warnings(action="ignore", category=ExperimentalWarning):
        study.set_metric_names(["quality"])  # the evolution sampler ranks parents by this objective
    study.add_trials([create_trial(params=space.encode(arch), distributions=space.distributions(),
                                   value=scores.kl(arch)) for arch in screen])  # fmt: skip
    seen, proposed, rejected = set(screen), [], 0
    while len(proposed) < n and rejected < 20 * n:
        trial = study.ask()
        arch = space.suggest(trial)
        if arch in seen:
            study.tell(trial, state=TrialState.FAIL)
            rejected += 1
            continue
        seen.add(arch)
        study.tell(trial, scores.kl(arch))
        proposed.append(arch)
    pick = min([*screen, *proposed], key=lambda arch: (scores.kl(arch), arch.label()))
    return pick, proposed, rejected


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="slimnas search settings: preset=hetero-cpu run_dir=DIR ...")
    parser.add_argument("--samplers", nargs="+", default=["tpe", "cmaes", "nsga2", "evolution", "random"],
                        help="conf/search/sampler options; the first is the reference")  # fmt: skip
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--proposals", type=int, default=20, help="new candidates scored per sampler and seed")
    args = parser.parse_args()

    samplers = {name: compose("search", [*args.overrides, f"search/sampler={name}"]).search.sampler
                for name in args.samplers}  # fmt: skip
    samplers = {name: OmegaConf.to_container(sampler) for name, sampler in samplers.items()}
    cfg = compose("search", args.overrides)
    with open_dict(cfg):
        cfg.command = " ".join(["python", "scripts/sampler_benchmark.py", *map(str, args.overrides)])
    check(cfg)
    setup = build_setup(cfg)
    if setup.layer_space is None:
        raise SystemExit("the sampler benchmark compares per-layer proposals: give preset=hetero-cpu")
    evaluation = HeldoutSet("evaluation", setup.context.corpus.evaluation, setup.context.teacher.model, cfg.precision)
    scores = Scores(setup.run_dir / "scores.jsonl", setup, evaluation)
    print(f"{setup.layer_space.describe()}; {len(args.samplers)} samplers x {len(args.seeds)} seeds, "
          f"{args.proposals} proposals each after the screen, scored without KD")  # fmt: skip

    rows, picks = [], {}
    for seed in args.seeds:
        sample = setup.layer_space.stratified_sample(setup.settings.screen.per_layer_samples, seed)
        screen = list(dict.fromkeys([*setup.seeds, *sample]))
        for screened in run_screen(setup, screen):  # the search's own screen, and its cache
            scores.done["selection", screened.arch.label()] = screened.kl_per_doc
        screen_best = min(screen, key=lambda arch: (scores.kl(arch), arch.label()))
        picks[SCREEN_BEST, seed] = screen_best
        for name, sampler_cfg in samplers.items():
            started = time.perf_counter()
            pick, proposed, rejected = run_study(name, sampler_cfg, seed, setup, screen, scores, args.proposals)
            picks[name, seed] = pick
            better = sum(scores.kl(arch) < scores.kl(screen_best) for arch in proposed)
            rows.append({"sampler": name, "seed": seed, "proposed": len(proposed), "rejected": rejected,
                         "beat the screen's best": better,
                         "best proposal (selection KL)": min(map(scores.kl, proposed), default=math.nan),
                         "mean proposal (selection KL)": statistics.fmean(map(scores.kl, proposed)),
                         "pick": pick.label(), "pick from": "proposals" if pick in proposed else "screen",
                         "pick (selection KL)": scores.kl(pick),
                         "seconds": round(time.perf_counter() - started)})  # fmt: skip
            shown = [column for column in rows[-1] if column != "pick"]  # a per-layer label is ~300 characters
            print(format_table(rows[-1:], shown))
    per_seed = pd.DataFrame(rows)
    per_seed.to_csv(setup.run_dir / "samplers_per_seed.csv", index=False)

    # The picks on the evaluation documents, paired against the reference sampler's
    reference, names = args.samplers[0], [*args.samplers[1:], SCREEN_BEST]
    comparisons = len(names)
    summary = []
    mean_proposal = per_seed.set_index(["sampler", "seed"])["mean proposal (selection KL)"]
    for name in [reference, *names]:
        evaluation_kl = [scores.kl(picks[name, seed], "evaluation") for seed in args.seeds]
        proposals = per_seed.loc[per_seed.sampler == name, "mean proposal (selection KL)"]
        stability = pick_stability([picks[name, s].label() for s in args.seeds], evaluation_kl)
        row = {"sampler": name, "same pick in seeds": stability.same,
               "proposals' KL (selection)": plus_minus(*_mean_sd(list(proposals))) if len(proposals) else "",
               "pick KL (selection)": plus_minus(*_mean_sd([scores.kl(picks[name, s]) for s in args.seeds])),
               "pick KL (evaluation)": plus_minus(*_mean_sd(evaluation_kl))}  # fmt: skip
        if name != reference:
            pick = paired(evaluation_kl, [scores.kl(picks[reference, s], "evaluation") for s in args.seeds],
                          [scores.per_doc(picks[name, s], "evaluation") for s in args.seeds],
                          [scores.per_doc(picks[reference, s], "evaluation") for s in args.seeds],
                          comparisons=comparisons)  # fmt: skip
            row[f"- {reference} over documents"] = plus_minus(pick.difference, pick.ci95_documents)
            if len(args.seeds) > 1:
                row[f"- {reference} over seeds"] = plus_minus(pick.difference, pick.ci95_seeds)
        if name not in (reference, SCREEN_BEST) and len(args.seeds) > 1:  # where the race would spend its KD
            gap = paired([mean_proposal[name, s] for s in args.seeds],
                         [mean_proposal[reference, s] for s in args.seeds], comparisons=len(samplers) - 1)  # fmt: skip
            row[f"proposals - {reference} over seeds"] = plus_minus(gap.difference, gap.ci95_seeds)
        summary.append(row)
    pd.DataFrame(summary).to_csv(setup.run_dir / "samplers.csv", index=False)
    print(f"\nthe picks on {len(evaluation.rows)} evaluation documents, {len(args.seeds)} seeds; "
          f"differences with 95% family-wise intervals over {comparisons} comparisons (negative: better than "
          f"{reference}); " + (f"{statistics.fmean(scores.seconds):.1f} s a scoring" if scores.seconds
                                else "every score read from RUN_DIR/scores.jsonl"))  # fmt: skip
    print(format_table(summary, list(summary[1])))


def _mean_sd(values: list[float]) -> tuple[float, float | None]:
    """Mean and spread (standard deviation) over seeds."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


if __name__ == "__main__":
    main()
