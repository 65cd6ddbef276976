"""The bench command: score the teacher or a checkpoint for quality and speed, print and save records."""

import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from bench.quality import ScoreRecord, score_model, summary_score
from bench.speed import SpeedSettings, measure_speed
from bench.task_data import default_data_dir
from compress.commands import corpus_split
from compress.distill import Distiller, DistillSettings, LiveTeacher
from compress.models import LoadedModel, load_model
from compress.precision import pick_device
from reports.tables import format_table, save_records

SPEED_COLUMNS = [
    "model", "params", "prefill_tokens_per_s", "decode_tokens_per_s", "latency_p50_ms", "latency_p90_ms",
    "peak_memory_bytes",
]  # fmt: skip


def speed_ratios(model, teacher) -> dict:
    """Measured speed-up over the teacher next to the FLOPs reduction: efficiency = speed-up / FLOPs ratio."""
    flops_ratio = teacher.flops_per_token / model.flops_per_token
    prefill = model.prefill_tokens_per_s / teacher.prefill_tokens_per_s
    decode = model.decode_tokens_per_s / teacher.decode_tokens_per_s
    return {
        "model": model.model,
        "flops_reduction": flops_ratio,
        "prefill_speedup": prefill,
        "decode_speedup": decode,
        "prefill_speedup_per_flops": prefill / flops_ratio,
        "decode_speedup_per_flops": decode / flops_ratio,
    }


def kl_to_teacher(cfg: DictConfig, student: LoadedModel, teacher: LoadedModel) -> list[ScoreRecord]:
    """Held-out KL to the teacher and perplexity on the calibration corpus's held-out rows (live teacher)."""
    data = corpus_split(cfg, teacher.tokenizer)
    settings = DistillSettings(teacher_mode="live", eval_rows=cfg.heldout_rows, precision=cfg.precision)
    source = LiveTeacher(teacher.model, cfg.precision, need_hidden=False)
    started = time.perf_counter()
    metrics = Distiller(student.model, source, data.train, data.heldout, settings, Path(cfg.out)).evaluate()
    seconds = time.perf_counter() - started
    n = min(cfg.heldout_rows, len(data.heldout))
    return [
        ScoreRecord(student.source, "heldout", metric, value, None, n, seconds) for metric, value in metrics.items()
    ]


def run_bench(cfg: DictConfig) -> None:
    device = pick_device(cfg.device)
    name = cfg.model or cfg.teacher
    loaded = load_model(name)
    loaded.model.to(device)
    out = Path(cfg.out)
    teacher = None  # loaded once, for KL and for the speed comparison
    if cfg.model and (cfg.heldout_rows or (cfg.speed.enabled and cfg.compare_teacher)):
        teacher = load_model(cfg.teacher)
        teacher.model.to(device)
    if cfg.model and cfg.heldout_rows:
        records = kl_to_teacher(cfg, loaded, teacher)
        print(format_table(records, ["task", "metric", "value", "n", "seconds"]))
        print("held-out KL saved:", *save_records(records, out / "heldout"))
    if cfg.quality.enabled:
        data_dir = Path(cfg.quality.data_dir) if cfg.quality.data_dir else default_data_dir()
        records = score_model(
            loaded.model,
            loaded.tokenizer,
            list(cfg.quality.tasks),
            out,
            data_dir,
            cfg.quality.limit,
            cfg.quality.batch_size,
            cfg.data.seed,
            name,
            cfg.precision,
            cfg.quality.max_length,
        )
        print(format_table(records, ["task", "metric", "value", "stderr", "n", "seconds"]))
        if any(r.metric in ("acc", "acc_norm") for r in records):
            print(f"summary score (accuracy above chance, mean over tasks): {summary_score(records):.4f}")
        print("scores saved:", *save_records(records, out / "scores"))
    if cfg.speed.enabled:
        speed_config = {k: v for k, v in OmegaConf.to_container(cfg.speed).items() if k != "enabled"}
        settings = SpeedSettings(**speed_config, precision=cfg.precision)
        speeds = [measure_speed(loaded.model, settings, name)]
        if cfg.compare_teacher and teacher is not None:
            speeds.append(measure_speed(teacher.model, settings, cfg.teacher))
        print(format_table(speeds, SPEED_COLUMNS))
        if len(speeds) == 2:
            ratios = speed_ratios(speeds[0], speeds[1])
            print(format_table([ratios], list(ratios)))
            print("ratios saved:", *save_records([ratios], out / "speed_vs_teacher"))
        print("speed saved:", *save_records(speeds, out / "speed"))
