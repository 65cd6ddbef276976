"""Teacher top-k logits on disk, memory-mapped, so every trial of a search distils without a teacher.

One cache belongs to one (teacher, token rows, k, temperature). It is filled row by row in order and
records how many rows are complete, so a killed build resumes and a longer KD run extends it. A file
lock makes workers that share the cache directory take turns creating and filling it.
"""

import fcntl
import json
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers import PreTrainedModel

from compress.fingerprint import hash_json, hash_tensor
from compress.kd_loss import TopKTarget
from compress.precision import autocast


class TeacherLogitCache:
    def __init__(self, directory: Path, rows: torch.Tensor, top_k: int, temperature: float, vocab_size: int):
        self.directory, self.rows, self.top_k, self.temperature = directory, rows, top_k, temperature
        directory.mkdir(parents=True, exist_ok=True)
        shape = (*rows.shape, top_k)
        index_dtype = np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
        with self._locked():
            self.values = self._array("values.npy", np.float16, shape)
            self.indices = self._array("indices.npy", index_dtype, shape)
            self.logsumexp = self._array("logsumexp.npy", np.float32, tuple(rows.shape))

    @contextmanager
    def _locked(self):
        with open(self.directory / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    @classmethod
    def open(
        cls, cache_dir: Path, teacher_fingerprint: str, rows: torch.Tensor, top_k: int, temperature: float, vocab: int
    ) -> "TeacherLogitCache":
        top_k = min(top_k, vocab)
        key = hash_json([teacher_fingerprint, hash_tensor(rows), top_k, temperature])[:24]
        return cls(cache_dir / "teacher-logits" / key, rows, top_k, temperature, vocab)

    def _array(self, name: str, dtype, shape: tuple) -> np.memmap:
        path = self.directory / name
        if path.exists():
            return np.load(path, mmap_mode="r+")
        return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)

    @property
    def filled(self) -> int:
        meta = self.directory / "meta.json"
        return json.loads(meta.read_text())["filled"] if meta.exists() else 0

    def _mark_filled(self, n_rows: int) -> None:
        for array in (self.values, self.indices, self.logsumexp):
            array.flush()
        staging = self.directory / f"meta.json.{os.getpid()}"
        staging.write_text(json.dumps({"filled": n_rows, "top_k": self.top_k, "temperature": self.temperature}))
        staging.replace(self.directory / "meta.json")

    @torch.no_grad()
    def ensure(self, n_rows: int, teacher: PreTrainedModel, batch_size: int = 8, precision: str = "auto") -> None:
        """Run the teacher over rows [filled, n_rows) and store their top-k logits."""
        with self._locked():
            self._fill(min(n_rows, len(self.rows)), teacher, batch_size, precision)

    def _fill(self, n_rows: int, teacher: PreTrainedModel, batch_size: int, precision: str) -> None:
        start = self.filled
        if start >= n_rows:
            return
        device = next(teacher.parameters()).device
        progress = tqdm(total=n_rows - start, desc="teacher logits", unit="row")
        for begin in range(start, n_rows, batch_size):
            end = min(begin + batch_size, n_rows)
            with autocast(device, precision):
                hidden = teacher.model(input_ids=self.rows[begin:end].to(device), use_cache=False).last_hidden_state
                logits = teacher.lm_head(hidden)
            logits = logits.float()
            top = logits.topk(self.top_k, dim=-1)
            self.values[begin:end] = top.values.cpu().numpy().astype(np.float16)
            self.indices[begin:end] = top.indices.cpu().numpy().astype(self.indices.dtype)
            self.logsumexp[begin:end] = torch.logsumexp(logits / self.temperature, -1).cpu().numpy()
            self._mark_filled(end)
            progress.update(end - begin)
        progress.close()

    def target(self, row_indices: torch.Tensor) -> TopKTarget:
        """The cached targets of these rows, flattened to [rows x seq_len, k] like the student's positions."""
        if int(row_indices.max()) >= self.filled:
            raise IndexError(f"row {int(row_indices.max())} is not cached yet ({self.filled} rows filled)")
        picked = row_indices.numpy()
        return TopKTarget(
            values=torch.from_numpy(self.values[picked].astype(np.float32)).flatten(0, 1),
            indices=torch.from_numpy(self.indices[picked].astype(np.int64)).flatten(0, 1),
            logsumexp=torch.from_numpy(np.asarray(self.logsumexp[picked])).flatten(0, 1),
        )
