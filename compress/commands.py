"""The importance and prune commands: plain recipes over the compress components."""

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from compress.arch import Architecture, param_count, validate_target, weight_bytes
from compress.corpus import TokenSplit, token_split
from compress.distill import Distiller, DistillSettings, teacher_source
from compress.errors import SlimnasError
from compress.importance import Importance, ImportanceSettings, cached_importance, perplexity
from compress.models import LoadedModel, cache_root, load_model
from compress.precision import pick_device
from compress.prune import plan_pruning, plan_record, prune_model, save_checkpoint


@dataclass
class TeacherContext:
    """Everything derived once per teacher and reused by every later step."""

    teacher: LoadedModel
    data: TokenSplit
    importance: Importance
    importance_path: Path
    device: torch.device


def resolve_cache_dir(cfg: DictConfig) -> Path:
    return Path(cfg.cache_dir) if cfg.cache_dir else cache_root()


def corpus_split(cfg: DictConfig, tokenizer) -> TokenSplit:
    """The calibration / distillation token split named by cfg.data."""
    return token_split(cfg.data.corpus, tokenizer, cfg.data.seq_len, cfg.data.heldout_fraction, cfg.data.seed)


def load_teacher_context(
    cfg: DictConfig, target_cfg: DictConfig | None = None, teacher: LoadedModel | None = None
) -> TeacherContext:
    """Teacher, data and importance; a target given here is validated before any compute."""
    device = pick_device(cfg.device)
    started = time.perf_counter()
    teacher = teacher or load_model(cfg.teacher)
    teacher.model.to(device)
    seconds = time.perf_counter() - started
    print(f"teacher {cfg.teacher}: {param_count(teacher.model.config):,} params, loaded in {seconds:.1f} s")
    if target_cfg is not None:
        validate_target(target_architecture(target_cfg, teacher.model.config), teacher.model.config)
    data = corpus_split(cfg, teacher.tokenizer)
    print(
        f"corpus {cfg.data.corpus}: {len(data.train)} train / {len(data.heldout)} held-out rows of {cfg.data.seq_len}"
    )
    settings = ImportanceSettings(**OmegaConf.to_container(cfg.importance), precision=cfg.precision)
    started = time.perf_counter()
    importance, path = cached_importance(
        teacher.model, teacher.fingerprint, data.train, data.heldout, data.fingerprint, settings, resolve_cache_dir(cfg)
    )
    print(f"importance: {path} ({time.perf_counter() - started:.1f} s)")
    return TeacherContext(teacher, data, importance, path, device)


def run_importance(cfg: DictConfig) -> None:
    context = load_teacher_context(cfg)
    scores = context.importance.layer_scores("block")
    ranked = sorted(range(len(scores)), key=lambda i: float(scores[i]))
    print("layers by block importance (least important first):", ", ".join(str(i) for i in ranked))


def target_architecture(cfg_target: DictConfig, teacher_config) -> Architecture:
    teacher = Architecture.of(teacher_config).as_dict()
    chosen = {k: (v if v is not None else teacher[k]) for k, v in OmegaConf.to_container(cfg_target).items()}
    return Architecture(**chosen)


def run_prune(cfg: DictConfig) -> None:
    context = load_teacher_context(cfg, cfg.target)
    teacher_model = context.teacher.model
    target = target_architecture(cfg.target, teacher_model.config)
    started = time.perf_counter()
    plan = plan_pruning(context.importance, teacher_model.config, target, cfg.layer_metric, cfg.depth_strategy)
    student = prune_model(teacher_model, plan, target)
    prune_seconds = time.perf_counter() - started
    record = {
        "teacher": cfg.teacher,
        "teacher_params": param_count(teacher_model.config),
        "weight_bytes_bf16": weight_bytes(student.config),
        "importance": str(context.importance_path),
        "plan": plan_record(plan),
        "prune_seconds": prune_seconds,
    }
    if cfg.eval_perplexity:
        heldout = context.data.heldout
        teacher_ppl = perplexity(teacher_model, heldout, precision=cfg.precision)
        pruned_ppl = perplexity(student, heldout, precision=cfg.precision)
        record["heldout_perplexity"] = {"teacher": teacher_ppl, "pruned": pruned_ppl}
        print(f"held-out perplexity: teacher {teacher_ppl:.2f}, pruned {pruned_ppl:.2f}")
    out = Path(cfg.out)
    save_checkpoint(student, context.teacher.tokenizer, out, record)
    params = param_count(student.config)
    fraction = params / record["teacher_params"]
    print(f"pruned to {target.label()}: {params:,} params ({fraction:.1%} of the teacher) in {prune_seconds:.1f} s")
    print(f"saved checkpoint: {out}")


def distill_settings(cfg: DictConfig) -> DistillSettings:
    values = OmegaConf.to_container(cfg.distill)
    values["hidden_layers"] = tuple(tuple(pair) for pair in values["hidden_layers"])
    return DistillSettings(**values, precision=cfg.precision, seed=cfg.data.seed)


def run_distill(cfg: DictConfig) -> None:
    settings = distill_settings(cfg)
    device = pick_device(cfg.device)
    teacher = load_model(cfg.teacher)
    student = load_model(cfg.student)
    if student.model.config.vocab_size != teacher.model.config.vocab_size:
        raise SlimnasError("student and teacher vocabularies differ: distillation needs the teacher's tokenizer")
    teacher.model.to(device)
    student.model.to(device)
    data = corpus_split(cfg, teacher.tokenizer)
    source = teacher_source(teacher, data, settings, resolve_cache_dir(cfg))
    out = Path(cfg.out)
    distiller = Distiller(
        student.model, source, data.train, data.heldout, settings, out, teacher.model.config.hidden_size
    )
    print(f"distilling {cfg.student}: {distiller.total_steps} steps of {distiller.tokens_per_step} tokens")
    result = distiller.run()
    record = {"student_source": cfg.student, "teacher": cfg.teacher, "distill": result.__dict__}
    save_checkpoint(student.model, student.tokenizer, out / "model", record)
    if result.initial:
        print(f"held-out before: kl {result.initial['heldout_kl']:.4f}, ppl {result.initial['heldout_perplexity']:.2f}")
    print(f"held-out after:  kl {result.final['heldout_kl']:.4f}, ppl {result.final['heldout_perplexity']:.2f}")
    print(f"{result.tokens:,} KD tokens, {result.tokens_per_second:.0f} tokens/s; saved checkpoint: {out / 'model'}")
