"""The model card (README.md) of a retrained checkpoint, written with huggingface_hub's model-card API.

Its YAML metadata is what the hub reads: `model-index` evaluation results with their splits (held-out
KL and perplexity on the evaluation documents, lm-eval on the evaluation pool), the original teacher as the
base model, and a `slimnas` block with the pruning plan's shape, the KD tokens and the corpus. The hub reads
`base_model` and `datasets` as hub ids, so they name one or are left out: never a local path or slimnas's
name of its default teacher. The text repeats the numbers beside the teacher's and says how the teacher
was made from the original (a corrected teacher, a chain's earlier student). A per-layer (heterogeneous)
student's card adds its shape layer by layer, as a table and as a plot of the widths (WIDTHS_PLOT, beside
README.md), and says that it loads after `import slimnas.models`.
"""

import io
import re
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from slimnas.compress.arch import Architecture, LayerShape, PerLayerArchitecture, shape_of
from slimnas.compress.models import DEFAULT_TEACHER, DEFAULT_TEACHER_HUB_ID, GGUF_FILE
from slimnas.core.files import atomic_path
from slimnas.core.rundir import RetrainRecord, read_model_record
from slimnas.core.tables import plus_minus

WIDTHS_PLOT = "widths_by_layer.png"  # a per-layer student's widths by layer, beside its README.md
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # org/name, as load_model reads a name that is not a directory

TEMPLATE = """---
{{ card_data }}
---

# {{ name }}: a pruned and distilled {{ title }}

Structured pruning (Minitron importance) plus logit knowledge distillation by slimnas.
{%- if layers %}
Each layer has a shape of its own, saved in transformers' `per_layer_config`: after `import slimnas.models`,
`AutoModelForCausalLM.from_pretrained(this_directory)` loads it (no remote code).
{%- else %} A plain Hugging Face
checkpoint: `AutoModelForCausalLM.from_pretrained(this_directory)` loads it with no other code.
{%- endif %}

## Lineage

{% for step in lineage -%}
{{ loop.index }}. {{ step }}
{% endfor %}
## Results

| | this model | teacher |
|---|---|---|
{% for row in rows -%}
| {{ row[0] }} | {{ row[1] }} | {{ row[2] }} |
{% endfor %}
Held-out numbers are over {{ documents }} evaluation documents of {{ corpus }} (one row each, never used to
choose); lm-eval scores are on the evaluation pool of each task, documents never used by the search.
Measured on {{ hardware }}.
{% if layers %}
## Shape by layer

| teacher layer | attention: query heads / KV groups | FFN neurons |
|---|---|---|
{% for row in layers -%}
| {{ row[0] }} | {{ row[1] }} | {{ row[2] }} |
{% endfor %}
![widths by layer]({{ plot }})
{% endif %}
Made with:

```
{{ command }}
```
"""


def hub_id(name: str) -> str | None:
    """The Hugging Face id a model name stands for: the default teacher's original, or an org/name that is not a
    directory here; None for a local checkpoint."""
    if name == DEFAULT_TEACHER:
        return DEFAULT_TEACHER_HUB_ID
    return name if HUB_ID.fullmatch(name) and not Path(name).expanduser().exists() else None


def corpus_name(source: str) -> str:
    """The corpus as a dataset name: the hub dataset of hf:NAME[:CONFIG[:SPLIT]], else the file's name."""
    return source.removeprefix("hf:").split(":")[0] if source.startswith("hf:") else Path(source).name


def made_from(made: dict) -> tuple[str | None, str]:
    """What a checkpoint slimnas wrote was made from (None: not recorded) and how, from its slimnas.json: a
    corrected teacher (slimnas correct), or a student pruned and distilled from a teacher (prune, distill,
    retrain: a chain's earlier stage)."""
    if "corrected_from" in made:
        tokens = made["correct"]["budget_tokens"]
        how = f"corrected (Minitron): fine-tuned with the next-token loss on the KD corpus for {tokens:,} tokens"
        return made["corrected_from"], how
    kd_tokens = made.get("kd_tokens", made.get("distill", {}).get("tokens"))
    how = f"pruned to {made['params']:,} parameters" + (
        f", distilled with {kd_tokens:,} KD tokens" if kd_tokens else ""
    )
    trial = f" (search trial {made['trial']})" if made.get("trial") is not None else ""
    return made.get("teacher"), how + trial


