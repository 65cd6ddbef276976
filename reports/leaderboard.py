"""The leaderboard: one row per model of one or more runs, built from the records, teacher first.

Search rows and retrained rows are measured on different held-out documents of the corpus (selection
documents choose, evaluation documents are never used to choose) and after different KD budgets, so
every row says which: `heldout_split`, `kd_tokens` and `stage` (a rung of the search, or retrained).
"vs best" pairs a row only with rows measured on the same documents after the same KD budget. A decode
speed-up that stayed unstable when timed again (bench.speed) says why in `decode_speedup_unstable` and is
shown as "(unstable)". `speed_engine` says what timed the speed (bench.speed.engine), and a speed-up not timed in
PyTorch is shown with it ("[llamacpp]"). Flat rows for CSV; Markdown (pandas) and the cells the page's template shows.
"""

import pandas as pd

from slimnas.core.rundir import COMPLETE, RetrainRecord, TrialRecord, architecture_columns
from slimnas.core.stats import RankAgreement, paired_difference, rank_agreement
from slimnas.core.tables import plus_minus
from slimnas.reports.runs import Run

ARCH_COLUMNS = {
    "hidden": "hidden_size",
    "ffn": "intermediate_size",
    "heads": "num_attention_heads",
    "kv": "num_key_value_heads",
    "layers": "num_hidden_layers",
}
HEAD_COLUMNS = [
    "run", "name", "stage", "reference", "label", *ARCH_COLUMNS, "params", "params_pct", "kd_tokens",
    "heldout_split", "heldout_documents", "heldout_kl", "heldout_kl_stderr", "kl_vs_best", "kl_vs_best_stderr",
    "within_noise_of_best", "perplexity", "perplexity_stderr",
]  # fmt: skip
TAIL_COLUMNS = [
    "summary", "summary_stderr", "teacher_score_kept_pct", "prefill_tokens_per_s", "decode_tokens_per_s",
    "decode_speedup", "decode_speedup_stderr", "decode_speedup_unstable", "speed_engine", "flops_ratio",
    "peak_memory_bytes",
]  # fmt: skip
TEACHER, RETRAINED = "teacher", "retrained"
LIBRARY = "block library (summed block KL, no KD)"  # the block library's prediction as a ranking (search.blocks)


def model_columns(run: Run, name: str, stage: str, record: TrialRecord | RetrainRecord | None) -> dict:
    """What a row says about the model itself; the teacher of a search-only run is known by its size only."""
    architecture = architecture_columns(record.architecture) if record else {}
    params = record.params if record else run.teacher_params
    return {
        "run": run.name,
        "name": name,
        "stage": stage,
        "reference": record.reference if record else None,
        "label": record.label if record else None,
        **{column: architecture.get(key) for column, key in ARCH_COLUMNS.items()},
        "params": params,
        "params_pct": 100 * params / run.teacher_params,
    }


def heldout_columns(heldout: dict, kd_tokens: int) -> dict:
    return {
        "kd_tokens": kd_tokens,
        "heldout_split": heldout.get("split"),
        "heldout_documents": heldout.get("documents"),
        "heldout_kl": heldout.get("kl"),
        "heldout_kl_stderr": heldout.get("kl_stderr"),
        "perplexity": heldout.get("perplexity"),
        "perplexity_stderr": heldout.get("perplexity_stderr"),
    }


def score_columns(scores: list[dict]) -> dict:
    """Every lm-eval metric as task/metric and task/metric_stderr, with the task's split."""
    columns = {}
    for score in scores:
        task, metric = score["task"], score["metric"]
        columns |= {
            f"{task}/split": f"{score['split']}, {score['pool']} pool",
            f"{task}/{metric}": score["value"],
            f"{task}/{metric}_stderr": score["stderr"],
        }
    return columns


