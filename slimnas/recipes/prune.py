"""slimnas prune: cut the teacher to a target architecture and save a Hugging Face checkpoint.

slimnas prune target.num_hidden_layers=20 target.intermediate_size=1024 out=runs/pruned
"""

import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from slimnas.compress.arch import Architecture, param_count, validate_target
from slimnas.compress.context import load_teacher_context
from slimnas.compress.heldout import HeldoutSet
from slimnas.compress.models import cache_root, load_model
from slimnas.compress.prune import plan_pruning, prune_model, save_checkpoint
from slimnas.core.device import pick_device
from slimnas.core.errors import SlimnasError
from slimnas.core.settings import settings_of


def target_architecture(target: DictConfig, teacher_config) -> Architecture:
    """The target's sizes, the teacher's where a size is null."""
    teacher = Architecture.of(teacher_config).as_dict()
    chosen = {k: (v if v is not None else teacher[k]) for k, v in OmegaConf.to_container(target).items()}
    wrong = [f"{k}={v!r}" for k, v in chosen.items() if not isinstance(v, int) or isinstance(v, bool)]
    if wrong:
        raise SlimnasError(f"invalid target: {', '.join(wrong)} (whole numbers only)")
    return Architecture(**chosen)


def main(cfg: DictConfig) -> None:
    # 1. Settings and the target, checked before any compute
    policy = settings_of(cfg, "pruning")
    data = settings_of(cfg, "data")
    teacher = load_model(cfg.teacher, pick_device(cfg.device))
    target = target_architecture(cfg.target, teacher.model.config)
    validate_target(target, teacher.model.config)

    # 2. Corpus and importance (cached)
    importance = settings_of(cfg, "importance")
    context = load_teacher_context(cfg.teacher, cfg.device, data, cache_root(cfg.cache_dir), importance, teacher)

    # 3. Plan and cut
    started = time.perf_counter()
    plan = plan_pruning(context.importance, teacher.model.config, target, policy)
    student = prune_model(teacher.model, plan, target)
    prune_seconds = time.perf_counter() - started
    teacher_params = param_count(teacher.model.config)
    record = {
        "teacher": cfg.teacher,
        "teacher_params": teacher_params,
        "params_fraction": param_count(student.config) / teacher_params,
        "importance": str(context.importance_path),
        "pruning": policy.__dict__,
        "plan": plan.as_dict(),
        "prune_seconds": prune_seconds,
        "corpus": context.corpus.describe(),
        "command": cfg.command,
    }

    # 4. Held-out quality on the evaluation documents, teacher beside the cut model
    if cfg.eval_heldout:
        evaluation = HeldoutSet("evaluation", context.corpus.evaluation, teacher.model, cfg.precision)
        pruned = evaluation.evaluate(student).summary()
        teacher_metrics = evaluation.evaluate(teacher.model).summary()
        record["heldout"] = {"teacher": teacher_metrics, "pruned": pruned}
        print(
            f"held-out ({pruned['documents']} evaluation documents): "
            f"perplexity teacher {teacher_metrics['perplexity']:.2f}, "
            f"pruned {pruned['perplexity']:.2f} ± {pruned['perplexity_stderr']:.2f}; "
            f"KL to the teacher {pruned['kl']:.3f} ± {pruned['kl_stderr']:.3f}"
        )

    # 5. A plain Hugging Face checkpoint plus slimnas.json
    out = Path(cfg.out)
    save_checkpoint(student, teacher.tokenizer, out, record)
    print(
        f"pruned to {target.label()}: {param_count(student.config):,} params "
        f"({record['params_fraction']:.1%} of the teacher) in {prune_seconds:.1f} s"
    )
    print(f"saved checkpoint: {out}")
