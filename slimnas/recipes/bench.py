"""slimnas bench: quality (lm-eval), held-out KL, speed and memory of the teacher or a checkpoint.

slimnas bench model=runs/distilled/model compare_teacher=true quality.limit=200
"""

from dataclasses import asdict
from pathlib import Path

from omegaconf import DictConfig

from slimnas.bench.lm_eval_command import write_lm_eval_command
from slimnas.bench.memory import measure_memory
from slimnas.bench.quality import score_model, summary_score
from slimnas.bench.speed import check_engine, compare_speed, measure_speed
from slimnas.bench.tasks import prepare_suite
from slimnas.compress.context import load_teacher_context
from slimnas.compress.heldout import HeldoutSet
from slimnas.compress.models import cache_root, load_model
from slimnas.core.settings import settings_of
from slimnas.core.tables import format_table, plus_minus, save_records

SCORE_COLUMNS = ["model", "task", "split", "pool", "metric", "value", "stderr", "n", "seconds"]
SPEED_COLUMNS = [
    "model", "engine", "params", "prefill_tokens_per_s", "decode_tokens_per_s", "latency_p50_ms", "cpu_load"
]  # fmt: skip


def main(cfg: DictConfig) -> None:
    # 1. Settings, task files and models, checked before any compute
    data = settings_of(cfg, "data")
    speed = settings_of(cfg, "speed")
    out = Path(cfg.out)
    quality = settings_of(cfg, "quality")
    suite = prepare_suite(list(quality.tasks), data.dir) if quality.tasks else None
    context = load_teacher_context(cfg.teacher, cfg.device, data, cache_root(cfg.cache_dir))
    teacher = context.teacher
    name = cfg.model or cfg.teacher
    model = load_model(cfg.model, context.device) if cfg.model else teacher
    if cfg.measure_speed:
        check_engine(speed, model.model.config, name)

    # 2. Held-out KL to the teacher and perplexity on the corpus's evaluation rows
    evaluation = HeldoutSet("evaluation", context.corpus.evaluation, teacher.model, cfg.precision)
    heldout = {"model": name, **evaluation.evaluate(model.model).summary()}
    columns = ["model", "split", "documents", "kl", "kl_stderr", "perplexity", "perplexity_stderr"]
    print(format_table([heldout], columns))
    save_records([heldout], out / "heldout")

    # 3. lm-eval scores on each task's evaluation pool (quality.limit documents, seeded by quality.seed)
    if suite is not None:
        print(f"scoring {suite.describe()}, {quality.limit} documents each from the evaluation pool")
        records = score_model(
            model.model, model.tokenizer, suite, quality, "evaluation", name, cfg.precision, out / "lm_eval.log"
        )
        print(format_table(records, SCORE_COLUMNS))
        summary = summary_score(records)
        if summary.value is not None:
            print(f"summary score (accuracy above chance, mean over {', '.join(summary.tasks)}): "
                  f"{plus_minus(summary.value, summary.stderr)}")  # fmt: skip
        if summary.excluded:
            print(f"not in the summary score (no known chance level, or no accuracy): {', '.join(summary.excluded)}")
        save_records(records, out / "scores")
        script = write_lm_eval_command(model.model, suite, quality, "evaluation", cfg.precision, out)
        print(f"the same scores with lm-eval's own command line: sh {script}")

    # 4. Speed: against the teacher in alternating pairs, or alone
    if cfg.measure_speed:
        if cfg.compare_teacher and cfg.model:
            comparison = compare_speed(model.model, teacher.model, speed, name, cfg.teacher, model.tokenizer)
            speeds = [comparison.model, comparison.reference]
            print(format_table([comparison.as_row()], list(comparison.as_row())))
            save_records([comparison.as_row()], out / "speed_vs_teacher")
        else:
            speeds = [measure_speed(model.model, speed, name, model.tokenizer)]
        print(format_table(speeds, SPEED_COLUMNS))
        save_records(speeds, out / "speed")

    # 5. Peak memory of each model on its own (a fresh process on CPU)
    if cfg.measure_memory:
        names = [name, cfg.teacher] if cfg.compare_teacher and cfg.model else [name]
        memory = [measure_memory(n, speed, context.device) for n in names]
        print(format_table(memory, ["model", "peak_bytes", "weight_bytes", "method"]))
        save_records([asdict(m) for m in memory], out / "memory")
    print(f"records saved in {out}")
