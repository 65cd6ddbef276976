"""slimnas correct: fine-tune the teacher on the KD corpus before pruning it (Minitron's teacher correction).

    slimnas correct correct.budget_tokens=200000 out=runs/corrected
    slimnas pipeline preset=cpu correct.budget_tokens=49152      (then every stage uses the corrected teacher)

Next-token loss on the corpus's train rows through the distillation schedule (warmup, cosine, checkpoints
every `correct.save_every` steps: a killed run resumes). Held-out numbers on the evaluation documents:
the KL of the corrected teacher to the original (how far it moved) and its perplexity, before and after.
The result is a plain Hugging Face checkpoint in OUT/model with slimnas.json saying where it came from.
"""

from pathlib import Path

from omegaconf import DictConfig

from slimnas.compress.context import load_teacher_context
from slimnas.compress.distill import build_distiller, distill_to_budget
from slimnas.compress.heldout import HeldoutSet
from slimnas.compress.models import cache_root, load_model
from slimnas.compress.prune import save_checkpoint
from slimnas.compress.settings import CorrectSettings
from slimnas.core.errors import SlimnasError
from slimnas.core.rundir import MODEL_DIR, read_model_record
from slimnas.core.settings import settings_of
from slimnas.core.tables import plus_minus


def corrected_model(out: Path, teacher: str, settings: CorrectSettings) -> Path | None:
    """OUT/model when it holds this teacher corrected with these settings (a finished run), else None."""
    record = read_model_record(out / MODEL_DIR)
    if record is None:
        return None
    if record.get("corrected_from") != teacher or record.get("correct") != settings.__dict__:
        raise SlimnasError(f"{out} holds a teacher corrected from another model or settings: use another out")
    return out / MODEL_DIR


def main(cfg: DictConfig) -> Path:
    # 1. Settings, teacher and corpus, checked before any compute
    settings: CorrectSettings = settings_of(cfg, "correct")
    if settings.budget_tokens < 1:
        raise SlimnasError("slimnas correct needs correct.budget_tokens >= 1 (tokens of next-token fine-tuning)")
    out = Path(cfg.out)
    if (done := corrected_model(out, cfg.teacher, settings)) is not None:
        print(f"corrected teacher: {done} (finished before, kept)")
        return done
    context = load_teacher_context(cfg.teacher, cfg.device, settings_of(cfg, "data"), cache_root(cfg.cache_dir))
    original = context.teacher
    student = load_model(cfg.teacher, context.device)  # the copy that trains; the original stays the reference

    # 2. Next-token fine-tuning on the train rows, scored against the original on the evaluation documents
    evaluation = HeldoutSet("evaluation", context.corpus.evaluation, original.model, cfg.precision)
    distiller = build_distiller(
        student.model, None, context.corpus.train, settings.as_distill(cfg.precision), settings.budget_tokens,
        cache_root(cfg.cache_dir),
    )  # fmt: skip
    print(
        f"correcting {cfg.teacher}: {distiller.total_steps} steps of {distiller.tokens_per_step} tokens "
        f"(next-token loss on the corpus's train rows, lr {settings.lr:g})"
    )
    identity = {"teacher": original.fingerprint, "corpus": context.corpus.fingerprint, "correct": True}
    result = distill_to_budget(distiller, evaluation, out, identity)

    # 3. The corrected teacher: a plain checkpoint, and how far it moved
    record = {
        "corrected_from": cfg.teacher,
        "correct": settings.__dict__,
        "result": result.__dict__,
        "corpus": context.corpus.describe(),
        "command": cfg.command,
    }
    save_checkpoint(student.model, student.tokenizer, out / MODEL_DIR, record)
    before, after = result.initial or evaluation.evaluate(original.model).summary(), result.final
    print(
        f"evaluation documents ({after['documents']}): perplexity "
        f"{plus_minus(before['perplexity'], before['perplexity_stderr'])} -> "
        f"{plus_minus(after['perplexity'], after['perplexity_stderr'])}; KL to the original "
        f"{plus_minus(after['kl'], after['kl_stderr'])}"
    )
    print(f"{result.tokens:,} tokens, {result.tokens_per_second:.0f} tokens/s; corrected teacher: {out / MODEL_DIR}")
    return out / MODEL_DIR
