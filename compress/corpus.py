"""Calibration and distillation text: load, tokenise, pack into fixed-length sequences, split.

Sources: "builtin" (the Python reference manual's topics from the stdlib's pydoc_data, so a fresh
offline install always has real English prose), a local .txt or .jsonl file, or "hf:NAME[:CONFIG[:SPLIT]]"
for a Hugging Face dataset when the hub is reachable.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from compress.errors import SlimnasError
from compress.fingerprint import hash_json, hash_tensor

BUILTIN = "builtin"


@dataclass
class TokenSplit:
    train: torch.Tensor  # [n_train, seq_len] int64
    heldout: torch.Tensor  # [n_heldout, seq_len] int64
    fingerprint: str  # hash of the tokens themselves: same tokens, same caches


def load_documents(source: str) -> list[str]:
    """The corpus as a list of documents (plain strings), in a fixed order."""
    if source == BUILTIN:
        from pydoc_data.topics import topics

        return [topics[name] for name in sorted(topics)]
    if source.startswith("hf:"):
        return _hub_documents(source[3:])
    path = Path(source).expanduser()
    if not path.is_file():
        raise SlimnasError(f"corpus not found: {source} (use 'builtin', a .txt/.jsonl file or hf:NAME)")
    if path.suffix == ".jsonl":
        return _jsonl_documents(path)
    if path.suffix == ".txt":
        return [block for block in path.read_text(errors="replace").split("\n\n") if block.strip()]
    raise SlimnasError(f"unsupported corpus file type '{path.suffix}': use .txt or .jsonl")


def _jsonl_documents(path: Path) -> list[str]:
    documents = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            documents.append(json.loads(line)["text"])
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise SlimnasError(f"{path}:{number}: each line must be a JSON object with a 'text' field") from error
    return documents


def _hub_documents(spec: str) -> list[str]:
    import datasets

    name, config, split = (spec.split(":") + [None, None])[:3]
    try:
        dataset = datasets.load_dataset(name, config, split=split or "train")
    except Exception as error:  # offline, unknown name, bad config: all one message for the user
        raise SlimnasError(f"cannot load dataset '{spec}': {str(error).splitlines()[0]}") from error
    return [row["text"] for row in dataset if row["text"].strip()]


def pack(documents: list[str], tokenizer: PreTrainedTokenizerBase, seq_len: int) -> torch.Tensor:
    """Concatenate documents separated by EOS and cut into [n, seq_len] rows (the remainder is dropped)."""
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for document in documents:
        stream.extend(tokenizer(document, add_special_tokens=False)["input_ids"] + separator)
    n_rows = len(stream) // seq_len
    if n_rows == 0:
        raise SlimnasError(f"corpus too small: {len(stream)} tokens cannot fill one sequence of {seq_len}")
    return torch.tensor(stream[: n_rows * seq_len], dtype=torch.int64).view(n_rows, seq_len)


def token_split(
    source: str, tokenizer: PreTrainedTokenizerBase, seq_len: int, heldout_fraction: float = 0.1, seed: int = 0
) -> TokenSplit:
    """Deterministic train / held-out split of packed sequences (a seeded permutation)."""
    rows = pack(load_documents(source), tokenizer, seq_len)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))
    n_heldout = max(1, int(round(len(rows) * heldout_fraction))) if len(rows) > 1 else 0
    heldout, train = rows[order[:n_heldout]], rows[order[n_heldout:]]
    return TokenSplit(train, heldout, hash_json([hash_tensor(train), hash_tensor(heldout)]))
