"""The report's figures, drawn from one run's records: what the search found and what retraining bought.

Every axis says what it plots and on which documents: search trials are scored on the selection
documents after the KD tokens of the rung they reached; retrained candidates on the evaluation documents
after the retrain budget. Fronts are the ones the search stored (front.json), never recomputed here.
A speed-up that stayed unstable when timed again (bench.speed) is drawn hollow, with a note, and never
marked as on the front in the speed plot. A run of per-layer candidates (search.proposals=per_layer) also gets a
heat map of its finalists' per-layer widths, shown beside the front; other runs have none.
Figures use matplotlib's object API on the Agg canvas (no pyplot, no display, no global state) and are
kept as PNG and SVG bytes, so nothing is written until the whole report is ready.
"""

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import BoundaryNorm, Colormap, Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, MaxNLocator

from slimnas.core.files import atomic_path
from slimnas.core.rundir import COMPLETE, RetrainRecord, TrialRecord
from slimnas.reports.runs import Run

ACCURACY_METRICS = ("acc", "acc_norm")
FRONT_LABEL = "Pareto front"
Measure = Callable[[TrialRecord | RetrainRecord], float | None]  # where a record goes on an axis


@dataclass(frozen=True)
class Plot:
    name: str  # file stem under plots/RUN/
    title: str
    png: bytes | None
    svg: bytes | None
    missing: str | None  # why it was not drawn
    beside_front: bool = False  # shown beside the front (the finalists' per-layer widths), not with the other plots


# What the axes show ------------------------------------------------------------------------------------


def quality_axis(run: Run) -> str:
    if run.quality_metric == "summary":
        return "quality = lm-eval summary score of the trial (accuracy above chance)"
    return f"quality = -KL to teacher ({run.selection_documents} selection documents)"


def retrained_quality(run: Run, record: RetrainRecord) -> tuple[float | None, float | None]:
    """A retrained candidate's quality in the search's terms, measured on the evaluation documents."""
    if run.quality_metric == "summary":
        return record.summary["value"], record.summary["stderr"]
    return -record.heldout["kl"], record.heldout["kl_stderr"]


def retrained_label(run: Run) -> str:
    what = "lm-eval summary score" if run.quality_metric == "summary" else "-KL on the evaluation documents"
    return f"retrained: {what}, after {run.retrain_tokens} KD tokens"


def teacher_quality(run: Run) -> float | None:
    """The teacher's own quality: KL 0 to itself; its summary score only when retrain scored it."""
    if run.quality_metric == "summary":
        return run.teacher.summary["value"] if run.teacher else None
    return 0.0


def ranked(run: Run) -> list[TrialRecord]:
    return [r for r in run.candidates if "quality" in r.final]


def by_rung(trials: list[TrialRecord]) -> dict[int, list[TrialRecord]]:
    """Trials grouped by the rung they reached, furthest first."""
    return {rung: [r for r in trials if r.rung == rung] for rung in sorted({r.rung for r in trials}, reverse=True)}


def rung_label(rung: int, trials: list[TrialRecord]) -> str:
    return f"trials that reached rung {rung} ({trials[0].kd_tokens:,} KD tokens)"


def rung_colors(run: Run) -> dict[int, tuple]:
    rungs = sorted({r.rung for r in run.candidates})
    cmap = colormaps["viridis"]
    return {rung: cmap(0.85 * i / max(1, len(rungs) - 1)) for i, rung in enumerate(rungs)}


def new_axes(figsize: tuple[float, float] = (8.0, 5.2)) -> tuple[Figure, Axes]:
    figure = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    ax.grid(True, alpha=0.3)
    return figure, ax


def legend_below(figure: Figure) -> None:
    figure.legend(loc="outside lower center", ncols=2, fontsize=8, frameon=False)


# The series the quality plots share: trials by stage reached, reference names, retrained ones, the teacher --


