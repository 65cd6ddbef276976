"""The model card (README.md) of a retrained checkpoint: what it is, how it was made, what it scores."""

from slimnas.compress.runtime.tables import plus_minus as _pm
from slimnas.search.records import RetrainRecord


def model_card(record: RetrainRecord, teacher: RetrainRecord, teacher_name: str) -> str:
    arch = record.architecture
    lines = [
        f"# {record.label}: a pruned and distilled {teacher_name}",
        "",
        "Structured pruning (Minitron importance) plus logit knowledge distillation by slimnas. "
        "A plain Hugging Face checkpoint: `AutoModelForCausalLM.from_pretrained(this_directory)` loads it "
        "with no other code.",
        "",
        "| | this model | teacher |",
        "|---|---|---|",
        f"| parameters | {record.params:,} ({100 * record.params_fraction:.1f}%) | {teacher.params:,} |",
        f"| hidden / FFN | {arch['hidden_size']} / {arch['intermediate_size']} | "
        f"{teacher.architecture['hidden_size']} / {teacher.architecture['intermediate_size']} |",
        f"| attention heads / KV heads | {arch['num_attention_heads']} / {arch['num_key_value_heads']} | "
        f"{teacher.architecture['num_attention_heads']} / {teacher.architecture['num_key_value_heads']} |",
        f"| layers | {arch['num_hidden_layers']} | {teacher.architecture['num_hidden_layers']} |",
        f"| KD tokens | {record.kd_tokens:,} | |",
        f"| held-out KL to the teacher ({record.heldout['rows']} evaluation rows) | "
        f"{_pm(record.heldout['kl'], record.heldout['kl_stderr'])} | 0 |",
        f"| held-out perplexity | {_pm(record.heldout['perplexity'], record.heldout['perplexity_stderr'], 2)} | "
        f"{_pm(teacher.heldout['perplexity'], teacher.heldout['perplexity_stderr'], 2)} |",
    ]
    teacher_scores = {(s["task"], s["metric"]): s for s in teacher.scores}
    for score in record.scores:
        mine = _pm(score["value"], score["stderr"])
        theirs = teacher_scores.get((score["task"], score["metric"]))
        lines.append(
            f"| {score['task']} {score['metric']} ({score['split']}, n={score['n']}) | {mine} | "
            f"{_pm(theirs['value'], theirs['stderr']) if theirs else ''} |"
        )
    if record.summary is not None:
        lines.append(
            f"| summary score (accuracy above chance) | {_pm(record.summary, record.summary_stderr)} | "
            f"{_pm(teacher.summary, teacher.summary_stderr)} |"
        )
    speed = record.speed
    if speed:
        speedup = _pm(speed["decode_speedup"], speed["decode_speedup_stderr"], 2)
        lines.append(f"| decode speed-up vs the teacher | {speedup}x | 1x |")
    lines.append(f"| FLOPs per token | {record.flops_per_token:,} | {teacher.flops_per_token:,} |")
    if record.memory and teacher.memory:
        mine, theirs = record.memory["peak_bytes"] / 2**20, teacher.memory["peak_bytes"] / 2**20
        lines.append(f"| peak memory alone | {mine:.0f} MiB | {theirs:.0f} MiB |")
    lines += [
        "",
        f"Measured on {record.hardware.get('name')} ({record.hardware.get('threads')} threads, "
        f"torch {record.hardware.get('torch')}). Speed is timed in alternating pairs with the teacher.",
        "",
        "Made with:",
        "",
        "```",
        record.command,
        "```",
        "",
    ]
    return "\n".join(lines)