@dataclass(frozen=True)
class Lineage:
    """The teacher a candidate was cut from and the original model behind it. A corrected teacher or a chain's
    earlier student is a checkpoint slimnas wrote: its slimnas.json names what it was made from, and so on back
    to a model slimnas did not make, the original."""

    teacher: str  # as the run names it: a directory, a hub id or the default teacher's name
    original: str | None  # None: a checkpoint on the way does not record what it was made from
    steps: tuple[str, ...]  # how each model from the original to the teacher was made, one sentence each

    @classmethod
    def of(cls, teacher: str, original: str | None = None) -> "Lineage":
        """`original`: the original teacher when the run knows it (retrain.reference_teacher), for a checkpoint that
        does not record what it was made from."""
        steps: list[str] = []
        name: str | None = teacher
        while name is not None and (made := read_model_record(Path(name).expanduser())) is not None:
            name, how = made_from(made)
            steps.insert(0, how)
        return cls(teacher, name or original, tuple(steps))

    def text(self, kd_tokens: int) -> list[str]:
        """The card's lineage list: the original, each step, then this model."""
        if self.original is None:
            first = "an original model that is not recorded"
        elif self.original == DEFAULT_TEACHER:
            first = f"{DEFAULT_TEACHER_HUB_ID} (slimnas's default teacher `{DEFAULT_TEACHER}`, from {GGUF_FILE})"
        else:
            first = hub_id(self.original) or f"a local checkpoint, {Path(self.original).name}"
        return [first, *self.steps, f"this model: pruned from the model above, distilled with {kd_tokens:,} KD tokens"]


def eval_results(record: RetrainRecord) -> list[EvalResult]:
    """The model-index entries: held-out KL and perplexity, then every lm-eval metric with its split and pool."""
    heldout, corpus = record.heldout, corpus_name(record.corpus.get("source", "corpus"))
    split = f"evaluation ({heldout['documents']} documents)"
    results = [
        EvalResult(task_type="text-generation", dataset_type="slimnas-heldout", dataset_name=corpus,
                   dataset_split=split, metric_type=metric, metric_name=name, metric_value=round(heldout[key], 4))
        for metric, name, key in (("kl_divergence", "KL to the teacher", "kl"), ("perplexity", "perplexity",
                                                                                 "perplexity"))
    ]  # fmt: skip
    for score in record.scores:
        results.append(
            EvalResult(
                task_type="text-generation",
                dataset_type=score["task"],
                dataset_name=score["task"],
                dataset_split=f"{score['split']}, {score['pool']} pool, n={score['n']}",
                metric_type=score["metric"],
                metric_value=round(score["value"], 4),
            )  # fmt: skip
        )
    return results


def shape_cells(architecture: dict) -> tuple[str, str, str]:
    """The results table's hidden / FFN, heads / KV heads and layers of a shape; a per-layer one gives each
    per-layer size's range over its kept layers (0: removed in some layer)."""
    shape = shape_of(architecture)
    if isinstance(shape, Architecture):
        return (f"{shape.hidden_size} / {shape.intermediate_size}",
                f"{shape.num_attention_heads} / {shape.num_key_value_heads}", str(shape.num_hidden_layers))  # fmt: skip
    kept = [layer for layer in shape.layers if layer.kept]

    def span(field: str) -> str:
        low, high = min(getattr(layer, field) for layer in kept), max(getattr(layer, field) for layer in kept)
        return str(low) if low == high else f"{low}-{high}"

    return (f"{shape.hidden_size} / {span('intermediate_size')} by layer",
            f"{span('num_attention_heads')} / {span('num_key_value_heads')} by layer", str(len(kept)))  # fmt: skip


def rows(record: RetrainRecord, teacher: RetrainRecord) -> list[tuple[str, str, str]]:
    ours, theirs = shape_cells(record.architecture), shape_cells(teacher.architecture)
    table = [
        ("parameters", f"{record.params:,} ({100 * record.params_fraction:.1f}%)", f"{teacher.params:,}"),
        ("hidden / FFN", ours[0], theirs[0]),
        ("attention heads / KV heads", ours[1], theirs[1]),
        ("layers", ours[2], theirs[2]),
        ("KD tokens", f"{record.kd_tokens:,}", ""),
        ("held-out KL to the teacher", plus_minus(record.heldout["kl"], record.heldout["kl_stderr"]), "0"),
        ("held-out perplexity", plus_minus(record.heldout["perplexity"], record.heldout["perplexity_stderr"]),
         plus_minus(teacher.heldout["perplexity"], teacher.heldout["perplexity_stderr"])),
    ]  # fmt: skip
    teacher_scores = {(s["task"], s["metric"]): s for s in teacher.scores}
    for score in record.scores:
        other = teacher_scores.get((score["task"], score["metric"]))
        table.append(
            (f"{score['task']} {score['metric']} ({score['split']}, n={score['n']})",
             plus_minus(score["value"], score["stderr"]), plus_minus(other["value"], other["stderr"]) if other else "")
        )  # fmt: skip
    if record.summary.get("value") is not None:
        table.append(
            ("lm-eval summary (accuracy above chance)", plus_minus(record.summary["value"], record.summary["stderr"]),
             plus_minus(teacher.summary.get("value"), teacher.summary.get("stderr")))
        )  # fmt: skip
    if record.speed:
        speedup = plus_minus(record.speed["decode_speedup"], record.speed["decode_speedup_stderr"])
        where = ", llama.cpp, f16 GGUFs" if record.speed.get("engine") == "llamacpp" else ""  # bench.speed.engine
        table.append((f"decode speed-up vs the teacher (ABBA blocks{where})", f"{speedup}x", "1x"))
    if record.memory and teacher.memory:
        table.append(("peak memory alone", f"{record.memory['peak_bytes'] / 2**20:.0f} MiB",
                      f"{teacher.memory['peak_bytes'] / 2**20:.0f} MiB"))  # fmt: skip
    return table


