"""slimnas importance: score heads, neurons, channels and layers of the teacher; cached on disk.

slimnas importance importance.n_samples=128
"""

from omegaconf import DictConfig

from slimnas.compress.context import load_teacher_context
from slimnas.compress.models import cache_root
from slimnas.core.settings import settings_of


def main(cfg: DictConfig) -> None:
    # 1. Teacher, corpus and importance (computed once per teacher, corpus and settings, then read from cache)
    context = load_teacher_context(
        cfg.teacher,
        cfg.device,
        settings_of(cfg, "data"),
        cache_root(cfg.cache_dir),
        settings_of(cfg, "importance"),
    )
    # 2. The depth ranking: the part of the scores a user reads
    scores = context.importance.layer_scores("block")
    ranked = sorted(range(len(scores)), key=lambda i: float(scores[i]))
    print("layers by block importance (least important first):", ", ".join(str(i) for i in ranked))
