"""Calibration, distillation and held-out text: documents, split by document, tokenised into rows.

Three disjoint splits of whole documents, so that no document straddles two of them:
- train: packed into consecutive rows (documents joined by EOS): calibration for importance, and KD;
- selection: the documents that rank candidates (the search's screen and rungs);
- evaluation: the documents behind every reported number (retrain, bench, report), never used to choose.

A held-out set is a sample of documents, not a stretch of text: each selection or evaluation document
gives one row of `heldout_tokens` tokens at a seeded position inside it, so a mean over rows is a mean over
documents and its standard error says how far the number would move on other documents.

Sources: "auto" (the decontaminated English Wikipedia corpus in the data directory when present,
else "builtin"), "builtin" (the Python reference manual's topics from the stdlib's pydoc_data, so a
fresh offline install always has real English prose), a local .txt or .jsonl file, or
"hf:NAME[:CONFIG[:SPLIT]]" for a Hugging Face dataset when the hub is reachable. What a document is
depends on the format, every record says it (`unit`) and the console's corpus line spells it out: a
.jsonl line; in a .txt file an article under a WikiText ' = Title = ' heading, else a block between form
feeds; in a hub dataset the rows sharing an id / title column, WikiText articles, else a row. A .txt file
that marks neither is refused: its paragraphs are parts of one text, so as held-out documents they would
neither be independent of each other nor unseen (their neighbours train the students), and every error
bar over them would be too small.
"""

import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from slimnas.compress.settings import AUTO, BUILTIN, DataSettings
from slimnas.core.data import find_data_dir
from slimnas.core.errors import SlimnasError, first_line
from slimnas.core.files import hash_json, hash_tensor, read_jsonl

WIKI_CORPUS = Path("corpus") / "wiki_en_core.jsonl"
SPLITS = ("train", "selection", "evaluation")
HELDOUT = ("selection", "evaluation")
DOCUMENT_COLUMNS = ("doc_id", "document_id", "id", "title", "url")  # hub columns that name a row's document
WIKITEXT_HEADING = re.compile(r" = [^=].* = ")  # a top-level article heading of WikiText


def resolve_corpus(name: str, data_dir: Path | None) -> str:
    """The corpus a name stands for: 'auto' is the Wikipedia file of the data directory, else builtin."""
    if name != AUTO:
        return name
    if data_dir is not None and (data_dir / WIKI_CORPUS).is_file():
        return str(data_dir / WIKI_CORPUS)
    return BUILTIN


@dataclass(frozen=True)
class Documents:
    """A corpus as documents in a fixed order, and what one document is in this source."""

    texts: list[str]
    ids: list[str]
    unit: str  # article, topic, line, form-feed block, row: said in every record and on the console
    meaning: str  # what one document is, in words for the console's corpus line


@dataclass
class Corpus:
    source: str  # the corpus actually read (a path, builtin or hf:...)
    unit: str
    meaning: str  # what one document is (Documents.meaning)
    seq_len: int
    heldout_tokens: int
    train: torch.Tensor  # [rows, seq_len] int64, consecutive rows of the packed train documents
    selection: torch.Tensor  # [documents, heldout_tokens]: one row per selection document
    evaluation: torch.Tensor  # [documents, heldout_tokens]: one row per evaluation document
    document_ids: dict[str, list[str]]  # per split, the documents its rows come from
    fingerprint: str  # hash of the tokens themselves: same tokens, same caches

    def rows(self, split: str) -> torch.Tensor:
        return getattr(self, split)

    def documents(self, split: str) -> int:
        return len(self.document_ids[split])

    def describe(self) -> dict:
        """Where every number's rows came from, for records: held-out sets count distinct documents."""
        return {
            "source": self.source,
            "unit": self.unit,
            "seq_len": self.seq_len,
            "heldout_tokens": self.heldout_tokens,
            "documents": {split: self.documents(split) for split in SPLITS},
            "rows": {split: len(self.rows(split)) for split in SPLITS},
            "selection_documents": self.documents("selection"),
            "evaluation_documents": self.documents("evaluation"),
            "fingerprint": self.fingerprint[:16],
        }

    def line(self) -> str:
        """The console's corpus line."""
        return (
            f"corpus {self.source}, one document = {self.meaning}: KD on {len(self.train)} rows of {self.seq_len} "
            f"tokens from {self.documents('train')} {self.unit}s; ranking on {self.documents('selection')} selection "
            f"{self.unit}s, reporting on {self.documents('evaluation')} evaluation {self.unit}s (one row of "
            f"{self.heldout_tokens} tokens each)"
        )