def kept_pct(summary: float | None, teacher: RetrainRecord | None) -> float | None:
    """The share of the teacher's above-chance score kept; blank without both, or when the teacher is at chance."""
    ours = teacher.summary.get("value") if teacher else None
    if summary is None or ours is None or ours <= 0:
        return None
    return 100 * summary / ours


def engine_of(speed: dict) -> str | None:
    """What timed a record's speed; records from before the engine setting were timed in PyTorch."""
    return speed.get("engine", "torch") if speed else None


def teacher_row(run: Run) -> dict:
    teacher = run.teacher
    if teacher is None:  # search-only: the teacher's KL to itself is 0 on the selection documents too
        return (
            model_columns(run, TEACHER, TEACHER, None)
            | heldout_columns({"split": "selection", "kl": 0.0, "documents": run.selection_documents}, 0)
            | {
                "decode_speedup": 1.0,
                "flops_ratio": 1.0,
            }
        )
    return (
        model_columns(run, TEACHER, TEACHER, teacher)
        | heldout_columns({**teacher.heldout, "kl": 0.0, "kl_stderr": 0.0}, 0)  # its KL to itself: 0 by definition
        | score_columns(teacher.scores)
        | {
            "summary": teacher.summary["value"],
            "summary_stderr": teacher.summary["stderr"],
            "teacher_score_kept_pct": kept_pct(teacher.summary["value"], teacher),
            "prefill_tokens_per_s": teacher.speed.get("prefill_tokens_per_s"),
            "decode_tokens_per_s": teacher.speed.get("decode_tokens_per_s"),
            "decode_speedup": 1.0,
            "speed_engine": engine_of(teacher.speed),
            "flops_ratio": 1.0,
            "peak_memory_bytes": teacher.memory.get("peak_bytes"),
        }
    )


def retrained_row(run: Run, record: RetrainRecord) -> dict:
    """A retrained candidate: its full-budget KD and its scores on the evaluation rows and lm-eval."""
    speed = record.speed
    return (
        model_columns(run, str(record.trial), RETRAINED, record)
        | heldout_columns(record.heldout, record.kd_tokens)
        | score_columns(record.scores)
        | {
            "summary": record.summary["value"],
            "summary_stderr": record.summary["stderr"],
            "teacher_score_kept_pct": kept_pct(record.summary["value"], run.teacher),
            "prefill_tokens_per_s": speed["model"].get("prefill_tokens_per_s"),
            "decode_tokens_per_s": speed["model"].get("decode_tokens_per_s"),
            "decode_speedup": speed.get("decode_speedup"),
            "decode_speedup_stderr": speed.get("decode_speedup_stderr"),
            "decode_speedup_unstable": speed.get("unstable"),
            "speed_engine": engine_of(speed),
            "flops_ratio": run.teacher.flops_per_token / record.flops_per_token,
            "peak_memory_bytes": record.memory.get("peak_bytes"),
        }
    )


def search_row(run: Run, record: TrialRecord) -> dict:
    """A trial as the search left it: measured at the last rung it reached, on the selection documents. Its lm-eval
    scores (search.score_trials) are on the selection pool, so no share of the teacher's score is claimed."""
    final = record.final
    last = record.rungs[-1]["heldout"] if record.rungs else {}
    return (
        model_columns(run, str(record.trial), f"rung {record.rung}", record)
        | heldout_columns(
            {**last, "kl": final.get("heldout_kl"), "kl_stderr": final.get("heldout_kl_stderr")}, record.kd_tokens
        )  # fmt: skip
        | score_columns(record.scores)
        | {
            "summary": final.get("summary"),
            "summary_stderr": final.get("summary_stderr"),
            "prefill_tokens_per_s": final.get("prefill_tokens_per_s"),
            "decode_tokens_per_s": final.get("decode_tokens_per_s"),
            "decode_speedup": final.get("decode_speedup"),
            "decode_speedup_stderr": final.get("decode_speedup_stderr"),
            "decode_speedup_unstable": record.speed.get("unstable"),
            "speed_engine": engine_of(record.speed),
            "flops_ratio": record.speed.get("flops_reduction"),
        }
    )


