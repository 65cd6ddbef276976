"""The tables a pipeline leaves beside its stages: teacher correction, and the chain of prune-distill stages.

Both are sections (RUN_DIR/NAME/NAME.json + NAME.png) that the report shows as they are. Every number is
on the evaluation documents (never used to choose) or lm-eval's evaluation pool, read from the retrain
records: "KL to original" is each model's KL from the original teacher (retrain.reference_teacher),
"KL to its teacher" from the teacher of its own stage.
"""

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from slimnas.core.files import atomic_path, write_json
from slimnas.core.rundir import (
    RECORD_FILE,
    REFERENCE,
    REFERENCE_DIR,
    TEACHER,
    RetrainRecord,
    original_teacher_record,
    read_front,
    read_model_record,
    read_records,
    read_retrain_record,
    read_retrained,
    read_run,
    retrain_dir,
    search_pick,
    section_file,
)
from slimnas.core.tables import plus_minus
from slimnas.reports.plots import image, legend_below


def to_original(record: RetrainRecord) -> dict:
    """The record's held-out metrics against the original teacher (itself: KL 0)."""
    return record.heldout_other.get(REFERENCE, record.heldout)


def retrained_pick(stage: Path) -> RetrainRecord:
    """The stage's search pick, retrained (retrain.top_k >= 1 retrains it first): a chain's next teacher, the row
    of the chain's table, an arm's final student."""
    pick = search_pick(stage, read_records(stage))
    return next(r for r in read_retrained(stage) if r.trial == pick.trial)


def model_row(name: str, record: RetrainRecord, original_params: int) -> dict:
    original = to_original(record)
    return {
        "model": name,
        "params %": f"{100 * record.params / original_params:.1f}",
        "KL to original": plus_minus(original["kl"], original["kl_stderr"]),
        "KL to its teacher": plus_minus(record.heldout["kl"], record.heldout["kl_stderr"]),
        "perplexity": plus_minus(record.heldout["perplexity"], record.heldout["perplexity_stderr"]),
        "lm-eval summary": plus_minus(record.summary["value"], record.summary["stderr"]),
    }


def _save(run_dir: Path, name: str, values: dict, figure=None) -> None:
    write_json(section_file(run_dir, name), values)
    if figure is not None:
        with atomic_path(section_file(run_dir, name).with_suffix(".png")) as staging:
            staging.write_bytes(image(figure, "png"))


def write_correction(run_dir: Path, stage_dirs: list[Path]) -> None:
    """The original and the corrected teacher side by side, then every retrained student against both."""
    corrected_model = Path(read_run(stage_dirs[0])["teacher"])  # the first stage's teacher
    original = original_teacher_record(stage_dirs[0])
    corrected = read_retrain_record(retrain_dir(stage_dirs[0], TEACHER) / RECORD_FILE)
    tokens = read_model_record(corrected_model)["result"]["tokens"]
    params = original.params
    rows = [model_row("original teacher", original, params), model_row("corrected teacher", corrected, params)]
    rows[0].update({"KL to original": "0", "KL to its teacher": ""})  # itself: 0 by definition (not bf16 rounding)
    rows[1]["KL to its teacher"] = "0"
    for stage in stage_dirs:
        for record in read_retrained(stage):
            if record.name != TEACHER:
                rows.append(model_row(f"{stage.name}/{record.name} {record.label}", record, params))
    evaluation = corrected.heldout["documents"]
    notes = [
        f"KL to original: from the original teacher's distribution, on {evaluation} evaluation documents; KL to its "
        "teacher: from the corrected teacher's (a chain's later stages: from the stage's own teacher)",
        f"the corrected teacher: {tokens:,} tokens of next-token loss on the KD corpus's train documents "
        f"({corrected_model})",
    ]
    _save(run_dir, "correction", {"columns": list(rows[0]), "rows": rows, "notes": notes})


def teacher_name(stage: Path, number: int) -> str:
    if number > 1:
        return f"stage {number - 1}'s pick"
    return "the corrected teacher" if (stage / REFERENCE_DIR).is_dir() else "the original"


def write_chain(run_dir: Path, stage_dirs: list[Path], original_params: int) -> None:
    """One row per stage (its teacher, its pick retrained) and a plot of every stage against the original."""
    original = original_teacher_record(stage_dirs[0])
    rows = [model_row("original teacher", original, original_params)]
    rows[0].update({"stage": "original", "KL to original": "0", "KL to its teacher": ""})  # itself: 0 by definition
    figure = Figure(figsize=(11.0, 4.8), layout="constrained")
    FigureCanvasAgg(figure)
    fronts, finals = figure.subplots(1, 2)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    for number, stage in enumerate(stage_dirs, 1):
        records, retrained = read_records(stage), read_retrained(stage)
        teacher = next(r for r in retrained if r.name == TEACHER)
        student = retrained_pick(stage)
        spent = sum(r.kd_tokens for r in records)
        rows.append(
            {
                "stage": number,
                "teacher": f"{teacher_name(stage, number)}: {teacher.label} "
                f"({100 * teacher.params / original_params:.1f}%)",
                "pick": student.label,
                **model_row(student.label, student, original_params),
                "KD tokens (search + retrain)": f"{spent:,} + {student.kd_tokens:,}",
            }
        )
        color = colors[(number - 1) % len(colors)]
        front = [r for r in records if r.trial in read_front(stage)["quality_params"]]
        fronts.plot(
            [100 * r.params / original_params for r in front], [-r.final["quality"] for r in front], "o-",
            color=color, label=f"stage {number}: search front (KL to its teacher, selection documents)",
        )  # fmt: skip
        students = [r for r in retrained if r.name != TEACHER]
        finals.errorbar(
            [100 * r.params / original_params for r in students], [to_original(r)["kl"] for r in students],
            yerr=[1.96 * to_original(r)["kl_stderr"] for r in students], fmt="s", color=color, alpha=0.6,
            label=f"stage {number}: retrained (KL to the original, evaluation documents, 95% CI)",
        )  # fmt: skip
        finals.plot([100 * student.params / original_params], [to_original(student)["kl"]], "*", color=color,
                    markersize=14)  # fmt: skip
    finals.plot([100], [0], "k^", markersize=9, label="original teacher")
    for ax, title in ((fronts, "each stage's search"), (finals, "retrained students (★ the stage's pick)")):
        ax.set_xlabel("parameters, % of the original teacher")
        ax.set_ylabel("held-out KL")
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
    legend_below(figure)
    columns = ["stage", "teacher", "params %", "KL to original", "KL to its teacher", "perplexity", "lm-eval summary",
               "KD tokens (search + retrain)", "pick"]  # fmt: skip
    notes = [
        "each stage's pick (the search's, chosen on selection documents) retrained is the next stage's teacher; "
        "importance, logit cache and screen are recomputed for it",
        "KL to original and perplexity on the evaluation documents; lm-eval on its evaluation pool",
    ]
    _save(run_dir, "chain", {"columns": columns, "rows": rows, "notes": notes}, figure)