def load_documents(source: str) -> Documents:
    """The corpus as documents, in a fixed order."""
    if source == BUILTIN:
        from pydoc_data.topics import topics

        names = sorted(topics)
        return Documents([topics[name] for name in names], names, "topic", "a topic of the Python reference manual")
    if source.startswith("hf:"):
        return _hub_documents(source[3:])
    path = Path(source).expanduser()
    if not path.is_file():
        raise SlimnasError(f"corpus not found: {source} (use auto, builtin, a .txt/.jsonl file or hf:NAME)")
    if path.suffix == ".jsonl":
        return _jsonl_documents(path)
    if path.suffix == ".txt":
        return _text_documents(path)
    raise SlimnasError(f"unsupported corpus file type '{path.suffix}': use .txt or .jsonl")


def _jsonl_documents(path: Path) -> Documents:
    try:
        rows = read_jsonl(path)
        texts = [row["text"] for row in rows]
    except (KeyError, TypeError) as error:
        raise SlimnasError(f"{path}: each line must be a JSON object with a 'text' field") from error
    ids = [str(row.get("id", row.get("title", index))) for index, row in enumerate(rows)]
    if all("title" in row for row in rows):
        return Documents(texts, ids, "article", "one line of the file, a titled article")
    return Documents(texts, ids, "line", "one line of the file")


def _wikitext_articles(lines: list[str]) -> list[str] | None:
    """Articles of WikiText-formatted lines (each starts at a ' = Title = ' line); None when there are none."""
    articles: list[list[str]] = []
    for line in lines:
        if WIKITEXT_HEADING.fullmatch(line.rstrip("\n")):
            articles.append([])
        if articles:
            articles[-1].append(line)
    return ["".join(article) for article in articles] if len(articles) > 1 else None


def _text_documents(path: Path) -> Documents:
    """Articles or form-feed blocks, as the file marks them; a file that marks neither is refused (module doc)."""
    text = path.read_text(errors="replace")
    if articles := _wikitext_articles(text.splitlines(keepends=True)):
        meaning = "an article under a WikiText ' = Title = ' heading"
        return Documents(articles, [str(i) for i in range(len(articles))], "article", meaning)
    if "\f" in text:
        blocks = [block for block in text.split("\f") if block.strip()]
        meaning = "a block between form feeds (the file has no WikiText headings)"
        return Documents(blocks, [str(i) for i in range(len(blocks))], "form-feed block", meaning)
    paragraphs = sum(1 for block in text.split("\n\n") if block.strip())
    raise SlimnasError(
        f"{path} marks no documents (no WikiText ' = Title = ' headings, no form feeds): its {paragraphs} paragraphs "
        "would be the held-out documents, yet they are parts of one text, neither independent nor unseen by the "
        "students trained on their neighbours; put a form feed between documents, or use a .jsonl (one document a line)"
    )


def _hub_documents(spec: str) -> Documents:
    import datasets

    name, config, split = (spec.split(":") + [None, None])[:3]
    try:
        dataset = datasets.load_dataset(name, config, split=split or "train")
    except Exception as error:  # offline, unknown name, bad config: all one message for the user
        raise SlimnasError(f"cannot load dataset '{spec}': {first_line(error)}") from error
    key = next((column for column in DOCUMENT_COLUMNS if column in dataset.column_names), None)
    if key is not None:  # rows sharing a document id are one document
        grouped: dict[str, list[str]] = {}
        for row in dataset:
            grouped.setdefault(str(row[key]), []).append(row["text"])
        ids = list(grouped)
        meaning = f"the rows sharing one {key}"
        return Documents(["\n".join(grouped[i]) for i in ids], ids, f"document (rows by {key})", meaning)
    rows = [row["text"] for row in dataset]
    if articles := _wikitext_articles(rows):
        meaning = "an article under a WikiText ' = Title = ' heading"
        return Documents(articles, [str(i) for i in range(len(articles))], "article", meaning)
    rows = [row for row in rows if row.strip()]
    meaning = (
        f"one row (no {', '.join(DOCUMENT_COLUMNS)} column groups rows into documents: rows cut from one longer "
        "text count as separate documents)"
    )
    return Documents(rows, [str(i) for i in range(len(rows))], "row", meaning)


