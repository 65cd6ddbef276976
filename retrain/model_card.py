"""The model card (README.md) of a retrained checkpoint, written with huggingface_hub's model-card API.

Its YAML metadata is what the hub reads: `model-index` evaluation results with their splits (held-out
KL and perplexity on the evaluation documents, lm-eval on the evaluation pool), the teacher as the
base model, and a `slimnas` block with the pruning plan's shape, the KD tokens and the corpus. The
text repeats the numbers beside the teacher's for a reader.
"""

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from slimnas.core.rundir import RetrainRecord
from slimnas.core.tables import plus_minus

TEMPLATE = """---
{{ card_data }}
---

# {{ name }}: a pruned and distilled {{ teacher_name }}

Structured pruning (Minitron importance) plus logit knowledge distillation by slimnas. A plain Hugging Face
checkpoint: `AutoModelForCausalLM.from_pretrained(this_directory)` loads it with no other code.

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


def eval_results(record: RetrainRecord) -> list[EvalResult]:
    """The model-index entries: held-out KL and perplexity, then every lm-eval metric with its split and pool."""
    heldout, corpus = record.heldout, record.corpus.get("source", "corpus")
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


def model_card(record: RetrainRecord, teacher: RetrainRecord, teacher_name: str, plan: dict) -> ModelCard:
    data = ModelCardData(
        model_name=record.label,
        base_model=teacher_name,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["slimnas", "pruned", "knowledge-distillation", "minitron"],
        eval_results=eval_results(record),
        slimnas={
            "teacher": teacher_name,
            "architecture": record.architecture,
            "teacher_architecture": teacher.architecture,
            "kept_layers": plan["layers"],
            "kd_tokens": record.kd_tokens,
            "corpus": record.corpus,
            "search_trial": record.trial,
        },
    )
    return ModelCard.from_template(
        data, template_str=TEMPLATE, name=record.label, teacher_name=teacher_name, rows=rows(record, teacher),
        documents=record.heldout["documents"], corpus=record.corpus.get("source"), command=record.command,
        hardware=f"{record.hardware.get('name')} ({record.hardware.get('threads')} threads, torch "
        f"{record.hardware.get('torch')})",
    )  # fmt: skip
