"""What every command derives once from a teacher: the model on its device, the corpus splits, importance."""

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from slimnas.compress.arch import param_count
from slimnas.compress.corpus import Corpus, load_corpus
from slimnas.compress.importance import Importance, cached_importance
from slimnas.compress.models import LoadedModel, load_model
from slimnas.compress.settings import DataSettings, ImportanceSettings
from slimnas.core.device import pick_device


@dataclass(frozen=True)
class TeacherContext:
    teacher: LoadedModel
    corpus: Corpus
    importance: Importance | None
    importance_path: Path | None
    device: torch.device


def load_teacher_context(
    teacher_name: str,
    device_name: str,
    data: DataSettings,
    cache_dir: Path,
    importance_settings: ImportanceSettings | None = None,
    teacher: LoadedModel | None = None,
) -> TeacherContext:
    """Teacher, corpus and (with settings) importance, cached on disk; each step prints one line."""
    device = pick_device(device_name)
    if teacher is None:
        started = time.perf_counter()
        teacher = load_model(teacher_name, device)
        seconds = time.perf_counter() - started
        print(f"teacher {teacher_name}: {param_count(teacher.model.config):,} params, loaded in {seconds:.1f} s")
    corpus = load_corpus(teacher.tokenizer, data)
    print(corpus.line())
    if importance_settings is None:
        return TeacherContext(teacher, corpus, None, None, device)
    started = time.perf_counter()
    importance, path = cached_importance(
        teacher.model, teacher.fingerprint, corpus.train, corpus.fingerprint, importance_settings, cache_dir
    )
    print(f"importance: {path} ({time.perf_counter() - started:.1f} s)")
    return TeacherContext(teacher, corpus, importance, path, device)
