"""The search command: an Optuna study over pruned architectures of the teacher.

Set-up happens once per process and is shared by its trials: teacher, corpus, importance (cached on
disk), the teacher's top-k logits (cached on disk), and the feasible candidate list. Then Optuna
proposes candidates until the study holds the requested number of completed trials; infeasible or
duplicate proposals are rejected before any compute, so every completed trial meets the budget.
"""

import json
import math
import random
import shutil
import sys
import time
from dataclasses import replace
from itertools import pairwise
from pathlib import Path

import optuna
import pandas as pd
from omegaconf import DictConfig, OmegaConf
from optuna.trial import FrozenTrial, TrialState
from tqdm import tqdm

from bench.speed import SpeedSettings
from bench.task_data import check_files, default_data_dir
from compress import interrupt
from compress.arch import Architecture
from compress.commands import distill_settings, load_teacher_context, resolve_cache_dir
from compress.distill import teacher_source
from compress.errors import SlimnasError
from compress.fingerprint import hash_json
from compress.models import load_model
from reports.tables import format_table, save_records
from search.constraints import Budget
from search.objectives import QUALITY_METRICS, Objective, objectives_from_config, pareto_front
from search.space import DIMENSIONS, SearchSpace, depth_only_candidate, uniform_candidate
from search.storage import open_storage, open_study, storage_url
from search.trial import StoppedEarly, TrialSettings, run_trial

REJECTED = "rejected"  # user attr of proposals dropped before any compute (infeasible, duplicate)
MAX_PROPOSALS = 200  # rejected proposals in a row before the search gives up


def make_sampler(name: str, seed: int, constraints_func) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        return optuna.samplers.TPESampler(
            multivariate=True, seed=seed, constraints_func=constraints_func, n_startup_trials=4
        )
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, constraints_func=constraints_func, population_size=8)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, constraints_func=constraints_func, n_startup_trials=4)
    if name in ("random", "enumerate"):
        return optuna.samplers.RandomSampler(seed=seed)
    raise SlimnasError(f"unknown sampler {name!r}: use tpe, nsga2, gp, random, enumerate or auto")


def _suggest(trial: optuna.Trial, space: SearchSpace) -> Architecture:
    values = {}
    for name in DIMENSIONS:
        choices = space.values[name]
        steps = {b - a for a, b in pairwise(choices)}
        if len(steps) <= 1:
            values[name] = trial.suggest_int(name, choices[0], choices[-1], step=steps.pop() if steps else 1)
        else:
            values[name] = trial.suggest_categorical(name, choices)
    return Architecture(**values)


def _evaluated(trial: FrozenTrial) -> bool:
    if trial.state in (TrialState.COMPLETE, TrialState.RUNNING):
        return True
    return trial.state == TrialState.PRUNED and REJECTED not in trial.user_attrs


