"""Files written atomically (a killed run never leaves half a file), file locks, and stable content hashes."""

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from slimnas.core.errors import SlimnasError


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A per-process staging path renamed onto `path` when the block succeeds.

    Readers (and workers sharing a cache) see the old file or the new one, never half of one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        yield staging
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


@contextmanager
def locked(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive lock on a file while the block runs: processes sharing a folder (on one machine or on
    a shared filesystem) take turns, and a second one waits for the first's result instead of redoing it."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as staging:
        staging.write_text(text)


def write_json(path: Path, value: object) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, default=str) + "\n")


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as error:
        raise SlimnasError(f"missing file: {path}") from error
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SlimnasError(f"corrupt JSON file: {path} ({error})") from error


def read_jsonl(path: Path) -> list[Any]:
    """One JSON value per non-empty line; a corrupt line is a one-line error naming the file and line."""
    values = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                values.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise SlimnasError(f"{path}:{number}: not a JSON line ({error.msg})") from error
    return values


def hash_file(path: Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def hash_json(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def hash_tensor(tensor) -> str:
    """sha256 of a torch tensor's bytes (torch is not imported here: reading records must stay light)."""
    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