def pack(token_lists: list[list[int]], eos: int | None, seq_len: int) -> torch.Tensor:
    """Concatenate tokenised documents separated by EOS and cut into [n, seq_len] rows (the remainder is dropped)."""
    stream: list[int] = []
    for ids in token_lists:
        stream.extend(ids + ([eos] if eos is not None else []))
    n_rows = len(stream) // seq_len
    return torch.tensor(stream[: n_rows * seq_len], dtype=torch.int64).view(n_rows, seq_len)


def document_rows(documents: list[tuple[list[int], str]], seq_len: int, seed: int) -> torch.Tensor:
    """One row of seq_len tokens per (tokens, id) document, at a position drawn from (seed, document id)."""
    rows = []
    for tokens, document_id in documents:
        start = random.Random(hash_json([seed, document_id])).randrange(len(tokens) - seq_len + 1)
        rows.append(tokens[start : start + seq_len])
    return torch.tensor(rows, dtype=torch.int64).view(len(rows), seq_len)


def text_rows(path: Path, tokenizer: PreTrainedTokenizerBase, seq_len: int, seed: int) -> tuple[torch.Tensor, str]:
    """Held-out rows of another text (e.g. WikiText-2 valid): one per document long enough, and what a document is."""
    documents = _text_documents(path)  # WikiText's .tokens files are text too
    tokens = tokenizer(documents.texts, add_special_tokens=False)["input_ids"]
    long_enough = [(ids, i) for ids, i in zip(tokens, documents.ids, strict=True) if len(ids) >= seq_len]
    if len(long_enough) < 2:
        raise SlimnasError(f"{path} has fewer than two {documents.unit}s of at least {seq_len} tokens")
    return document_rows(long_enough, seq_len, seed), documents.unit


def heldout_sizes(eligible: int, settings: DataSettings, source: str, row_tokens: int) -> tuple[int, int]:
    """Selection and evaluation documents; a corpus too small for the settings gives each a quarter of it."""
    wanted = (settings.selection_docs, settings.evaluation_docs)
    if sum(wanted) <= eligible // 2:
        return wanted
    scaled = tuple(min(n, eligible // 4) for n in wanted)
    if min(scaled) < 2:
        raise SlimnasError(
            f"corpus too small: {source} has {eligible} documents of at least {row_tokens} tokens; "
            f"held-out sets need at least 8: use a larger corpus or a smaller data.heldout_tokens"
        )
    print(
        f"note: {source} has {eligible} documents of at least {row_tokens} tokens, too few for "
        f"{wanted[0]} selection and {wanted[1]} evaluation documents: using {scaled[0]} and {scaled[1]}",
        flush=True,
    )
    return scaled


def load_corpus(tokenizer: PreTrainedTokenizerBase, settings: DataSettings) -> Corpus:
    """Train / selection / evaluation rows of the corpus: deterministic for the same source and settings."""
    source = resolve_corpus(settings.corpus, find_data_dir(settings.dir))
    documents = load_documents(source)
    tokens = tokenizer(documents.texts, add_special_tokens=False)["input_ids"] if documents.texts else []
    order = list(range(len(tokens)))
    random.Random(settings.seed).shuffle(order)
    row_tokens = settings.heldout_tokens or settings.seq_len
    eligible = [i for i in order if len(tokens[i]) >= row_tokens]  # long enough for one held-out row
    n_selection, n_evaluation = heldout_sizes(len(eligible), settings, source, row_tokens)
    chosen = {"selection": eligible[:n_selection], "evaluation": eligible[n_selection : n_selection + n_evaluation]}
    heldout = set(chosen["selection"]) | set(chosen["evaluation"])
    chosen["train"] = [i for i in order if i not in heldout]

    rows = {"train": pack([tokens[i] for i in chosen["train"]], tokenizer.eos_token_id, settings.seq_len)}
    for split in HELDOUT:
        picked = [(tokens[i], documents.ids[i]) for i in chosen[split]]
        rows[split] = document_rows(picked, row_tokens, settings.seed)
    if len(rows["train"]) == 0:
        raise SlimnasError(f"corpus too small: its train documents cannot fill one row of {settings.seq_len} tokens")
    fingerprint = hash_json([hash_tensor(rows[split]) for split in SPLITS])
    ids = {split: [documents.ids[i] for i in chosen[split]] for split in SPLITS}
    return Corpus(
        source,
        documents.unit,
        documents.meaning,
        settings.seq_len,
        row_tokens,
        **rows,
        document_ids=ids,
        fingerprint=fingerprint,
    )
