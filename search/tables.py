"""Tables and the Pareto front of a run, derived from its trial records (never kept anywhere else)."""

from pathlib import Path

from slimnas.compress.runtime.tables import save_records
from slimnas.search.objectives import Objective, front_of, objectives_from_config
from slimnas.search.records import TrialRecord, read_records

TABLE_COLUMNS = [
    "trial", "state", "stage", "reference", "label", "params", "params_fraction", "kd_tokens",
    "quality", "quality_stderr", "heldout_kl", "heldout_kl_stderr", "perplexity", "perplexity_stderr",
    "summary", "summary_stderr", "decode_speedup", "decode_speedup_stderr", "decode_tokens_per_s",
    "latency_p50_ms", "seconds", "retry_of", "fail_reason",
]  # fmt: skip


def table_row(record: TrialRecord) -> dict:
    """One flat row of the trials table (no per-row lists)."""
    values = {**record.as_dict(), **record.architecture, **record.final}
    return (
        {column: values.get(column) for column in TABLE_COLUMNS[:5]}
        | record.architecture
        | {column: values.get(column) for column in TABLE_COLUMNS[5:]}
    )


def run_front(run: dict, records: list[TrialRecord]) -> list[int]:
    """The run's front by the objectives and latency budget it was searched with (run.json settings)."""
    search = run["settings"]["search"]
    return front_of(records, objectives_from_config(list(search["objectives"])), search["budget"]["latency_ms"])


def write_trial_tables(run_dir: Path, objectives: list[Objective], latency_ms: float | None) -> tuple[list, list[int]]:
    """trials.* and pareto.* (csv, json, parquet), derived from the records on disk; returns records and front."""
    records = read_records(run_dir)
    front = front_of(records, objectives, latency_ms)
    rows = [table_row(r) | {"pareto": r.trial in front} for r in records]
    save_records(rows, run_dir / "trials")
    save_records([row for row in rows if row["pareto"]], run_dir / "pareto")
    return records, front
