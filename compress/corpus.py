"""Calibration and distillation text: load, split by document, tokenise, pack into fixed-length rows.

Three disjoint splits, by whole documents so no article straddles two of them:
- train: calibration rows for importance, and the KD rows;
- selection: the rows that rank candidates (the search's screen and rungs, the zero-shot pick);
- evaluation: the rows behind every reported number (retrain, bench, report), never used to choose.

Sources: "auto" (the decontaminated English Wikipedia corpus in the data directory when present,
else "builtin"), "builtin" (the Python reference manual's topics from the stdlib's pydoc_data, so a
fresh offline install always has real English prose), a local .txt or .jsonl file, or
"hf:NAME[:CONFIG[:SPLIT]]" for a Hugging Face dataset when the hub is reachable.
"""

import random
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from slimnas.compress.runtime.data import find_data_dir
from slimnas.compress.runtime.errors import SlimnasError, first_line
from slimnas.compress.runtime.files import hash_json, hash_tensor, read_jsonl

AUTO, BUILTIN = "auto", "builtin"
WIKI_CORPUS = Path("corpus") / "wiki_en_core.jsonl"
SPLITS = ("train", "selection", "evaluation")


def resolve_corpus(name: str, data_dir: Path | None) -> str:
    """The corpus a name stands for: 'auto' is the Wikipedia file of the data directory, else builtin."""
    if name != AUTO:
        return name
    if data_dir is not None and (data_dir / WIKI_CORPUS).is_file():
        return str(data_dir / WIKI_CORPUS)
    return BUILTIN


@dataclass(frozen=True)
class DataSettings:
    dir: str | None = None  # benchmark files and corpus; None = $SLIMNAS_DATA, else shared/data beside the checkout
    corpus: str = AUTO
    seq_len: int = 128
    selection_fraction: float = 0.05  # share of the text (by characters) held out to rank candidates
    evaluation_fraction: float = 0.05  # share held out for reported numbers
    selection_rows: int = 32  # rows of the selection split each candidate is ranked on
    evaluation_rows: int = 64  # rows of the evaluation split behind reported numbers
    seed: int = 0  # which documents land in which split

    def __post_init__(self):
        if self.seq_len < 2:
            raise SlimnasError(f"data.seq_len must be at least 2, not {self.seq_len}")
        for name in ("selection_fraction", "evaluation_fraction"):
            if not 0 < getattr(self, name) < 0.5:
                raise SlimnasError(f"data.{name} must be in (0, 0.5), not {getattr(self, name)}")
        for name in ("selection_rows", "evaluation_rows"):
            if getattr(self, name) < 2:
                raise SlimnasError(f"data.{name} must be at least 2 (an error bar needs two rows)")


@dataclass
class CorpusSplit:
    source: str  # the corpus actually read (a path, builtin or hf:...)
    seq_len: int
    train: torch.Tensor  # [rows, seq_len] int64
    selection: torch.Tensor
    evaluation: torch.Tensor
    documents: dict[str, int]  # documents per split
    fingerprint: str  # hash of the tokens themselves: same tokens, same caches

    def rows(self, split: str) -> torch.Tensor:
        return getattr(self, split)

    def describe(self) -> dict:
        """Where every number's rows came from, for records."""
        return {
            "source": self.source,
            "seq_len": self.seq_len,
            "documents": self.documents,
            "rows": {split: len(self.rows(split)) for split in SPLITS},
            "fingerprint": self.fingerprint[:16],
        }


def load_documents(source: str) -> list[str]:
    """The corpus as a list of documents (plain strings), in a fixed order."""
    if source == BUILTIN:
        from pydoc_data.topics import topics

        return [topics[name] for name in sorted(topics)]
    if source.startswith("hf:"):
        return _hub_documents(source[3:])
    path = Path(source).expanduser()
    if not path.is_file():
        raise SlimnasError(f"corpus not found: {source} (use auto, builtin, a .txt/.jsonl file or hf:NAME)")
    if path.suffix == ".jsonl":
        return _jsonl_documents(path)
    if path.suffix == ".txt":
        return [block for block in path.read_text(errors="replace").split("\n\n") if block.strip()]
    raise SlimnasError(f"unsupported corpus file type '{path.suffix}': use .txt or .jsonl")


def _jsonl_documents(path: Path) -> list[str]:
    try:
        return [row["text"] for row in read_jsonl(path)]
    except (KeyError, TypeError) as error:
        raise SlimnasError(f"{path}: each line must be a JSON object with a 'text' field") from error


def _hub_documents(spec: str) -> list[str]:
    import datasets

    name, config, split = (spec.split(":") + [None, None])[:3]
    try:
        dataset = datasets.load_dataset(name, config, split=split or "train")
    except Exception as error:  # offline, unknown name, bad config: all one message for the user
        raise SlimnasError(f"cannot load dataset '{spec}': {first_line(error)}") from error
    return [row["text"] for row in dataset if row["text"].strip()]


def pack(documents: list[str], tokenizer: PreTrainedTokenizerBase, seq_len: int) -> torch.Tensor:
    """Concatenate documents separated by EOS and cut into [n, seq_len] rows (the remainder is dropped)."""
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for ids in tokenizer(documents, add_special_tokens=False)["input_ids"] if documents else []:
        stream.extend(ids + separator)
    n_rows = len(stream) // seq_len
    return torch.tensor(stream[: n_rows * seq_len], dtype=torch.int64).view(n_rows, seq_len)


def split_documents(documents: list[str], settings: DataSettings) -> dict[str, list[str]]:
    """Seeded shuffle of whole documents; selection and evaluation each take their share of the characters."""
    order = list(range(len(documents)))
    random.Random(settings.seed).shuffle(order)
    total = sum(len(d) for d in documents)
    splits: dict[str, list[str]] = {split: [] for split in SPLITS}
    quotas = {"selection": settings.selection_fraction * total, "evaluation": settings.evaluation_fraction * total}
    filled = dict.fromkeys(quotas, 0)
    for index in order:
        split = next((s for s in quotas if filled[s] < quotas[s]), "train")
        splits[split].append(documents[index])
        filled[split] = filled.get(split, 0) + len(documents[index])
    return splits


def load_corpus(tokenizer: PreTrainedTokenizerBase, settings: DataSettings) -> CorpusSplit:
    """Train / selection / evaluation rows of the corpus: deterministic for the same source and settings.

    The selection and evaluation splits are cut to data.selection_rows / data.evaluation_rows.
    """
    source = resolve_corpus(settings.corpus, find_data_dir(settings.dir))
    documents = split_documents(load_documents(source), settings)
    rows = {split: pack(documents[split], tokenizer, settings.seq_len) for split in SPLITS}
    rows["selection"] = rows["selection"][: settings.selection_rows]
    rows["evaluation"] = rows["evaluation"][: settings.evaluation_rows]
    for split, packed in rows.items():
        if len(packed) == 0:
            raise SlimnasError(
                f"corpus too small: its {split} split cannot fill one sequence of {settings.seq_len} tokens "
                f"({source}); use a larger corpus or a smaller data.seq_len"
            )
    fingerprint = hash_json([hash_tensor(rows[split]) for split in SPLITS])
    counts = {split: len(documents[split]) for split in SPLITS}
    return CorpusSplit(source, settings.seq_len, **rows, documents=counts, fingerprint=fingerprint)
