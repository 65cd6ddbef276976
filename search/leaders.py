"""The leaders' extended last rung: more KD for the top two while the race cannot tell them apart.

Once no trial is running, the two best feasible candidates that reached the last rung are compared on
the selection documents: a two-sided paired test (which of the two is worse is not known before the
data), at `search.race.confidence` after a Bonferroni correction over the looks (the first comparison
and one per extension), so two equal leaders are called separated with at most 1 - confidence. While
they are not separated and the KD budget allows both, each is distilled again from its pruned weights
with twice the last budget (a fresh warmup + cosine schedule over the longer run: what a longer rung
would have been), and compared again; at most `search.race.extensions` times. Like a rung, a round
reserves its tokens first and checks the budget after (any number of workers), under its own study
attribute, so a round redone after a kill replaces its reservation instead of adding to it. The winner is the search's
pick: retrain takes it first and the proof benchmark takes it as the search's finalist. Everything
goes to RUN_DIR/race.json, with the settings hash; a rerun reads it back instead of redoing it.
"""

import time

import optuna

from slimnas.compress.arch import shape_of
from slimnas.compress.prune import plan_pruning, prune_model
from slimnas.compress.settings import PruningSettings
from slimnas.core.files import locked, read_json, write_json
from slimnas.core.rundir import RACE_FILE, TrialRecord, leaders, read_records
from slimnas.core.stats import paired_test
from slimnas.search.race import EXTENSION_TOKENS, kd_spent
from slimnas.search.setup import SearchSetup
from slimnas.search.trial import distiller


def separated(a: list[float], b: list[float], looks: int, confidence: float) -> tuple[bool, dict]:
    """Do the two differ with confidence: a two-sided paired test, Bonferroni-adjusted over `looks` comparisons."""
    test = paired_test(a, b, alternative="two-sided")
    p = min(1.0, test.p * looks)
    return p < 1 - confidence, {"difference": test.difference, "stderr": test.stderr, "p": p, "looks": looks}


def round_tokens(setup: SearchSetup, number: int) -> int:
    """KD tokens each leader gets in extension round `number` (from 0): the last rung's, doubled number + 1 times."""
    return setup.tokens_at(setup.last_rung) * 2 ** (number + 1)


def extended(setup: SearchSetup, record: TrialRecord, tokens: int) -> dict:
    """One leader distilled from its pruned weights for `tokens` KD tokens, scored on the selection documents."""
    started = time.perf_counter()
    teacher = setup.context.teacher.model
    arch = shape_of(record.architecture)
    plan = plan_pruning(setup.context.importance, teacher.config, arch, PruningSettings(**record.pruning))
    student = prune_model(teacher, plan, arch)
    kd = distiller(setup, student, plan, budget_tokens=tokens)
    kd.train_until(kd.total_steps)
    metrics = setup.selection.evaluate(student)
    return {"trial": record.trial, "kd_tokens": kd.step * kd.tokens_per_step, "kl": metrics.kl,
            "kl_stderr": metrics.kl_stderr, "kl_per_doc": metrics.kl_per_doc,
            "seconds": time.perf_counter() - started}  # fmt: skip


def extend_leaders(study: optuna.Study, setup: SearchSetup) -> dict | None:
    """Extend the leaders' last rung until they are separated, the budget or the extensions run out; the race."""
    path = setup.run_dir / RACE_FILE
    with locked(setup.run_dir / ".race.lock"):
        race = read_json(path) if path.is_file() else None
        top = leaders(read_records(setup.run_dir))
        if len(top) < 2:
            return None
        if (
            race is None
            or race.get("settings_hash") != setup.settings_hash
            or race["leaders"] != [r.trial for r in top]
        ):
            race = {"settings_hash": setup.settings_hash, "leaders": [r.trial for r in top], "rounds": []}
        values = {r.trial: r.final["kl_per_doc"] for r in top}
        for done in race["rounds"]:
            values = {leader["trial"]: leader["kl_per_doc"] for leader in done["leaders"]}
        settings, budget = setup.settings.race, setup.settings.budget.kd_tokens
        while True:
            split, test = separated(*values.values(), settings.extensions + 1, settings.confidence)
            race["test"] = test
            if split:
                race["why"] = f"separated with {settings.confidence:.0%} confidence (two-sided)"
                break
            if len(race["rounds"]) >= settings.extensions:
                race["why"] = f"not separated after {settings.extensions} extension(s)"
                break
            tokens = round_tokens(setup, len(race["rounds"]))
            reservation = f"{EXTENSION_TOKENS}_{race['leaders'][0]}_{race['leaders'][1]}_{len(race['rounds'])}"
            study.set_user_attr(reservation, 2 * tokens)  # reserve, then check (as the rungs do)
            if budget is not None and kd_spent(study) > budget:
                study.set_user_attr(reservation, 0)
                race["why"] = f"not separated; the KD budget has no room for two runs of {tokens:,} tokens"
                break
            print(f"race: trials {race['leaders'][0]} and {race['leaders'][1]} are within noise; both again with "
                  f"{tokens:,} KD tokens")  # fmt: skip
            round_: dict = {"kd_tokens": tokens, "leaders": [extended(setup, record, tokens) for record in top]}
            race["rounds"].append(round_)
            values = {leader["trial"]: leader["kl_per_doc"] for leader in round_["leaders"]}
            write_json(path, race)
        race["winner"] = min(values, key=lambda trial: (sum(values[trial]), trial))
        write_json(path, race)
    print(f"race: trial {race['winner']} leads ({race['why']})")
    return race