def against_best(rows: list[dict], per_doc: list[list[float]], groups: list[tuple]) -> None:
    """KL minus the best row's of its group, paired over the same documents; within noise under two standard errors.

    A group is rows measured on the same documents after the same KD budget: nothing else pairs.
    """
    for group in set(groups):
        members = [i for i, g in enumerate(groups) if g == group]
        best = min(members, key=lambda i: rows[i]["heldout_kl"])
        for i in members:
            difference, stderr = paired_difference(per_doc[i], per_doc[best])
            rows[i] |= {
                "kl_vs_best": difference,
                "kl_vs_best_stderr": stderr,
                "within_noise_of_best": bool(abs(difference) <= 2 * stderr) if stderr == stderr else None,
            }


def run_rows(run: Run) -> list[dict]:
    """Teacher, the retrained candidates (best held-out KL first), then the other trials by rung reached and
    quality (failed trials are left out: the page counts them)."""
    retrained = sorted(run.retrained, key=lambda r: r.heldout["kl"])
    numbers = {r.trial for r in retrained}
    searched = sorted(
        (r for r in run.candidates if r.trial not in numbers),
        key=lambda r: (-r.rung, -r.final.get("quality", float("-inf")), r.trial),
    )
    retrained_rows = [retrained_row(run, r) for r in retrained]
    against_best(
        retrained_rows, [r.heldout["kl_per_doc"] for r in retrained],
        [(r.kd_tokens, r.corpus.get("fingerprint")) for r in retrained],
    )  # fmt: skip
    searched_rows = [search_row(run, r) for r in searched]
    complete = [(row, r) for row, r in zip(searched_rows, searched, strict=True) if r.state == COMPLETE]
    against_best(
        [row for row, _ in complete], [r.final["kl_per_doc"] for _, r in complete], [r.kd_tokens for _, r in complete]
    )
    return [teacher_row(run), *retrained_rows, *searched_rows]


def leaderboard_rows(runs: list[Run]) -> list[dict]:
    """Every run's rows, each row with every column (blank where a run or a stage has no value)."""
    rows = [row for run in runs for row in run_rows(run)]
    task_columns = list(dict.fromkeys(key for row in rows for key in row if "/" in key))
    columns = HEAD_COLUMNS + task_columns + TAIL_COLUMNS
    return [{column: row.get(column) for column in columns} for row in rows]


def rank_fidelity(run: Run) -> list[dict]:
    """How well each rung of the search, and the block library's prediction (search.blocks: summed block KL, no KD),
    ranked the retrained candidates: Spearman and Kendall against the retrained KL (evaluation documents), over the
    retrained candidates that have the rung's KL (selection documents) or a prediction."""
    trials = {r.trial: r for r in run.trials}
    retrained = [r for r in run.retrained if r.trial in trials]
    rankings = {
        f"rung {rung}" + (" (the screen, no KD)" if rung == 0 else ""): {
            r.trial: x["heldout"]["kl"] for r in retrained for x in trials[r.trial].rungs if x["rung"] == rung
        }
        for rung in sorted({rung["rung"] for r in retrained for rung in trials[r.trial].rungs})
    }
    rankings[LIBRARY] = {r.trial: trials[r.trial].predicted_kl for r in retrained}
    rows = []
    for name, early in rankings.items():
        pairs = [(early[r.trial], r.heldout["kl"]) for r in retrained if early.get(r.trial) is not None]
        if (found := rank_agreement(pairs)) is not None:
            rows.append(fidelity_row(name, found))
    return rows


def library_fidelity(run: Run) -> dict | None:
    """How well the block library's prediction ranked the trials that reached the last rung, against their KL
    there (selection documents); None without predictions (not a per-layer study with search.blocks)."""
    final = [r for r in run.trials if r.state == COMPLETE and r.predicted_kl is not None]
    pairs = [(r.predicted_kl, r.final["heldout_kl"]) for r in final]
    found = rank_agreement(pairs)
    return None if found is None else fidelity_row(LIBRARY, found)


