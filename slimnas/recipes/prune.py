"""slimnas prune: cut the teacher to a target architecture and save a Hugging Face checkpoint.

slimnas prune target.num_hidden_layers=20 target.intermediate_size=1024 out=runs/pruned
slimnas prune 'target.intermediate_size=[1536,1024,0,...]' target_file=shape.yaml out=runs/pruned  (per layer)
"""

import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from slimnas.compress.arch import (
    PER_LAYER_FIELDS,
    Architecture,
    PerLayerArchitecture,
    Shape,
    param_count,
    validate_target,
)
from slimnas.compress.context import load_teacher_context
from slimnas.compress.heldout import HeldoutSet
from slimnas.compress.models import cache_root, load_config, load_model
from slimnas.compress.prune import plan_pruning, prune_model, save_checkpoint
from slimnas.core.device import pick_device
from slimnas.core.errors import SlimnasError, one_line
from slimnas.core.settings import settings_of


def target_architecture(target: DictConfig, teacher_config, target_file: str | None = None) -> Shape:
    """The target's sizes, the teacher's where a size is null. A list in a per-layer field (one entry per teacher
    layer, 0 removes that part; 0 everywhere drops the layer) makes a per-layer target, where a single number is
    the same for every layer. `target_file` (YAML or JSON) holds the same keys, or is a record to replay (a trial's
    record.json or a checkpoint's slimnas.json): its `target`, else its `architecture`; the command line wins."""
    chosen = _target_file(target_file) if target_file else {}
    chosen |= {k: v for k, v in OmegaConf.to_container(target).items() if v is not None}
    per_layer = any(isinstance(chosen.get(field), list) for field in PER_LAYER_FIELDS)
    teacher = Architecture.of(teacher_config).as_dict()
    if per_layer and chosen.get("num_hidden_layers", teacher["num_hidden_layers"]) != teacher["num_hidden_layers"]:
        raise SlimnasError("invalid target: num_hidden_layers is for uniform targets; a per-layer target drops a "
                           "layer with 0 in every per-layer list")  # fmt: skip
    chosen = {k: chosen.get(k, teacher[k]) for k in teacher}
    layers = teacher["num_hidden_layers"]
    for field in PER_LAYER_FIELDS if per_layer else ():
        chosen[field] = chosen[field] if isinstance(chosen[field], list) else [chosen[field]] * layers
    numbers = [v for k, value in chosen.items() for v in (value if isinstance(value, list) else [value])]
    wrong = [repr(v) for v in numbers if not isinstance(v, int) or isinstance(v, bool)]
    if wrong:
        raise SlimnasError(f"invalid target: {', '.join(wrong)} (whole numbers only)")
    return PerLayerArchitecture.from_dict(chosen) if per_layer else Architecture(**chosen)


def _target_file(path: str) -> dict:
    try:
        values = OmegaConf.to_container(OmegaConf.load(Path(path).expanduser()))
    except (OSError, ValueError) as error:
        raise SlimnasError(f"cannot read target_file {path}: {one_line(error)}") from error
    if not isinstance(values, dict):
        raise SlimnasError(f"target_file {path} must hold the target's keys, not {type(values).__name__}")
    values = values.get("target") or values.get("architecture") or values
    unknown = set(values) - set(Architecture.__dataclass_fields__)
    if unknown:
        raise SlimnasError(f"target_file {path}: unknown keys {', '.join(sorted(unknown))}")
    return values


def main(cfg: DictConfig) -> None:
    # 1. Settings and the target, checked before any compute
    policy = settings_of(cfg, "pruning")
    data = settings_of(cfg, "data")
    teacher_config = load_config(cfg.teacher)
    target = target_architecture(cfg.target, teacher_config, cfg.target_file)
    validate_target(target, teacher_config)
    teacher = load_model(cfg.teacher, pick_device(cfg.device))

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
        "target": target.as_dict(),
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