def draw_trials(ax: Axes, run: Run, trials: list[TrialRecord], x: Measure, xerr: Measure | None = None) -> None:
    """Trials against their quality (± stderr), one colour per rung reached; references named."""
    colors = rung_colors(run)
    for rung, group in by_rung(trials).items():
        ax.errorbar(
            [x(r) for r in group], [r.final["quality"] for r in group],
            yerr=[r.final.get("quality_stderr") or 0.0 for r in group],
            xerr=[xerr(r) or 0.0 for r in group] if xerr else None,
            fmt="o", color=colors[rung], alpha=0.8, label=rung_label(rung, group),
        )  # fmt: skip
    references = sorted((x(r), r.final["quality"], r.reference) for r in trials if r.reference)
    for i, (at_x, at_y, name) in enumerate(references):  # alternately above and below: neighbours do not collide
        offset = (6, 8) if i % 2 == 0 else (6, -14)
        ax.annotate(name, (at_x, at_y), textcoords="offset points", xytext=offset, fontsize=8, color="0.25")


def draw_retrained(
    ax: Axes, run: Run, x: Measure, xerr: Measure | None = None, records: list[RetrainRecord] | None = None
) -> None:
    """The retrained candidates (or those of `records`) against their quality on the evaluation documents."""
    scored = [r for r in (run.retrained if records is None else records) if retrained_quality(run, r)[0] is not None]
    if not scored:
        return
    qualities = [retrained_quality(run, r) for r in scored]
    ax.errorbar(
        [x(r) for r in scored], [quality for quality, _ in qualities], yerr=[stderr or 0.0 for _, stderr in qualities],
        xerr=[xerr(r) or 0.0 for r in scored] if xerr else None, fmt="D", color="tab:red", label=retrained_label(run),
    )  # fmt: skip


def draw_teacher(ax: Axes, run: Run, x: float, label: str) -> None:
    if (quality := teacher_quality(run)) is not None:
        ax.plot([x], [quality], "*", color="tab:orange", markersize=14, label=label)


# The plots ----------------------------------------------------------------------------------------------


def front_points(run: Run) -> list[tuple[int, float]]:
    """(params, quality) of the stored front's quality-vs-parameters subset (the whole front with two objectives),
    by size: the step line of the quality-vs-parameters plot."""
    return sorted((r.params, r.final["quality"]) for r in run.members("quality_params"))


def quality_vs_params(run: Run) -> Figure | None:
    trials = ranked(run)
    if not trials:
        return None
    figure, ax = new_axes()
    draw_trials(ax, run, trials, lambda r: r.params)
    if front := front_points(run):
        objectives = run.front["objectives"]
        subset = "" if objectives == ["quality", "params"] else f", of the front over {', '.join(objectives)}"
        ax.plot(
            *zip(*front, strict=True), drawstyle="steps-post", color="k", marker="s", markerfacecolor="none",
            markersize=9, label=f"{FRONT_LABEL} (quality, params{subset})",
        )  # fmt: skip
    draw_retrained(ax, run, lambda r: r.params)
    draw_teacher(ax, run, run.teacher_params, "teacher")
    ax.xaxis.set_major_formatter(EngFormatter())
    ax.set(xlabel="parameters", ylabel=quality_axis(run), title="Quality vs parameters")
    legend_below(figure)
    return figure


def unstable(record: TrialRecord | RetrainRecord) -> bool:
    """Its decode speed-up stayed unstable when timed again (bench.speed)."""
    return bool(record.speed.get("unstable"))


def draw_unstable(ax: Axes, run: Run, trials: list[TrialRecord], retrained: list[RetrainRecord]) -> None:
    """Speed-ups still unstable when timed again: hollow markers without error bars, and a note in the legend."""
    retrained = [r for r in retrained if retrained_quality(run, r)[0] is not None]
    if not trials and not retrained:
        return
    speed = run.info["settings"].get("speed", {})
    note = (
        f"speed-up unstable after {speed.get('retimes', 0) + 1} timings (error bar over "
        f"{speed.get('stable_stderr', 0):.0%} of it, or over {speed.get('stable_flops_ratio')}x the FLOPs ratio): "
        "hollow, kept off the speed front"
    )
    colors = rung_colors(run)
    ax.scatter(
        [r.final["decode_speedup"] for r in trials], [r.final["quality"] for r in trials], marker="o", s=49,
        facecolors="none", edgecolors=[colors[r.rung] for r in trials], label=note if trials else None,
    )  # fmt: skip
    ax.scatter(
        [r.speed["decode_speedup"] for r in retrained], [retrained_quality(run, r)[0] for r in retrained], marker="D",
        s=49, facecolors="none", edgecolors="tab:red", label=None if trials else note,
    )  # fmt: skip


