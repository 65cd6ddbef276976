"""The model card (README.md) of a retrained checkpoint, written with huggingface_hub's model-card API.

Its YAML metadata is what the hub reads: `model-index` evaluation results with their splits (held-out
KL and perplexity on the evaluation documents, lm-eval on the evaluation pool), the original teacher as the
base model, and a `slimnas` block with the pruning plan's shape, the KD tokens and the corpus. The hub reads
`base_model` and `datasets` as hub ids, so they name one or are left out: never a local path or slimnas's
name of its default teacher. The text repeats the numbers beside the teacher's and says how the teacher
was made from the original (a corrected teacher, a chain's earlier student).
"""

import re
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from slimnas.compress.models import DEFAULT_TEACHER, DEFAULT_TEACHER_HUB_ID, GGUF_FILE
from slimnas.core.rundir import RetrainRecord, read_model_record
from slimnas.core.tables import plus_minus

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # org/name, as load_model reads a name that is not a directory

TEMPLATE = """---
{{ card_data }}
---

# {{ name }}: a pruned and distilled {{ title }}

Structured pruning (Minitron importance) plus logit knowledge distillation by slimnas. A plain Hugging Face
checkpoint: `AutoModelForCausalLM.from_pretrained(this_directory)` loads it with no other code.

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


def rows(record: RetrainRecord, teacher: RetrainRecord) -> list[tuple[str, str, str]]:
    arch, theirs = record.architecture, teacher.architecture
    table = [
        ("parameters", f"{record.params:,} ({100 * record.params_fraction:.1f}%)", f"{teacher.params:,}"),
        ("hidden / FFN", f"{arch['hidden_size']} / {arch['intermediate_size']}",
         f"{theirs['hidden_size']} / {theirs['intermediate_size']}"),
        ("attention heads / KV heads", f"{arch['num_attention_heads']} / {arch['num_key_value_heads']}",
         f"{theirs['num_attention_heads']} / {theirs['num_key_value_heads']}"),
        ("layers", str(arch["num_hidden_layers"]), str(theirs["num_hidden_layers"])),
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
        table.append(("decode speed-up vs the teacher (ABBA blocks)", f"{speedup}x", "1x"))
    if record.memory and teacher.memory:
        table.append(("peak memory alone", f"{record.memory['peak_bytes'] / 2**20:.0f} MiB",
                      f"{teacher.memory['peak_bytes'] / 2**20:.0f} MiB"))  # fmt: skip
    return table


def model_card(record: RetrainRecord, teacher: RetrainRecord, lineage: Lineage, plan: dict) -> ModelCard:
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
        command=record.command, hardware=f"{record.hardware.get('name')} ({record.hardware.get('threads')} threads, "
        f"torch {record.hardware.get('torch')})",
    )  # fmt: skip
