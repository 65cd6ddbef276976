"""Records out: tidy rows saved as JSON and Parquet, and printed as aligned text tables."""

import json
from dataclasses import asdict, is_dataclass
from pathlib import Path

import pandas as pd


def as_rows(records: list) -> list[dict]:
    return [asdict(r) if is_dataclass(r) else dict(r) for r in records]


def save_records(records: list, stem: Path) -> tuple[Path, Path]:
    """Write stem.json and stem.parquet (one row per record)."""
    rows = as_rows(records)
    stem.parent.mkdir(parents=True, exist_ok=True)
    json_path, parquet_path = stem.with_suffix(".json"), stem.with_suffix(".parquet")
    json_path.write_text(json.dumps(rows, indent=2, default=str))
    pd.DataFrame(rows).to_parquet(parquet_path, index=False)
    return json_path, parquet_path


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e6 else f"{value:.3e}"
    if isinstance(value, int):
        return f"{value:,}"
    return "" if value is None else str(value)


def format_table(records: list, columns: list[str]) -> str:
    rows = [[_cell(row.get(c)) for c in columns] for row in as_rows(records)]
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)
