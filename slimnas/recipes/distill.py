"""slimnas distill: retrain a student from the teacher by logit knowledge distillation; resumable.

slimnas distill student=runs/pruned distill.budget_tokens=32768 distill.lr=3e-4 out=runs/distilled
"""

from pathlib import Path

from omegaconf import DictConfig

from slimnas.compress.context import load_teacher_context
from slimnas.compress.distill import build_distiller, distill_to_budget
from slimnas.compress.heldout import HeldoutSet
from slimnas.compress.models import cache_root, load_model
from slimnas.compress.prune import save_checkpoint
from slimnas.compress.settings import DistillSettings
from slimnas.core.errors import SlimnasError
from slimnas.core.rundir import MODEL_DIR, MODEL_RECORD_FILE, read_model_record
from slimnas.core.settings import settings_of


def student_cut(settings: DistillSettings, student_dir: str, student_config, teacher_config):
    """The teacher layers and channels the student kept (for a hidden-state loss), from the prune plan in
    slimnas.json; a student of the teacher's width without one kept everything."""
    if settings.hidden_weight <= 0:
        return None
    record = read_model_record(Path(student_dir)) or {}
    if "plan" in record:
        return record["plan"]["layers"], record["plan"]["channels"]
    if student_config.hidden_size == teacher_config.hidden_size:
        return list(range(student_config.num_hidden_layers)), list(range(student_config.hidden_size))
    raise SlimnasError(f"a hidden-state loss needs the prune plan of {student_dir} (its {MODEL_RECORD_FILE})")


def main(cfg: DictConfig) -> None:
    # 1. Settings, teacher and student, checked before any compute
    settings = settings_of(cfg, "distill")
    data = settings_of(cfg, "data")
    context = load_teacher_context(cfg.teacher, cfg.device, data, cache_root(cfg.cache_dir))
    student = load_model(cfg.student, context.device)
    teacher = context.teacher
    if student.model.config.vocab_size != teacher.model.config.vocab_size:
        raise SlimnasError("student and teacher vocabularies differ: distillation needs the teacher's tokenizer")
    cut = student_cut(settings, cfg.student, student.model.config, teacher.model.config)

    # 2. The KD run (the teacher's side: top-k cache or live) and the evaluation documents
    distiller = build_distiller(
        student.model, teacher, context.corpus.train, settings, settings.budget_tokens, cache_root(cfg.cache_dir), cut
    )
    evaluation = HeldoutSet("evaluation", context.corpus.evaluation, teacher.model, cfg.precision)

    # 3. Train to the budget, resuming from out when it holds a checkpoint of this run
    print(f"distilling {cfg.student}: {distiller.total_steps} steps of {distiller.tokens_per_step} tokens")
    out = Path(cfg.out)
    identity = {"student": student.fingerprint, "teacher": teacher.fingerprint, "corpus": context.corpus.fingerprint}
    result = distill_to_budget(distiller, evaluation, out, identity)

    # 4. The distilled checkpoint
    record = {
        "student_source": cfg.student,
        "teacher": cfg.teacher,
        "distill": result.__dict__,
        "corpus": context.corpus.describe(),
        "command": cfg.command,
    }
    save_checkpoint(student.model, student.tokenizer, out / MODEL_DIR, record)
    if result.initial:
        print(f"held-out before: kl {result.initial['kl']:.4f}, perplexity {result.initial['perplexity']:.2f}")
    final = result.final
    print(
        f"held-out after:  kl {final['kl']:.4f} ± {final['kl_stderr']:.4f}, "
        f"perplexity {final['perplexity']:.2f} ± {final['perplexity_stderr']:.2f} "
        f"({final['documents']} evaluation documents)"
    )
    print(f"{result.tokens:,} KD tokens, {result.tokens_per_second:.0f} tokens/s; saved checkpoint: {out / MODEL_DIR}")