class Search:
    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        search = cfg.search
        self.run_dir = Path(search.run_dir)
        self.objectives: list[Objective] = objectives_from_config(list(search.objectives))
        if search.quality_metric not in QUALITY_METRICS:
            raise SlimnasError(f"quality_metric must be one of {', '.join(QUALITY_METRICS)}")
        if search.quality_metric == "summary" and not search.score.tasks:
            raise SlimnasError("quality_metric=summary needs score.tasks")
        if search.n_trials < 1:
            raise SlimnasError("search.n_trials must be at least 1")
        rungs = list(search.fidelity.rung_tokens)
        step_tokens = cfg.distill.batch_size * cfg.distill.grad_accum * cfg.data.seq_len
        rung_steps = [0] + [tokens // step_tokens for tokens in rungs]
        if any(b <= a for a, b in pairwise(rung_steps)):
            raise SlimnasError(
                f"fidelity.rung_tokens {rungs} must increase by at least one KD step ({step_tokens} tokens) per rung"
            )
        self.budget = Budget(**OmegaConf.to_container(search.budget))

    # Set-up -----------------------------------------------------------------------------------------

    def plan(self, teacher_config) -> list[Architecture]:
        """Space and budget checks: raise before anything is written when the search cannot run."""
        self.space = SearchSpace.from_config(OmegaConf.to_container(self.cfg.search.space), teacher_config)
        feasible = self.space.feasible(teacher_config, self.budget)
        if not feasible:
            raise SlimnasError(
                f"budget unreachable: no architecture of the search space ({self.space.size()} points) meets "
                f"{self.budget.describe(teacher_config)}"
            )
        if self.cfg.search.score.tasks:
            check_files(self._data_dir(), list(self.cfg.search.score.tasks))
        return feasible

    def _data_dir(self) -> Path:
        return Path(self.cfg.search.score.data_dir) if self.cfg.search.score.data_dir else default_data_dir()

    def settings_key(self) -> str:
        search = OmegaConf.to_container(self.cfg.search)
        for runtime_only in ("n_trials", "run_dir", "storage", "keep_checkpoints"):
            search.pop(runtime_only, None)
        shared = {k: OmegaConf.to_container(self.cfg)[k] for k in ("teacher", "data", "importance", "distill")}
        return hash_json([search, shared])

    # The study --------------------------------------------------------------------------------------

    def run(self) -> None:
        cfg, search = self.cfg, self.cfg.search
        teacher = load_model(cfg.teacher)
        teacher_config = teacher.model.config
        feasible = self.plan(teacher_config)
        sampler_name = search.sampler
        if sampler_name == "auto":
            sampler_name = "enumerate" if len(feasible) <= search.enumerate_max else "tpe"
        budget = self.budget.describe(teacher_config)
        print(f"search space: {self.space.size()} points, {len(feasible)} feasible under {budget}")
        print(f"sampler: {sampler_name}")

        context = load_teacher_context(cfg, teacher=teacher)
        self.context = context
        self.settings = self._trial_settings()
        self.source = teacher_source(context.teacher, context.data, self.settings.distill, resolve_cache_dir(cfg))
        max_tokens = max(self.settings.rung_tokens, default=1)
        self.source.prepare(math.ceil(max_tokens / cfg.data.seq_len), self.settings.distill.eval_rows)

        self.run_dir.mkdir(parents=True, exist_ok=True)
        storage = open_storage(
            storage_url(search.storage.url, self.run_dir),
            search.storage.heartbeat_interval,
            search.storage.grace_period,
            search.storage.max_retry,
        )
        constraints = self._constraints if self.budget.latency_ms is not None else None
        existing = self._existing_trials(storage, search.study_name)
        sampler = make_sampler(sampler_name, search.seed + existing, constraints)
        study = open_study(
            storage, search.study_name, [o.direction for o in self.objectives], sampler, self.settings_key()
        )
        self.study = study
        self._enqueue_references(study, feasible, teacher_config, sampler_name)
        self.feasible = set(feasible)
        try:
            self._optimize(study)
        except KeyboardInterrupt:
            self.report(study)  # the tables show what finished before Ctrl-C; rerunning resumes the study
            raise
        self.report(study)

    @staticmethod
    def _existing_trials(storage, name: str) -> int:
        try:
            return len(optuna.load_study(study_name=name, storage=storage).trials)
        except KeyError:
            return 0

    def _trial_settings(self) -> TrialSettings:
        cfg, search = self.cfg, self.cfg.search
        need_speed = any(o.name in ("throughput", "latency") for o in self.objectives)
        need_speed = need_speed or self.budget.latency_ms is not None or search.measure_speed
        speed = SpeedSettings(**OmegaConf.to_container(search.speed), precision=cfg.precision) if need_speed else None
        return TrialSettings(
            rung_tokens=list(search.fidelity.rung_tokens),
            distill=distill_settings(cfg),
            quality_metric=search.quality_metric,
            score_tasks=list(search.score.tasks),
            score_limit=search.score.limit,
            data_dir=self._data_dir(),
            speed=speed,
            layer_metric=search.layer_metric,
            depth_strategy=search.depth_strategy,
            keep_checkpoint=search.keep_checkpoints,
        )

    def _enqueue_references(self, study, feasible, teacher_config, sampler_name: str) -> None:
        """Reference candidates, and every candidate when enumerating: once per study."""
        if study.user_attrs.get("references_enqueued"):
            return
        references = []
        if self.cfg.search.references:
            uniform = uniform_candidate(feasible, teacher_config, self.budget)
            depth = depth_only_candidate(feasible, teacher_config, self.budget)
            zero_shot = self._zero_shot_pick(feasible)
            references = [
                ("uniform", uniform, None),
                ("depth_only", depth, "contiguous"),
                ("zero_shot", zero_shot, None),
            ]
        for name, arch, depth_strategy in references:
            if arch is None:
                print(f"reference {name}: no candidate of the space meets the budget; skipped")
                continue
            attrs = {"reference": name} | ({"depth_strategy": depth_strategy} if depth_strategy else {})
            study.enqueue_trial(arch.as_dict(), user_attrs=attrs, skip_if_exists=False)
        if sampler_name == "enumerate":
            for arch in feasible:
                study.enqueue_trial(arch.as_dict(), skip_if_exists=True)
        study.set_user_attr("references_enqueued", True)  # last: a worker killed before this redoes it

    def _zero_shot_pick(self, feasible: list[Architecture]) -> Architecture:
        """ModelOpt-style pick: the candidate with the lowest held-out KL right after pruning (no KD)."""
        limit = self.cfg.search.zero_shot_candidates
        pool = feasible if len(feasible) <= limit else random.Random(self.cfg.search.seed).sample(feasible, limit)
        scores = {}
        for arch in tqdm(pool, desc="zero-shot screen", unit="candidate"):
            record = run_trial(
                self.context, self.source, arch, self._screen_only(), self.run_dir / "zero_shot", lambda r, v: True
            )
            scores[arch] = record["stages"]["screen"]["heldout_kl"]
        (self.run_dir / "zero_shot.json").write_text(
            json.dumps(
                [{**a.as_dict(), "heldout_kl": kl} for a, kl in sorted(scores.items(), key=lambda x: x[1])], indent=2
            )
        )
        return min(scores, key=scores.get)

    def _screen_only(self) -> TrialSettings:
        return replace(self.settings, rung_tokens=[], score_tasks=[], speed=None, keep_checkpoint=False)

    def _constraints(self, trial: FrozenTrial) -> list[float]:
        latency = trial.user_attrs.get("final", {}).get("latency_p50_ms", 0.0)
        return [latency - self.budget.latency_ms]

    def _promote(self, trial: optuna.Trial, is_reference: bool):
        """Successive halving: continue only if in the top 1/eta of the trials that reached this rung."""
        fidelity = self.cfg.search.fidelity

        def promote(rung: int, value: float) -> bool:
            trial.set_user_attr(f"rung_{rung}", value)
            if is_reference:
                return True
            peers = [
                t.user_attrs[f"rung_{rung}"]
                for t in self.study.get_trials(deepcopy=False)
                if f"rung_{rung}" in t.user_attrs and t.number != trial.number
            ]
            if len(peers) < fidelity.min_peers:
                return True
            rank = sum(1 for p in peers if p > value)
            return rank < math.ceil((len(peers) + 1) / fidelity.eta)

        return promote

    def objective(self, trial: optuna.Trial):
        arch = _suggest(trial, self.space)
        if arch not in self.feasible:
            trial.set_user_attr(REJECTED, "infeasible")
            raise optuna.TrialPruned("infeasible under the budget")
        duplicates = [
            t.number
            for t in self.study.get_trials(deepcopy=False)
            if t.number != trial.number and _evaluated(t) and t.params == trial.params
        ]
        if duplicates:
            trial.set_user_attr(REJECTED, f"duplicate of trial {duplicates[0]}")
            raise optuna.TrialPruned("duplicate candidate")
        reference = trial.user_attrs.get("reference")
        trial_dir = self.run_dir / "trials" / f"{trial.number:04d}"
        trial_dir.mkdir(parents=True, exist_ok=True)
        trial.set_user_attr("command", " ".join(sys.argv))
        try:
            record = run_trial(
                self.context,
                self.source,
                arch,
                self.settings,
                trial_dir,
                self._promote(trial, reference is not None),
                trial.user_attrs.get("depth_strategy"),
            )
        except StoppedEarly as stopped:
            self._save_record(trial, trial_dir, stopped.record | {"stopped_at_rung": stopped.rung})
            raise optuna.TrialPruned(f"stopped after rung {stopped.rung}") from None
        except KeyboardInterrupt:
            trial.set_user_attr("fail_reason", "interrupted")
            raise
        except Exception as error:
            reason = f"{type(error).__name__}: {' '.join(str(error).split())}"
            trial.set_user_attr("fail_reason", reason)
            (trial_dir / "record.json").write_text(json.dumps({"architecture": arch.as_dict(), "fail_reason": reason}))
            raise
        self._save_record(trial, trial_dir, record)
        return [record["final"][o.metric] for o in self.objectives]

    @staticmethod
    def _save_record(trial: optuna.Trial, trial_dir: Path, record: dict) -> None:
        for key in ("architecture", "params", "weight_bytes_bf16", "kd_tokens", "stages", "final", "seconds"):
            if key in record:
                trial.set_user_attr(key, record[key])
        (trial_dir / "record.json").write_text(json.dumps(record, indent=2, default=str))

    def _optimize(self, study: optuna.Study) -> None:
        target = self.cfg.search.n_trials

        def completed() -> int:
            return sum(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False))

        def exhausted() -> bool:
            finished = (TrialState.COMPLETE, TrialState.PRUNED)
            seen = {
                tuple(sorted(t.params.items()))
                for t in study.get_trials(deepcopy=False, states=finished)
                if REJECTED not in t.user_attrs
            }
            return len(seen) >= len(self.feasible)

        progress = tqdm(total=target, initial=min(completed(), target), desc="trials", unit="trial")
        rejected_in_a_row = 0

        def stop_when_done(study: optuna.Study, trial: FrozenTrial) -> None:
            nonlocal rejected_in_a_row
            interrupt.check()  # a Ctrl-C swallowed during the trial stops the study here, between trials
            rejected_in_a_row = rejected_in_a_row + 1 if REJECTED in trial.user_attrs else 0
            done = completed()
            progress.n = min(done, target)
            progress.refresh()
            if done >= target:
                study.stop()
            elif exhausted():
                print(f"\nstopping: all {len(self.feasible)} feasible candidates have been evaluated")
                study.stop()
            elif rejected_in_a_row >= MAX_PROPOSALS:
                print(f"\nstopping: {MAX_PROPOSALS} proposals in a row were infeasible or duplicates")
                study.stop()

        while completed() < target and not exhausted():
            try:
                study.optimize(self.objective, callbacks=[stop_when_done], catch=(Exception,), gc_after_trial=True)
            except optuna.exceptions.UpdateFinishedTrialError as error:
                # SQLite has no row locks: two workers can take the same queued trial; the other one
                # recorded it, so this worker only lost its copy of the work and carries on.
                print(f"\nnote: {error} (another worker finished it); continuing")
                continue
            if rejected_in_a_row >= MAX_PROPOSALS:
                break
        progress.close()

    # Results ----------------------------------------------------------------------------------------

    def report(self, study: optuna.Study) -> None:
        rows, points = [], {}
        for t in study.get_trials(deepcopy=False):
            if t.state == TrialState.PRUNED and REJECTED in t.user_attrs:
                continue
            final = t.user_attrs.get("final", {})
            row = {"trial": t.number, "state": t.state.name, **t.params, "params": t.user_attrs.get("params")}
            row.update(
                {
                    k: final.get(k)
                    for k in ("quality", "heldout_kl", "heldout_perplexity", "summary", "decode_tokens_per_s")
                }
            )
            row["kd_tokens"] = t.user_attrs.get("kd_tokens")
            row["reference"] = t.user_attrs.get("reference")
            row["seconds"] = t.user_attrs.get("seconds")
            row["fail_reason"] = t.user_attrs.get("fail_reason")
            rows.append(row)
            feasible = self.budget.latency_ms is None or final.get("latency_p50_ms", 0) <= self.budget.latency_ms
            if t.state == TrialState.COMPLETE and feasible:
                points[t.number] = list(t.values)
        front = pareto_front(points, [o.direction for o in self.objectives])
        for row in rows:
            row["pareto"] = row["trial"] in front
        save_records(rows, self.run_dir / "trials")
        save_records([r for r in rows if r["pareto"]], self.run_dir / "pareto")
        self._write_csv(rows)
        if self.cfg.search.keep_checkpoints:
            self._drop_checkpoints_off_front(front)
        columns = ["trial", *DIMENSIONS, "params", "quality", "heldout_perplexity", "kd_tokens", "reference"]
        print("\nPareto front:" if front else "\nno completed trial yet")
        print(format_table([r for r in rows if r["pareto"]], columns))
        print(f"\nrun directory: {self.run_dir} (trials.csv, pareto.csv, study.db)")

    def _write_csv(self, rows: list[dict]) -> None:
        frame = pd.DataFrame(rows)
        frame.to_csv(self.run_dir / "trials.csv", index=False)
        frame[frame.pareto].to_csv(self.run_dir / "pareto.csv", index=False)

    def _drop_checkpoints_off_front(self, front: list[int]) -> None:
        for trial_dir in (self.run_dir / "trials").glob("*"):
            if int(trial_dir.name) not in front and (trial_dir / "model").exists():
                shutil.rmtree(trial_dir / "model")


def run_search(cfg: DictConfig) -> None:
    started = time.perf_counter()
    Search(cfg).run()
    print(f"search wall time: {time.perf_counter() - started:.0f} s")
