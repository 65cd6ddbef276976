"""Records out: tidy rows saved as CSV, JSON and Parquet (pandas), printed as text tables (tabulate), and the
one way a value is written with its error bar."""

import json
import math
from dataclasses import asdict, is_dataclass
from pathlib import Path

import pandas as pd
from tabulate import tabulate

from slimnas.core.files import atomic_path, atomic_write_text


def as_rows(records: list) -> list[dict]:
    return [asdict(r) if is_dataclass(r) else dict(r) for r in records]


def save_records(records: list, stem: Path) -> list[Path]:
    """Write stem.csv, stem.json and stem.parquet (one row per record; an empty table is a valid file)."""
    rows = as_rows(records)
    frame = pd.DataFrame(rows)
    paths = [stem.with_suffix(suffix) for suffix in (".csv", ".json", ".parquet")]
    atomic_write_text(paths[0], frame.to_csv(index=False))
    atomic_write_text(paths[1], json.dumps(rows, indent=2, default=str))
    with atomic_path(paths[2]) as staging:
        frame.to_parquet(staging, index=False)
    return paths


def cell(value) -> str:
    """One value as table text: blank for None and NaN, thousands separators, four significant digits."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float) and math.isnan(value):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e6 else f"{value:.3e}"
    if isinstance(value, int):
        return f"{value:,}"
    return "" if value is None else str(value)


def format_table(records: list, columns: list[str]) -> str:
    """The records as an aligned text table of the given columns."""
    rows = [[cell(row.get(column)) for column in columns] for row in as_rows(records)]
    return tabulate(rows, headers=columns, tablefmt="simple", disable_numparse=True)


def plus_minus(value: float | None, stderr: float | None, digits: int | None = None) -> str:
    """'value ± stderr' with two significant digits of the stderr (three of the value without one); blank when
    there is no value, no '±' when there is no stderr. The one way every table writes an error bar."""
    if value is None or math.isnan(value):
        return ""
    if digits is None:
        reference, significant = (stderr, 2) if stderr and math.isfinite(stderr) else (value, 3)
        digits = max(0, significant - 1 - math.floor(math.log10(abs(reference)))) if reference else 0
    if stderr is None or math.isnan(stderr):
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} ± {stderr:.{digits}f}"