def fidelity_row(name: str, found: RankAgreement) -> dict:
    return {"rung": name, "candidates": found.n, "spearman": found.spearman, "kendall": found.kendall}


# Reading: Markdown and the page's cells, values with their error bars and the documents they were measured on -----


def task_metrics(rows: list[dict]) -> list[tuple[str, str]]:
    """(task, metric) pairs of the score columns, in column order."""
    columns = rows[0] if rows else {}
    return [
        tuple(column.split("/")) for column in columns if "/" in column and not column.endswith(("/split", "_stderr"))
    ]


def pm(row: dict, column: str, suffix: str = "") -> str:
    """A row's value with its stderr, blank when there is none."""
    text = plus_minus(row[column], row.get(f"{column}_stderr")) if row[column] is not None else ""
    return f"{text}{suffix}" if text else ""


def speedup_suffix(row: dict) -> str:
    """'x', with '(unstable)' when it stayed so, and the engine when it is not PyTorch."""
    suffix = "x (unstable)" if row["decode_speedup_unstable"] else "x"
    engine = row["speed_engine"]
    return suffix if engine in (None, "torch") else f"{suffix} [{engine}]"


def vs_best(row: dict) -> str:
    """'best', or the paired difference to the best with '(within noise)' when under two standard errors."""
    if row.get("kl_vs_best") is None:
        return ""
    if row["kl_vs_best"] == 0 and not row["kl_vs_best_stderr"]:
        return "best"
    return pm(row, "kl_vs_best", " (within noise)" if row["within_noise_of_best"] else "")


def number(value: float | None, template: str) -> str:
    return "" if value is None or value != value else template.format(value)


def mib(value: int | None) -> str:
    return "" if value is None or value != value else f"{value / 2**20:.1f} MiB"


def display_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Headers and text cells; a 'run' column only when the rows come from several runs."""
    several = len({row["run"] for row in rows}) > 1
    tasks = task_metrics(rows)
    splits = {task: "/".join(sorted({r[f"{task}/split"] for r in rows if r[f"{task}/split"]})) for task, _ in tasks}
    headers = [
        *(["run"] if several else []), "name", "stage", "reference", "label", "params", "KD tokens",
        "held-out documents", "KL to teacher", "KL vs best (paired)", "perplexity",
        *(f"{task} {metric} [{splits[task]}]" for task, metric in tasks), "summary",
        "teacher score kept", "decode speed-up", "FLOPs ratio", "decode tok/s", "peak memory",
    ]  # fmt: skip
    cells = [
        [
            *([row["run"]] if several else []),
            row["name"],
            row["stage"],
            row["reference"] or "",
            row["label"] or "",
            f"{row['params']:,} ({row['params_pct']:.1f}%)",
            f"{row['kd_tokens']:,}",
            f"{row['heldout_documents'] or ''} {row['heldout_split'] or ''}".strip(),
            pm(row, "heldout_kl"),
            vs_best(row),
            pm(row, "perplexity"),
            *(pm(row, f"{task}/{metric}") for task, metric in tasks),
            pm(row, "summary"),
            number(row["teacher_score_kept_pct"], "{:.0f}%"),
            pm(row, "decode_speedup", speedup_suffix(row)),
            number(row["flops_ratio"], "{:.2f}x"),
            number(row["decode_tokens_per_s"], "{:,.0f}"),
            mib(row["peak_memory_bytes"]),
        ]  # fmt: skip
        for row in rows
    ]
    return headers, cells


def markdown(rows: list[dict]) -> str:
    """GitHub Markdown table of the leaderboard (pandas, through tabulate)."""
    headers, cells = display_table(rows)
    return pd.DataFrame(cells, columns=headers).to_markdown(index=False) + "\n"