def quality_vs_speedup(run: Run) -> Figure | None:
    trials = [r for r in ranked(run) if r.final.get("decode_speedup") is not None]
    if not trials and not run.retrained:
        return None
    figure, ax = new_axes()
    stable = [r for r in trials if not unstable(r)]
    draw_trials(ax, run, stable, lambda r: r.final["decode_speedup"], lambda r: r.final.get("decode_speedup_stderr"))
    if members := [r for r in run.members() if r.trial in {s.trial for s in stable}]:
        objectives = ", ".join(run.front["objectives"])
        ax.plot([r.final["decode_speedup"] for r in members], [r.final["quality"] for r in members], "s", color="k",
                markerfacecolor="none", markersize=11, label=f"on the {FRONT_LABEL} ({objectives})")  # fmt: skip
    draw_retrained(
        ax, run, lambda r: r.speed["decode_speedup"], lambda r: r.speed.get("decode_speedup_stderr"),
        [r for r in run.retrained if not unstable(r)],
    )  # fmt: skip
    draw_unstable(ax, run, [r for r in trials if unstable(r)], [r for r in run.retrained if unstable(r)])
    draw_teacher(ax, run, 1.0, "teacher (1x)")
    speed = run.info["settings"].get("speed", {})
    ax.set(
        xlabel=f"decode speed-up vs the teacher (timed in ABBA blocks, batch {speed.get('batch_size')}, "
        f"{speed.get('new_tokens')} new tokens, {run.info.get('hardware', {}).get('device')})",
        ylabel=quality_axis(run),
        title="Quality vs measured decode speed-up",
    )
    legend_below(figure)
    return figure


def best_so_far(trials: list[TrialRecord]) -> list[tuple[int, float]]:
    """(trial number, best quality so far) among the trials that reached the last rung."""
    points, best = [], float("-inf")
    for record in sorted(trials, key=lambda r: r.trial):
        if record.state == COMPLETE and record.final["quality"] > best:
            best = record.final["quality"]
            points.append((record.trial, best))
    return points