def per_layer_shapes(record: RetrainRecord, teacher: RetrainRecord) -> list[tuple[LayerShape, LayerShape]] | None:
    """(this model's, the teacher's) shape of each teacher layer, a dropped one all zeros; None for a uniform
    student. A candidate's architecture is its target: one entry per teacher layer."""
    shape = shape_of(record.architecture)
    if not isinstance(shape, PerLayerArchitecture):
        return None
    source = shape_of(teacher.architecture)
    source = source if isinstance(source, PerLayerArchitecture) else PerLayerArchitecture.from_uniform(source)
    return list(zip(shape.layers, source.layers, strict=True))


def layer_rows(shapes: list[tuple[LayerShape, LayerShape]]) -> list[tuple[str, str, str]]:
    """The card's shape table: each teacher layer's attention and FFN here, out of the teacher's."""
    table = []
    for index, (layer, source) in enumerate(shapes):
        if not layer.kept:
            table.append((str(index), "dropped", "dropped"))
            continue
        heads, their_heads = layer.num_attention_heads, source.num_attention_heads
        attention = f"{heads} / {layer.num_key_value_heads} of {their_heads} / {source.num_key_value_heads}"
        ffn = f"{layer.intermediate_size} of {source.intermediate_size}"
        table.append((str(index), attention if heads else "removed", ffn if layer.intermediate_size else "removed"))
    return table


def widths_plot(shapes: list[tuple[LayerShape, LayerShape]]) -> bytes:
    """FFN neurons, query heads and KV groups by teacher layer as bars, the teacher's as dashed steps (PNG)."""
    figure = Figure(figsize=(7, 4), layout="constrained")
    FigureCanvasAgg(figure)
    ffn_axes, attention_axes = figure.subplots(2, 1, sharex=True)
    index = list(range(len(shapes)))
    edges = [i - 0.5 for i in range(len(shapes) + 1)]
    ffn_axes.bar(index, [layer.intermediate_size for layer, _ in shapes], color="tab:blue", label="this model")
    teacher_ffn = [source.intermediate_size for _, source in shapes]
    ffn_axes.stairs(teacher_ffn, edges, baseline=None, color="black", linestyle="--", label="teacher")
    for i, (layer, _) in enumerate(shapes):
        if not layer.kept:
            ffn_axes.text(i, 0, "dropped", ha="center", va="bottom", rotation=90, fontsize="small")
    ffn_axes.set_ylabel("FFN neurons")
    for offset, field, label, color in (
        (-0.2, "num_attention_heads", "query heads", "tab:orange"),
        (0.2, "num_key_value_heads", "KV groups", "tab:green"),
    ):
        attention_axes.bar([i + offset for i in index], [getattr(layer, field) for layer, _ in shapes], width=0.4,
                           color=color, label=label)  # fmt: skip
        attention_axes.stairs(
            [getattr(source, field) for _, source in shapes], edges, color=color, linestyle="--", baseline=None
        )
    attention_axes.set_ylabel("attention")
    attention_axes.set_xlabel("teacher layer (no bar: removed; dashed: the teacher's)")
    for axes in (ffn_axes, attention_axes):
        axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def save_model_card(record: RetrainRecord, teacher: RetrainRecord, lineage: Lineage, plan: dict, directory: Path):
    """README.md in the checkpoint's directory, with WIDTHS_PLOT beside it for a per-layer student."""
    if (shapes := per_layer_shapes(record, teacher)) is not None:
        with atomic_path(directory / WIDTHS_PLOT) as staging:
            staging.write_bytes(widths_plot(shapes))
    model_card(record, teacher, lineage, plan).save(directory / "README.md")


def model_card(record: RetrainRecord, teacher: RetrainRecord, lineage: Lineage, plan: dict) -> ModelCard:
    shapes = per_layer_shapes(record, teacher)
    source = record.corpus.get("source", "")
    original = hub_id(lineage.original) if lineage.original else None
    data = ModelCardData(
        model_name=record.label,
        base_model=original,
        datasets=[corpus_name(source)] if source.startswith("hf:") else None,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["slimnas", "pruned", "knowledge-distillation", "minitron"],
        eval_results=eval_results(record),
        slimnas={
            "teacher": lineage.teacher,
            "architecture": record.architecture,
            "teacher_architecture": teacher.architecture,
            "kept_layers": plan["layers"],
            "kd_tokens": record.kd_tokens,
            "corpus": record.corpus,
            "search_trial": record.trial,
        },
    )
    title = original or (Path(lineage.original).name if lineage.original else "model")
    return ModelCard.from_template(
        data, template_str=TEMPLATE, name=record.label, title=title, lineage=lineage.text(record.kd_tokens),
        rows=rows(record, teacher), documents=record.heldout["documents"], corpus=corpus_name(source),
        layers=layer_rows(shapes) if shapes else [], plot=WIDTHS_PLOT, command=record.command,
        hardware=f"{record.hardware.get('name')} ({record.hardware.get('threads')} threads, "
        f"torch {record.hardware.get('torch')})",
    )  # fmt: skip
