"""slimnas export: write a checkpoint as one GGUF file that llama.cpp (and transformers) can load.

slimnas export model=runs/pruned dtype=f16
"""

import time
from pathlib import Path

from omegaconf import DictConfig

from slimnas.compress.export import export_gguf, tensor_count
from slimnas.core.errors import SlimnasError

FORMATS = ("gguf",)


def main(cfg: DictConfig) -> None:
    # 1. Settings, checked before any work
    if cfg.format not in FORMATS:
        raise SlimnasError(f"unknown export format {cfg.format!r}: use {', '.join(FORMATS)}")
    model = Path(cfg.model).expanduser()
    out = Path(cfg.out).expanduser() if cfg.out else model / f"model-{cfg.dtype}.gguf"

    # 2. Export (dtype checked first; atomic: a failed run leaves no file behind)
    started = time.perf_counter()
    export_gguf(model, out, cfg.dtype)
    seconds = time.perf_counter() - started

    # 3. One line: where, how big, how many tensors
    print(f"wrote {out}: {out.stat().st_size / 2**20:.1f} MiB, {tensor_count(out)} tensors ({seconds:.1f} s)")
