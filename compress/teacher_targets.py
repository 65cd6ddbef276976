"""The teacher side of distillation: what the student is trained to match, per batch of rows.

- LiveTeacherTargets runs the teacher on every batch: the full-vocabulary KL, and the teacher's layer
  outputs for a hidden-state loss.
- CachedTeacherTargets reads the teacher's top-k logits from a memory-mapped cache on disk, so every
  trial of a search distils without running the teacher. One cache belongs to one (teacher, token
  rows, k, temperature); it is filled row by row in order and records how many rows are complete, so
  a killed fill resumes and a longer KD run extends (and grows) it. A file lock makes workers that
  share the cache directory take turns creating and filling it.
"""

import json
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from tqdm import tqdm
from transformers import PreTrainedModel

from slimnas.compress.kd_loss import LiveTarget, TopKTarget
from slimnas.core.device import autocast, model_device
from slimnas.core.errors import SlimnasError
from slimnas.core.files import atomic_path, atomic_write_text, hash_json, hash_tensor, locked

MAX_CACHE_BYTES = 16 * 2**30  # a top-k cache larger than this is refused before anything is written


class TeacherTargets(Protocol):
    def prepare(self, n_rows: int) -> None:
        """Make targets for rows [0, n_rows) available (fill a cache; nothing for a live teacher)."""

    def targets(self, rows: torch.Tensor, input_ids: torch.Tensor) -> tuple[LiveTarget | TopKTarget, dict]:
        """Targets of these rows (flattened positions) and the teacher's outputs of the requested layers."""


def capture_layer_outputs(model: PreTrainedModel, layers: list[int]):
    """Forward hooks that keep the outputs (the residual stream, before any final norm) of chosen layers."""
    outputs: dict[int, torch.Tensor] = {}

    def keep(index):
        def hook(module, args, output):
            outputs[index] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = [model.model.layers[i].register_forward_hook(keep(i)) for i in layers]
    return outputs, handles


class LiveTeacherTargets:
    def __init__(self, model: PreTrainedModel, precision: str, hidden_layers: list[int] = ()):
        self.model, self.precision, self.hidden_layers = model, precision, list(hidden_layers)

    def prepare(self, n_rows: int) -> None:
        pass

    @torch.no_grad()
    def targets(self, rows: torch.Tensor, input_ids: torch.Tensor):
        outputs, handles = capture_layer_outputs(self.model, self.hidden_layers)
        try:
            with autocast(model_device(self.model), self.precision):
                hidden = self.model.model(input_ids=input_ids, use_cache=False).last_hidden_state
        finally:
            for handle in handles:
                handle.remove()
        return LiveTarget(hidden.flatten(0, 1), self.model.lm_head), outputs