def search_history(run: Run) -> Figure | None:
    trials = ranked(run)
    if not trials:
        return None
    figure, ax = new_axes()
    draw_trials(ax, run, trials, lambda r: r.trial)
    if best := best_so_far(trials):
        steps = [*best, (max(r.trial for r in trials), best[-1][1])]
        ax.plot(*zip(*steps, strict=True), drawstyle="steps-post", color="k", label="best so far (last rung)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="trial number", ylabel=quality_axis(run), title="Search history")
    legend_below(figure)
    return figure


def legend_label(label: str, width: int = 40) -> str:
    """A model's label in a legend, cut to `width` characters: a per-layer candidate's spells out every layer."""
    return label if len(label) <= width else label[: width - 1] + "…"


def kd_curves(run: Run) -> Figure | None:
    curves = [(r, run.kd_curves.get(r.name, [])) for r in run.retrained]
    if not any(points for _, points in curves):
        return None
    figure, ax = new_axes()
    for record, points in curves:
        tokens = [p["kd_tokens"] for p in points]
        kl = [p["kl"] for p in points]
        stderr = [p.get("kl_stderr") or 0.0 for p in points]
        line = ax.plot(tokens, kl, "o-", markersize=3, label=f"trial {record.trial} {legend_label(record.label)}")[0]
        low, high = [k - s for k, s in zip(kl, stderr, strict=True)], [k + s for k, s in zip(kl, stderr, strict=True)]
        ax.fill_between(tokens, low, high, color=line.get_color(), alpha=0.15)
    documents = run.info.get("corpus", {}).get("evaluation_documents")
    ax.xaxis.set_major_formatter(EngFormatter())
    ax.set(
        xlabel="KD tokens (retraining)",
        ylabel=f"KL to teacher ({documents} evaluation documents)",
        title="Retraining: KD curves",
    )
    legend_below(figure)
    return figure


def accuracy_scores(record: RetrainRecord) -> dict[tuple[str, str], dict]:
    return {(s["task"], s["metric"]): s for s in record.scores if s["metric"] in ACCURACY_METRICS}


def tick_label(pair: tuple[str, str], scores: dict[str, dict]) -> str:
    """task, metric, split and documents scored (the first model that has the pair tells split and n)."""
    score = next(by_pair[pair] for by_pair in scores.values() if pair in by_pair)
    return f"{pair[0]}\n{pair[1]} ({score['split']}, {score['pool']} pool, n={score['n']})"


def task_scores(run: Run) -> Figure | None:
    models = [("teacher", run.teacher)] if run.teacher else []
    models += [(f"trial {r.trial} {legend_label(r.label)}", r) for r in run.retrained]
    scores = {name: accuracy_scores(record) for name, record in models}
    pairs = list(dict.fromkeys(pair for by_pair in scores.values() for pair in by_pair))
    if not run.retrained or not pairs:
        return None
    figure, ax = new_axes((max(8.0, 3.0 + 0.5 * len(pairs) * len(models)), 5.2))
    width = 0.8 / len(models)
    for i, (name, by_pair) in enumerate(scores.items()):
        found = [by_pair.get(pair) for pair in pairs]
        ax.bar(
            [j + (i - (len(models) - 1) / 2) * width for j in range(len(pairs))],
            [s["value"] if s else float("nan") for s in found], width,
            yerr=[(s["stderr"] or 0.0) if s else 0.0 for s in found], capsize=3, label=name,
        )  # fmt: skip
    ax.set_xticks(range(len(pairs)), [tick_label(pair, scores) for pair in pairs])
    ax.set(ylabel="accuracy (lm-eval), ± stderr", ylim=(0, 1.05), title="Per-task accuracy vs the teacher")
    legend_below(figure)
    return figure


# Per-layer shapes -----------------------------------------------------------------------------------------


def per_layer(run: Run) -> bool:
    """Whether the run's candidates are per-layer shapes (search.proposals=per_layer): their sizes are lists."""
    return any(isinstance(r.architecture.get("intermediate_size"), list) for r in run.trials)


def finalists(run: Run) -> list[TrialRecord]:
    """The retrained candidates' trials, best retrained KL first; in a run never retrained, the trials that reached
    the last rung, best quality first."""
    if run.retrained:
        trials = {r.trial: r for r in run.trials}
        return [trials[r.trial] for r in sorted(run.retrained, key=lambda r: r.heldout["kl"])]
    return sorted((r for r in run.trials if r.state == COMPLETE), key=lambda r: (-r.final["quality"], r.trial))


def layer_sizes(record: TrialRecord, layers: int) -> tuple[list[int], list[int]]:
    """FFN neurons and KV groups a candidate keeps in each of the teacher's layers (0: removed), read from its pruning
    plan: a uniform candidate (a reference) is placed on the layers it kept, like a per-layer one."""
    ffn, kv = [0] * layers, [0] * layers
    for j, layer in enumerate(record.plan["layers"]):
        ffn[layer], kv[layer] = len(record.plan["neurons"][j]), len(record.plan["kv_heads"][j])
    return ffn, kv


def draw_heat_map(
    figure: Figure, ax: Axes, values: np.ma.MaskedArray, cmap: Colormap, norm: Normalize, ticks: list | None = None
) -> None:
    """One panel: a cell per candidate and layer, removed sub-blocks (masked) grey with a cross."""
    image = ax.imshow(values, cmap=cmap.with_extremes(bad="0.88"), norm=norm, aspect="auto", interpolation="none")
    for row, column in zip(*np.nonzero(np.ma.getmaskarray(values)), strict=True):
        ax.text(column, row, "×", ha="center", va="center", color="0.35", fontsize=9)
    figure.colorbar(image, ax=ax, pad=0.01, ticks=ticks)


def layer_widths(run: Run) -> Figure | None:
    """The finalists' per-layer widths: FFN width as a fraction of the teacher's, and KV groups kept."""
    rows, teacher = finalists(run), run.info.get("teacher_architecture")
    if not rows or teacher is None:
        return None
    layers, groups = teacher["num_hidden_layers"], teacher["num_key_value_heads"]
    sizes = [layer_sizes(r, layers) for r in rows]
    ffn = np.ma.masked_equal([[width / teacher["intermediate_size"] for width in f] for f, _ in sizes], 0)
    kv = np.ma.masked_equal([k for _, k in sizes], 0)
    figure = Figure(figsize=(max(8.0, 3.0 + 0.28 * layers), 2.2 + 0.6 * len(rows)), layout="constrained")
    FigureCanvasAgg(figure)
    top, bottom = figure.subplots(2, 1, sharex=True)
    draw_heat_map(figure, top, ffn, colormaps["viridis"], Normalize(0, 1))
    one_colour_per_count = BoundaryNorm(np.arange(0.5, groups + 1), groups)
    draw_heat_map(figure, bottom, kv, colormaps["viridis"].resampled(groups), one_colour_per_count,
                  list(range(1, groups + 1)))  # fmt: skip
    names = [f"trial {r.trial} ({r.reference or r.proposed_by})" for r in rows]
    for ax in (top, bottom):
        ax.set_yticks(range(len(rows)), names, fontsize=8)
    top.set_title(f"FFN width as a fraction of the teacher's {teacher['intermediate_size']:,} neurons (× removed)")
    bottom.set_title(f"KV groups kept, of the teacher's {groups} (× attention removed)")
    bottom.set_xticks(range(layers), [str(i) for i in range(layers)], fontsize=8)
    bottom.set_xlabel("layer")
    which = "retrained candidates, best first" if run.retrained else "trials that reached the last rung, best first"
    figure.suptitle(f"Per-layer widths of the finalists ({which})")
    return figure


# Rendering ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    name: str
    title: str
    draw: Callable[[Run], Figure | None]
    missing: str  # said on the page when draw has nothing to draw
    beside_front: bool = False


SPECS = (
    Spec("quality_vs_params", "Quality vs parameters", quality_vs_params, "no trial has a quality yet"),
    Spec(
        "quality_vs_speedup", "Quality vs decode speed-up", quality_vs_speedup,
        "no speed-up was measured (search.measure_speed=false and never retrained)",
    ),
    Spec("search_history", "Search history", search_history, "no trial has a quality yet"),
    Spec("kd_curves", "KD curves of the retrained candidates", kd_curves, "never retrained: no KD curves"),
    Spec(
        "task_scores", "Per-task scores vs the teacher", task_scores,
        "no lm-eval accuracy of retrained candidates (never retrained, or quality.tasks had none)",
    ),
)  # fmt: skip


LAYER_WIDTHS = Spec(  # per-layer runs only
    "layer_widths", "Per-layer widths of the finalists", layer_widths,
    "no finalist yet (no trial reached the last rung)", beside_front=True,
)  # fmt: skip


def image(figure: Figure, fmt: str) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format=fmt, dpi=110, metadata={"Software": None} if fmt == "png" else {"Date": None})
    return buffer.getvalue()


def draw_plots(run: Run) -> list[Plot]:
    """Every plot of the run (the per-layer widths only for per-layer candidates), drawn or said missing."""
    plots = []
    for spec in [*SPECS, LAYER_WIDTHS] if per_layer(run) else SPECS:
        figure = spec.draw(run)
        if figure is None:
            plots.append(Plot(spec.name, spec.title, None, None, spec.missing, spec.beside_front))
        else:
            plots.append(
                Plot(spec.name, spec.title, image(figure, "png"), image(figure, "svg"), None, spec.beside_front)
            )
    return plots


def write_plots(plots: list[Plot], folder: Path) -> None:
    """PNG and SVG of each drawn plot; files of plots not drawn this time are removed."""
    for plot in plots:
        for suffix, data in ((".png", plot.png), (".svg", plot.svg)):
            path = folder / f"{plot.name}{suffix}"
            if data is None:
                path.unlink(missing_ok=True)
                continue
            with atomic_path(path) as staging:
                staging.write_bytes(data)
