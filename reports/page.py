"""The report as one self-contained index.html: open it anywhere, offline, and everything is there.

The page is the Jinja2 template templates/report.html.j2, rendered with autoescaping; this module only
turns the runs' records into the plain values it shows. Images are inlined as data: URIs and the CSS
sits in the page: it requests nothing (no fonts, no CDN, no scripts).
"""

import base64
import json
from collections import Counter

from jinja2 import Environment, PackageLoader, select_autoescape

from slimnas.core.rundir import COMPLETE, STOPPED, leaders, outcome_text, search_pick
from slimnas.core.stats import paired_difference
from slimnas.core.tables import cell, plus_minus
from slimnas.reports.leaderboard import display_table, library_fidelity, pm, rank_fidelity
from slimnas.reports.plots import Plot
from slimnas.reports.runs import Run, Section


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def flatten(value, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(value, dict):
        return [item for key, inner in value.items() for item in flatten(inner, f"{prefix}{key}.")]
    return [(prefix.rstrip("."), json.dumps(value) if isinstance(value, list) else cell(value))]


def best_candidate(best: dict, teacher: dict) -> str:
    """The best row against the teacher, in words."""
    what = (
        f"Best {'retrained candidate' if best['stage'] == 'retrained' else 'candidate of the search'}: "
        f"trial {best['name']} ({best['label']}), {best['params_pct']:.1f}% of the teacher's parameters, "
        f"KL to the teacher {pm(best, 'heldout_kl')} on {best['heldout_documents']} {best['heldout_split']} "
        f"documents after {best['kd_tokens']:,} KD tokens (the teacher: 0)"
    )
    if best["perplexity"] is not None and teacher["perplexity"] is not None:
        what += f", perplexity {pm(best, 'perplexity')} against the teacher's {pm(teacher, 'perplexity')}"
    if best["teacher_score_kept_pct"] is not None:
        what += f", {best['teacher_score_kept_pct']:.0f}% of the teacher's above-chance lm-eval score kept"
    if best["decode_speedup"] is not None:
        what += f", decoding at {pm(best, 'decode_speedup')}x the teacher's speed"
    return what + "."


def pick_text(run: Run) -> str:
    """Whether the search's pick is separated from the runner-up: what a user acting on the pick must know first."""
    top = leaders(run.trials)
    if len(top) < 2:
        return ""
    pick = search_pick(run.dir, run.trials)
    runner_up = next(r for r in top if r is not pick) if pick in top else top[1]
    race = run.race
    if race is None:
        return (
            f" The pick, trial {pick.trial}, was not tested against the runner-up, trial {runner_up.trial} "
            "(no race decided between them)."
        )
    test = race["test"]
    difference = f"KL difference {abs(test['difference']):.4f} ± {test['stderr']:.4f}, two-sided p = {test['p']:.2g}"
    if race["why"].startswith("separated"):
        return (
            f" The pick, trial {pick.trial}, is separated from the runner-up, trial {runner_up.trial} ({difference})."
        )
    return (
        f" The pick, trial {pick.trial}, is NOT separated from the runner-up, trial {runner_up.trial} ({difference}; "
        f"{race['why']}): the two are within noise, and either may be the better student."
    )


def summary(run: Run, rows: list[dict]) -> str:
    mine = [row for row in rows if row["run"] == run.name]
    reached = sum(r.state == COMPLETE for r in run.trials)
    text = (
        f"Teacher {run.info['teacher']} ({run.teacher_params:,} parameters), searched under the budget "
        f"{run.info.get('budget', 'not recorded')}: {len(run.screen)} candidates screened without KD, "
        f"{len(run.trials)} trials, {reached} of them reached the last rung"
    )
    if run.retrained:
        text += f"; {len(run.retrained)} candidates retrained on {run.retrain_tokens} KD tokens each"
    text += "." + pick_text(run)
    text += " " + (best_candidate(mine[1], mine[0]) if len(mine) > 1 else "No candidate to compare.")
    if not run.retrained:
        text += " This run was never retrained: search-only report."
    return text


def front_rows(run: Run) -> list[list[str]]:
    """The stored front by size, each member's quality paired against the front's best."""
    members = sorted(run.members(), key=lambda r: r.params)
    best = max(members, key=lambda r: r.final["quality"], default=None)
    rows = []
    for r in members:
        difference, stderr = paired_difference(r.final["kl_per_doc"], best.final["kl_per_doc"])
        versus = "best" if r is best else plus_minus(difference, stderr)
        rows.append([str(r.trial), r.label, f"{r.params:,}", plus_minus(r.final["quality"], r.final["quality_stderr"]),
                     versus, r.reference or ""])  # fmt: skip
    return rows


def fidelity_cells(fidelity: dict) -> list:
    return [fidelity["rung"], fidelity["candidates"], f"{fidelity['spearman']:.2f}", f"{fidelity['kendall']:.2f}"]


def race_text(run: Run) -> str:
    race = run.race
    if race is None:
        return ""
    rounds = "; ".join(
        ", ".join(f"trial {leader['trial']} KL {leader['kl']:.4f}" for leader in done["leaders"])
        + f" after {done['kd_tokens']:,} KD tokens"
        for done in race["rounds"]
    )
    text = f"The race's leaders: trials {race['leaders'][0]} and {race['leaders'][1]}"
    text += f"; extended: {rounds}" if rounds else ""
    return text + f". Trial {race['winner']} is the search's pick ({race['why']})."


def generations(run: Run) -> dict | None:
    if run.teacher is None or not run.retrained:
        return None
    by_model = [{g["prompt"]: g["text"] for g in r.generations} for r in (run.teacher, *run.retrained)]
    headers = ["prompt", "teacher", *(f"trial {r.trial} {r.label}" for r in run.retrained)]
    rows = [[g["prompt"], *(texts.get(g["prompt"], "") for texts in by_model)] for g in run.teacher.generations]
    return {"headers": headers, "rows": rows}


def notes(run: Run) -> list[str]:
    items = []
    if run.failed:
        failed = "; ".join(f"trial {r.trial}: {r.fail_reason}" for r in run.failed)
        items.append(f"{len(run.failed)} failed trial(s) left out of the leaderboard ({failed}).")
    if not run.retrained:
        items.append("This run was never retrained: search-only report.")
    items += [f"retrain/{name} has no record yet (interrupted or still running): left out." for name in run.unfinished]
    timed = [("Trial", r) for r in run.candidates] + [("Retrained trial", r) for r in run.retrained]
    items += [
        f"{what} {r.trial}: {r.speed['unstable']} ({r.speed['measurements']} timings). Marked (unstable) in the "
        "tables, drawn hollow in the speed plot, never placed on a front by its speed."
        for what, r in timed
        if r.speed.get("unstable")
    ]
    teacher_summary = run.teacher.summary.get("value") if run.teacher else None
    if teacher_summary is not None and teacher_summary <= 0:
        items.append("The teacher's lm-eval summary is at or below chance: no share of it is reported.")
    excluded = sorted({task for r in run.retrained for task in r.summary.get("excluded", [])})
    if excluded:
        items.append(
            f"Not in the lm-eval summary score (no known chance level, or no accuracy): {', '.join(excluded)}."
        )
    return items


def search_view(run: Run, rows: list[dict], plots: list[Plot]) -> dict:
    """Everything the page shows of one search run, as plain values."""
    info = run.info
    counts = Counter(outcome_text(r.state, r.rung) for r in run.trials)
    facts = [
        ("teacher", f"{info['teacher']} ({run.teacher_params:,} parameters)"),
        ("budget", info.get("budget", "")),
        *flatten(info.get("corpus", {}), "corpus."),
        *flatten(info.get("hardware", {}), "hardware."),
        ("importance scores", info.get("importance", "")),
        ("search command", info.get("search", {}).get("command", "")),
        ("retrain command", info.get("retrain", {}).get("command", "never retrained")),
    ]
    return {
        "name": run.name,
        "summary": summary(run, rows),
        "front_objectives": ", ".join(run.front["objectives"]),
        "front_headers": ["trial", "label", "params", "quality", "KL vs best (paired)", "reference"],
        "front_rows": front_rows(run),
        "fidelity": [fidelity_cells(f) for f in rank_fidelity(run)],
        "library_fidelity": fidelity_cells(found) if (found := library_fidelity(run)) else None,
        "race": race_text(run),
        "plots": [plot for plot in plots if not plot.beside_front],
        "front_plots": [plot for plot in plots if plot.beside_front],
        "generations": generations(run),
        "outcomes": [[outcome, n] for outcome, n in counts.most_common()],
        "retries": "; ".join(
            f"trial {r.trial} retried trial {r.retry_of}" for r in run.trials if r.retry_of is not None
        ),
        "plan": info.get("search", {}).get("plan", []) + info.get("queued", []),
        "stops": [[r.trial, r.label, r.rung, r.stop_reason] for r in run.trials if r.state == STOPPED],
        "references": [
            [r.reference, r.trial, r.label, f"{100 * r.params_fraction:.1f}%", r.state, r.reference_note or ""]
            for r in run.trials
            if r.reference
        ],
        "reference_notes": info.get("references", []),
        "screen": [[line["label"], plus_minus(line["kl"], line["kl_stderr"])] for line in run.screen],
        "facts": [(key, str(value)) for key, value in facts],
        "wall": [[stage, duration(seconds)] for stage, seconds in info.get("wall_seconds", {}).items()],
        "settings": flatten(info["settings"]),
        "notes": notes(run),
    }


def section_view(run: Run, section: Section) -> dict:
    cells = lambda columns, rows: [[cell(row.get(c)) for c in columns] for row in rows]  # noqa: E731
    view = {
        "title": f"{section.title} ({run.name})",
        "columns": section.columns,
        "rows": cells(section.columns, section.rows),
        "paired_columns": section.paired_columns,
        "paired": cells(section.paired_columns, section.paired),
        "notes": section.notes,
        "image": section.image,
        "wall": [],
    }
    if run.kind != "search":  # a run of sections only: its cost and settings are shown with them
        view["wall"] = [[stage, duration(seconds)] for stage, seconds in run.info.get("wall_seconds", {}).items()]
        view["settings"] = flatten(run.info.get("settings", {}))
    return view


def page(runs: list[Run], rows: list[dict], plots: dict[str, list[Plot]]) -> str:
    environment = Environment(
        loader=PackageLoader("slimnas.reports", "templates"), autoescape=select_autoescape(default=True),
        trim_blocks=True, lstrip_blocks=True,
    )  # fmt: skip
    environment.filters["b64"] = lambda data: base64.b64encode(data).decode()
    searches = [run for run in runs if run.kind == "search"]
    headers, cells = display_table(rows)
    return environment.get_template("report.html.j2").render(
        names=", ".join(run.name for run in runs),
        searches=[search_view(run, rows, plots[run.name]) for run in searches],
        leaderboard={"headers": headers, "cells": cells, "stages": [row["stage"].split()[0] for row in rows]},
        sections=[section_view(run, section) for run in runs for section in run.sections],
    )
