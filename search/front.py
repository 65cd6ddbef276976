"""The run's tables and its Pareto front: the front is computed once, here, and stored; everything else reads it.

The front is Optuna's `best_trials`: the non-dominated trials among the feasible ones (those that
reached the last rung within the latency budget; stopped and screened candidates violate the
`rungs_missed` constraint). When a timing is an objective, a trial whose speed-up stayed unstable
(bench.speed) is no point to place on it: the front is then the non-dominated set of the other feasible
trials, some of which it may have hidden. With more than two objectives, the quality-vs-parameters plot
needs the non-dominated subset in those two alone: it is computed at the same moment and stored beside it.
"""

from pathlib import Path

import optuna

from slimnas.core.files import write_json
from slimnas.core.rundir import COMPLETE, FRONT_FILE, TrialRecord, architecture_columns, read_records
from slimnas.core.tables import save_records
from slimnas.search.objectives import Objective, pareto_front

TABLE_COLUMNS = [
    "trial", "state", "rung", "proposed_by", "reference", "label", "params", "params_fraction", "kd_tokens",
    "quality", "quality_stderr", "heldout_kl", "heldout_kl_stderr", "perplexity", "perplexity_stderr",
    "summary", "summary_stderr", "decode_speedup", "decode_speedup_stderr", "speed_unstable", "decode_tokens_per_s",
    "latency_p50_ms", "seconds", "stop_reason", "retry_of", "fail_reason",
]  # fmt: skip


def table_row(record: TrialRecord) -> dict:
    """One flat row of the trials table (no per-document lists)."""
    values = {**record.as_dict(), **record.final, "speed_unstable": record.speed.get("unstable")}
    return (
        {column: values.get(column) for column in TABLE_COLUMNS[:6]}
        | architecture_columns(record.architecture)
        | {column: values.get(column) for column in TABLE_COLUMNS[6:]}
    )


def quality_params_front(records: list[TrialRecord], front: list[int]) -> list[int]:
    """The front's members that no other member beats in quality and parameters alone."""
    points = {r.trial: [r.final["quality"], r.params] for r in records if r.trial in front}
    return pareto_front(points, ["maximize", "minimize"])


def front_trials(study: optuna.Study, records: dict[int, TrialRecord], objectives: list[Objective]) -> list[int]:
    """Optuna's best trials, or, when a timing is an objective and one of them stayed unstable, the non-dominated
    set of the feasible trials whose timings are stable (module doc)."""
    front = sorted(t.number for t in study.best_trials if t.number in records)
    unstable = {n for n, r in records.items() if r.speed.get("unstable")}
    if not any(o.measured for o in objectives) or not unstable & set(front):
        return front
    points = {
        n: [r.final[o.metric] for o in objectives]
        for n, r in records.items()
        if n not in unstable and r.over_budget is None
    }
    return pareto_front(points, [o.direction for o in objectives])


def write_front(run_dir: Path, study: optuna.Study, objectives: list[Objective]) -> dict:
    """front.json: the study's front (trial numbers) and its quality-vs-parameters subset, computed once."""
    records = {r.trial: r for r in read_records(run_dir) if r.state == COMPLETE}
    front = front_trials(study, records, objectives)
    stored = {
        "objectives": [o.name for o in objectives],
        "trials": front,
        "quality_params": quality_params_front(list(records.values()), front),
    }
    write_json(run_dir / FRONT_FILE, stored)
    return stored


def write_trial_tables(run_dir: Path, study: optuna.Study, objectives: list[Objective]) -> tuple[list, list[int]]:
    """front.json, then trials.* and pareto.* (csv, json, parquet) from the records; returns records and front."""
    front = write_front(run_dir, study, objectives)["trials"]
    records = read_records(run_dir)
    rows = [table_row(r) | {"pareto": r.trial in front} for r in records]
    save_records(rows, run_dir / "trials")
    save_records([row for row in rows if row["pareto"]], run_dir / "pareto")
    return records, front