class TopKLogitCache:
    """Top-k teacher logits (fp16), their indices and the full log-sum-exp of rows [0, filled), on disk."""

    def __init__(self, directory: Path, rows: torch.Tensor, top_k: int, temperature: float, vocab_size: int):
        self.directory, self.rows, self.top_k, self.temperature = directory, rows, top_k, temperature
        self.index_dtype = np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
        directory.mkdir(parents=True, exist_ok=True)
        self._open: tuple[int, dict[str, np.memmap]] | None = None  # (rows filled, arrays) as last read

    @classmethod
    def open(
        cls,
        cache_dir: Path,
        teacher_fingerprint: str,
        rows: torch.Tensor,
        top_k: int,
        temperature: float,
        vocab: int,
        precision: str,
    ) -> "TopKLogitCache":
        """The cache of these rows: logits the teacher computed under another precision are another cache."""
        top_k = min(top_k, vocab)
        key = hash_json([teacher_fingerprint, hash_tensor(rows), top_k, temperature, precision])[:24]
        return cls(cache_dir / "teacher-logits" / key, rows, top_k, temperature, vocab)

    def bytes_for(self, n_rows: int) -> int:
        per_position = self.top_k * (2 + np.dtype(self.index_dtype).itemsize) + 4
        return n_rows * self.rows.shape[1] * per_position

    def check_size(self, n_rows: int) -> None:
        needed = self.bytes_for(min(n_rows, len(self.rows)))
        if needed > MAX_CACHE_BYTES:
            raise SlimnasError(
                f"a top-{self.top_k} teacher cache for {n_rows} rows would take {needed / 2**30:.1f} GiB: "
                f"lower distill.top_k or use distill.teacher_mode=live"
            )

    @property
    def filled(self) -> int:
        meta = self.directory / "meta.json"
        return json.loads(meta.read_text())["filled"] if meta.exists() else 0

    def _arrays(self) -> dict[str, np.memmap]:
        return {name: np.load(self.directory / f"{name}.npy", mmap_mode="r+") for name in ("values", "indices", "lse")}

    def _grow(self, n_rows: int) -> None:
        """Arrays with room for at least n_rows; the filled rows are copied into larger files."""
        current = self._arrays()["lse"].shape[0] if (self.directory / "lse.npy").exists() else 0
        if current >= n_rows:
            return
        capacity = min(len(self.rows), max(n_rows, 2 * current))
        seq_len = self.rows.shape[1]
        shapes = {
            "values": ((capacity, seq_len, self.top_k), np.float16),
            "indices": ((capacity, seq_len, self.top_k), self.index_dtype),
            "lse": ((capacity, seq_len), np.float32),
        }
        filled = self.filled
        for name, (shape, dtype) in shapes.items():
            path = self.directory / f"{name}.npy"
            with atomic_path(path) as staging:
                grown = np.lib.format.open_memmap(staging, mode="w+", dtype=dtype, shape=shape)
                if filled:
                    grown[:filled] = np.load(path, mmap_mode="r")[:filled]
                grown.flush()
                del grown

    def _mark_filled(self, n_rows: int) -> None:
        atomic_write_text(self.directory / "meta.json", json.dumps({"filled": n_rows, "top_k": self.top_k}))

    @torch.no_grad()
    def ensure(self, n_rows: int, teacher: PreTrainedModel, precision: str, batch_size: int = 8) -> None:
        """Run the teacher over rows [filled, n_rows) and store their top-k logits."""
        n_rows = min(n_rows, len(self.rows))
        self.check_size(n_rows)
        with locked(self.directory / ".lock"):
            start = self.filled
            if start >= n_rows:
                return
            self._grow(n_rows)
            arrays = self._arrays()
            device = model_device(teacher)
            for begin in tqdm(range(start, n_rows, batch_size), desc="teacher logits", unit="batch", leave=False):
                end = min(begin + batch_size, n_rows)
                with autocast(device, precision):
                    hidden = teacher.model(input_ids=self.rows[begin:end].to(device), use_cache=False)
                    logits = teacher.lm_head(hidden.last_hidden_state).float()
                top = logits.topk(self.top_k, dim=-1)
                arrays["values"][begin:end] = top.values.cpu().numpy().astype(np.float16)
                arrays["indices"][begin:end] = top.indices.cpu().numpy().astype(self.index_dtype)
                arrays["lse"][begin:end] = torch.logsumexp(logits / self.temperature, -1).cpu().numpy()
                for array in arrays.values():
                    array.flush()
                self._mark_filled(end)

    def target(self, row_indices: torch.Tensor) -> TopKTarget:
        """The cached targets of these rows, flattened to [rows x seq_len, k] like the student's positions."""
        needed = int(row_indices.max())
        if self._open is None or needed >= self._open[0]:  # read the files again only when rows are missing
            self._open = (self.filled, self._arrays())
            if needed >= self._open[0]:
                raise IndexError(f"row {needed} is not cached yet ({self._open[0]} rows filled)")
        arrays = self._open[1]
        picked = row_indices.numpy()
        return TopKTarget(
            values=torch.from_numpy(arrays["values"][picked].astype(np.float32)).flatten(0, 1),
            indices=torch.from_numpy(arrays["indices"][picked].astype(np.int64)).flatten(0, 1),
            logsumexp=torch.from_numpy(np.asarray(arrays["lse"][picked])).flatten(0, 1),
        )


class CachedTeacherTargets:
    def __init__(self, cache: TopKLogitCache, teacher: PreTrainedModel, precision: str):
        self.cache, self.teacher, self.precision = cache, teacher, precision

    def prepare(self, n_rows: int) -> None:
        self.cache.ensure(n_rows, self.teacher, self.precision)

    def targets(self, rows: torch.Tensor, input_ids: torch.Tensor):
        target = self.cache.target(rows)
        device = input_ids.device
        return TopKTarget(target.values.to(device), target.indices.to(device), target.logsumexp.to(device)), {}
