"""The report as one self-contained index.html: open it anywhere, offline, and everything is there.

Images are inlined as data: URIs and the CSS sits in the page: it requests nothing (no fonts, no CDN,
no scripts). It says in words what the numbers mean, shows the leaderboard, the plots, the candidates'
greedy continuations beside the teacher's, how the search went, the settings, and what was left out.
"""

import json
from collections import Counter
from collections.abc import Callable
from html import escape

from slimnas.compress.runtime.tables import cell
from slimnas.reports.leaderboard import html_table, pm
from slimnas.reports.markup import bullets, paragraph, png_image, section, table
from slimnas.reports.plots import Plot
from slimnas.reports.runs import Run
from slimnas.search.records import COMPLETE, outcome_text

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1500px;
       padding: 0 1rem; color: #1f2328; line-height: 1.45; }
h1 { font-size: 1.6rem; margin-bottom: .3rem; } h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .2rem; }
p { max-width: 75rem; }
table { border-collapse: collapse; font-size: .8rem; margin: .6rem 0 1rem; }
th, td { border: 1px solid #d0d7de; padding: .2rem .4rem; text-align: left; vertical-align: top; }
th { background: #f6f8fa; } tbody tr:nth-child(even) { background: #fafbfc; }
.scroll { overflow-x: auto; }
.leaderboard td { white-space: nowrap; }
.leaderboard td:first-child, .leaderboard th:first-child { position: sticky; left: 0; background: #f6f8fa; }
.leaderboard tr.teacher { font-weight: 600; background: #fff8e6; }
.leaderboard tr.retrained { background: #eef6ff; }
.generations td { white-space: pre-wrap; font-family: ui-monospace, monospace; max-width: 22rem; }
figure { margin: 1rem 0 2rem; } figure img { max-width: 100%; height: auto; border: 1px solid #eaeef2; }
figcaption { font-size: .85rem; color: #57606a; }
.missing, .note { color: #6e5400; background: #fff8c5; padding: .3rem .6rem; border-radius: 4px; }
details { margin: .5rem 0 1rem; } summary { cursor: pointer; color: #0969da; }
"""


def per_run(runs: list[Run], render: Callable[[Run], str]) -> str:
    """One block per run; the run's name heads its block only when the report has several."""
    blocks = [render(run) for run in runs]
    if len(runs) == 1:
        return blocks[0]
    return "".join(f"<h3>run {escape(run.name)}</h3>\n{block}" for run, block in zip(runs, blocks, strict=True))


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


# Summary ------------------------------------------------------------------------------------------------


def best_candidate(best: dict, teacher: dict) -> str:
    """The best row against the teacher, in words."""
    what = (
        f"Best {'retrained candidate' if best['stage'] == 'retrained' else 'candidate of the search'}: "
        f"trial {best['name']} ({best['label']}), {best['params_pct']:.1f}% of the teacher's parameters, "
        f"KL to the teacher {pm(best, 'heldout_kl')} on the {best['heldout_split']} rows after "
        f"{best['kd_tokens']:,} KD tokens (the teacher: 0)"
    )
    if best["perplexity"] is not None and teacher["perplexity"] is not None:
        what += f", perplexity {pm(best, 'perplexity')} against the teacher's {pm(teacher, 'perplexity')}"
    if best["teacher_score_kept_pct"] is not None:
        what += f", {best['teacher_score_kept_pct']:.0f}% of the teacher's above-chance lm-eval score kept"
    if best["decode_speedup"] is not None:
        what += f", decoding at {pm(best, 'decode_speedup')}x the teacher's speed"
    return what + "."


def summary(run: Run, rows: list[dict]) -> str:
    mine = [row for row in rows if row["run"] == run.name]
    reached = sum(r.state == COMPLETE for r in run.trials)
    text = (
        f"Teacher {run.info['teacher']} ({run.teacher_params:,} parameters), searched under the budget "
        f"{run.info.get('budget', 'not recorded')}: {len(run.trials)} trials, {reached} of them reached the last rung"
    )
    if run.retrained:
        text += f"; {len(run.retrained)} candidates retrained on {run.retrain_tokens} KD tokens each"
    text += ". " + (best_candidate(mine[1], mine[0]) if len(mine) > 1 else "No candidate to compare.")
    if not run.retrained:
        text += " This run was never retrained: search-only report."
    return text


# Sections -----------------------------------------------------------------------------------------------


def plots_block(run_name: str, plots: list[Plot]) -> str:
    blocks = []
    for plot in plots:
        if plot.png is None:
            blocks.append(paragraph(f"{plot.title}: not drawn ({plot.missing}).", "missing"))
        else:
            blocks.append(
                f"<figure>{png_image(plot.png, plot.title)}<figcaption>{escape(plot.title)} "
                f"(also plots/{escape(run_name)}/{escape(plot.name)}.svg)</figcaption></figure>\n"
            )
    return "".join(blocks)


def generations(run: Run) -> str:
    if run.teacher is None or not run.retrained:
        return paragraph("No continuations: the run was never retrained.", "missing")
    by_model = [{g["prompt"]: g["text"] for g in r.generations} for r in (run.teacher, *run.retrained)]
    headers = ["prompt", "teacher", *(f"trial {r.trial} {r.label}" for r in run.retrained)]
    cells = [[g["prompt"], *(texts.get(g["prompt"], "") for texts in by_model)] for g in run.teacher.generations]
    return paragraph("Greedy continuations of fixed prompts (retrain.prompts).") + (
        f'<div class="scroll">{table(headers, cells, "generations")}</div>'
    )


def search_summary(run: Run) -> str:
    counts = Counter(outcome_text(r.state, r.stage) for r in run.trials)
    body = table(["trials", "count"], [[outcome, str(n)] for outcome, n in counts.most_common()])
    retries = [f"trial {r.trial} retried trial {r.retry_of}" for r in run.trials if r.retry_of is not None]
    if retries:
        body += paragraph("Retries of killed or interrupted trials: " + "; ".join(retries) + ".")
    body += bullets(run.info.get("search", {}).get("plan", []))
    references = [r for r in run.trials if r.reference]
    body += "<h4>References</h4>\n" + table(
        ["reference", "trial", "label", "params", "state", "note"],
        [
            [r.reference, str(r.trial), r.label, f"{100 * r.params_fraction:.1f}%", r.state, r.reference_note or ""]
            for r in references
        ],
    )
    if run.info.get("references"):  # how each reference was chosen, or why it could not be
        body += paragraph("How the references were chosen:") + bullets(run.info["references"])
    if run.zero_shot:
        body += paragraph("Candidates screened without KD for the zero-shot reference (selection rows):") + table(
            ["label", "KL to teacher"],
            [[c["label"], pm({"kl": c["heldout_kl"], "kl_stderr": c.get("stderr")}, "kl")] for c in run.zero_shot],
        )
    return body


def flatten(value, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(value, dict):
        return [item for key, inner in value.items() for item in flatten(inner, f"{prefix}{key}.")]
    return [(prefix.rstrip("."), json.dumps(value) if isinstance(value, list) else cell(value))]


def settings(run: Run) -> str:
    info = run.info
    facts = [
        ("teacher", f"{info['teacher']} ({run.teacher_params:,} parameters)"),
        ("budget", info.get("budget", "")),
        *flatten(info.get("corpus", {}), "corpus."),
        *flatten(info.get("hardware", {}), "hardware."),
        ("importance scores", info.get("importance", "")),
        ("search command", info.get("search", {}).get("command", "")),
        ("retrain command", info.get("retrain", {}).get("command", "never retrained")),
    ]
    wall = [[stage, duration(seconds)] for stage, seconds in info.get("wall_seconds", {}).items()]
    return (
        table(["setting", "value"], [[key, str(value)] for key, value in facts])
        + "<h4>Wall time per stage</h4>\n"
        + table(["stage", "wall time"], wall)
        + "<details><summary>all settings of the search (run.json)</summary>\n"
        + table(["setting", "value"], [list(item) for item in flatten(info["settings"])])
        + "</details>\n"
    )


def notes(run: Run) -> str:
    items = []
    if run.failed:
        failed = "; ".join(f"trial {r.trial}: {r.fail_reason}" for r in run.failed)
        items.append(f"{len(run.failed)} failed trial(s) left out of the leaderboard ({failed}).")
    if not run.retrained:
        items.append("This run was never retrained: search-only report.")
    items += [f"retrain/{name} has no record yet (interrupted or still running): left out." for name in run.unfinished]
    if run.teacher is not None and run.teacher.summary is not None and run.teacher.summary <= 0:
        items.append("The teacher's lm-eval summary is at or below chance: no share of it is reported.")
    return bullets(items) if items else paragraph("Nothing was left out.")


def proof_table(columns: list[str], rows: list[dict]) -> str:
    return f'<div class="scroll">{table(columns, [[cell(row.get(c)) for c in columns] for row in rows])}</div>'


def proof(run: Run) -> str:
    evidence = run.proof
    body = proof_table(evidence.columns, evidence.rows)
    if evidence.paired:
        body += "<h4>Paired comparisons</h4>\n" + proof_table(evidence.paired_columns, evidence.paired)
    body += bullets(evidence.notes)
    if evidence.image is not None:
        body += f"<figure>{png_image(evidence.image, 'search vs baselines')}</figure>\n"
    return body


# The page -----------------------------------------------------------------------------------------------


def benchmark_settings(run: Run) -> str:
    wall = [[stage, duration(seconds)] for stage, seconds in run.info.get("wall_seconds", {}).items()]
    return (
        "<h4>Wall time</h4>\n"
        + table(["stage", "wall time"], wall)
        + "<details><summary>all settings of the benchmark (run.json)</summary>\n"
        + table(["setting", "value"], [list(item) for item in flatten(run.info.get("settings", {}))])
        + "</details>\n"
    )


def page(runs: list[Run], rows: list[dict], plots: dict[str, list[Plot]]) -> str:
    names = ", ".join(run.name for run in runs)
    searches = [run for run in runs if run.kind == "search"]
    benchmarks = [
        section(
            f"Search vs baselines ({run.name})",
            proof(run) + (benchmark_settings(run) if run.kind == "baselines" else ""),
        )
        for run in runs
        if run.proof is not None
    ]
    return document(names, search_sections(searches, rows, plots) + benchmarks if searches else benchmarks)


def search_sections(runs: list[Run], rows: list[dict], plots: dict[str, list[Plot]]) -> list[str]:
    return [
        per_run(runs, lambda run: paragraph(summary(run, rows))),
        section(
            "Leaderboard",
            paragraph(
                "Search rows are scored on the selection rows after the KD tokens of the stage they reached; "
                "retrained rows on the evaluation rows (never used to choose) after the retrain budget. "
                "± is one standard error; speed-ups are timed against the teacher in alternating pairs."
            )
            + f'<div class="scroll">{html_table(rows)}</div>',
        ),
        section("Plots", per_run(runs, lambda run: plots_block(run.name, plots[run.name]))),
        section("Greedy continuations: teacher and retrained candidates", per_run(runs, generations)),
        section("Search summary", per_run(runs, search_summary)),
        section("Settings", per_run(runs, settings)),
        section("Notes", per_run(runs, notes)),
    ]


def document(names: str, sections: list[str]) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n<link rel="icon" href="data:,">\n'
        f"<title>slimnas report: {escape(names)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        f"<h1>slimnas report: {escape(names)}</h1>\n" + "".join(sections) + "</body>\n</html>\n"
    )
