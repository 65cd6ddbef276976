"""slimnas report: a leaderboard, plots and one self-contained page from run directories' records.

    slimnas report runs/demo [runs/other ...] [out=reports/sweep]

Reads records only (no model is loaded, nothing is measured), so it takes seconds and can be rerun at
any time, also while a search is still going. Every input is read and checked before anything is
written: a bad run directory ends in one line and leaves an earlier report as it was. Several runs
give one leaderboard, each row tagged by its run; the report goes to `out`, or the first run's report/.
"""

from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

from slimnas.core.files import atomic_write_text
from slimnas.core.tables import format_table, save_records
from slimnas.reports.leaderboard import display_table, leaderboard_rows, markdown
from slimnas.reports.page import page
from slimnas.reports.plots import draw_plots, write_plots
from slimnas.reports.runs import read_runs

TEXT_COLUMNS = [
    "name", "stage", "reference", "label", "params_pct", "kd_tokens", "heldout_split", "heldout_documents",
    "heldout_kl", "summary", "decode_speedup",
]  # fmt: skip


def main(cfg: DictConfig) -> None:
    # 1. The runs, read and checked before anything is written
    runs = read_runs([Path(d) for d in cfg.run_dirs])
    out = Path(cfg.out) if cfg.out else runs[0].dir / "report"

    # 2. The leaderboard: per search run the teacher, the retrained candidates, then the rest of the search
    searches = [run for run in runs if run.kind == "search"]
    rows = leaderboard_rows(searches)

    # 3. The plots of each search run, drawn in memory
    plots = {run.name: draw_plots(run) for run in searches}

    # 4. Written: leaderboard.{csv,json,parquet,md,html}, plots/RUN/NAME.{png,svg}, index.html
    if rows:  # a benchmark run (proof only) has no leaderboard
        save_records(rows, out / "leaderboard")
        atomic_write_text(out / "leaderboard.md", markdown(rows))
        headers, cells = display_table(rows)
        atomic_write_text(out / "leaderboard.html", pd.DataFrame(cells, columns=headers).to_html(index=False))
    for name, run_plots in plots.items():
        write_plots(run_plots, out / "plots" / name)
    atomic_write_text(out / "index.html", page(runs, rows, plots))

    # 5. The leaderboard as text, and where the page is
    columns = ["run", *TEXT_COLUMNS] if len(searches) > 1 else TEXT_COLUMNS
    if rows:
        print(format_table(rows, columns))
    print(f"\nreport: {out / 'index.html'}")
