"""Records out: tidy rows saved as CSV, JSON and Parquet, and printed as aligned text tables."""

import json
import math
from dataclasses import asdict, is_dataclass
from pathlib import Path

import pandas as pd

from slimnas.compress.runtime.files import atomic_path, atomic_write_text


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
    rows = [[cell(row.get(c)) for c in columns] for row in as_rows(records)]
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def plus_minus(value: float | None, stderr: float | None, digits: int = 3) -> str:
    """'value ± stderr' for tables; blank when there is no value (None or NaN), no '±' without a stderr."""
    if value is None or math.isnan(value):
        return ""
    if stderr is None or math.isnan(stderr):
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} ± {stderr:.{digits}f}"


def digits_for(value: float, stderr: float | None) -> int:
    """Decimals that show two significant digits of the stderr (three of the value when there is none)."""
    reference, significant = (stderr, 2) if stderr and math.isfinite(stderr) else (value, 3)
    if not reference or not math.isfinite(reference):
        return 0
    return max(0, significant - 1 - math.floor(math.log10(abs(reference))))
