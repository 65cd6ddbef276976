import json

import pytest
import torch
from conftest import SHARED_DATA, needs_data, tiny_tokenizer

from slimnas.compress.corpus import BUILTIN, DataSettings, load_corpus, load_documents, pack, resolve_corpus
from slimnas.compress.runtime.data import find_data_dir
from slimnas.compress.runtime.errors import SlimnasError


def test_builtin_corpus_is_real_prose_available_offline():
    documents = load_documents(BUILTIN)
    assert len(documents) > 50
    assert sum(len(d) for d in documents) > 300_000


def test_splits_are_deterministic_disjoint_by_document_and_cut_to_the_row_settings():
    tokenizer = tiny_tokenizer(300)
    settings = DataSettings(corpus=BUILTIN, seq_len=64, selection_rows=8, evaluation_rows=16, seed=3)
    first, again = load_corpus(tokenizer, settings), load_corpus(tokenizer, settings)
    other = load_corpus(tokenizer, DataSettings(corpus=BUILTIN, seq_len=64, seed=4))
    assert torch.equal(first.train, again.train) and first.fingerprint == again.fingerprint
    assert first.fingerprint != other.fingerprint
    assert (len(first.selection), len(first.evaluation)) == (8, 16)
    assert sum(first.documents.values()) == len(load_documents(BUILTIN))
    rows = {split: {tuple(r) for r in first.rows(split).tolist()} for split in ("train", "selection", "evaluation")}
    assert not rows["train"] & rows["selection"] and not rows["train"] & rows["evaluation"]
    assert not rows["selection"] & rows["evaluation"]
    assert first.describe()["rows"] == {"train": len(first.train), "selection": 8, "evaluation": 16}


@needs_data
def test_auto_corpus_is_the_wikipedia_file_when_the_data_directory_has_it(tmp_path):
    assert resolve_corpus("auto", SHARED_DATA) == str(SHARED_DATA / "corpus" / "wiki_en_core.jsonl")
    assert resolve_corpus("auto", tmp_path) == BUILTIN  # a data directory without the corpus
    assert resolve_corpus("auto", None) == BUILTIN
    assert resolve_corpus("my.txt", SHARED_DATA) == "my.txt"


def test_data_directory_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("SLIMNAS_DATA", raising=False)
    assert find_data_dir(str(tmp_path)) == tmp_path
    monkeypatch.setenv("SLIMNAS_DATA", str(tmp_path))
    assert find_data_dir(None) == tmp_path
    with pytest.raises(SlimnasError, match="data.dir points to .*nowhere"):
        find_data_dir(str(tmp_path / "nowhere"))


def test_local_txt_and_jsonl_files(tmp_path):
    (tmp_path / "a.txt").write_text("first paragraph here.\n\nsecond one there.\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "alpha"}) + "\n" + json.dumps({"text": "beta"}) + "\n")
    assert load_documents(str(tmp_path / "a.txt")) == ["first paragraph here.", "second one there.\n"]
    assert load_documents(str(tmp_path / "b.jsonl")) == ["alpha", "beta"]
    rows = pack(["one two three four"] * 20, tiny_tokenizer(300), seq_len=8)
    assert rows.shape[1] == 8 and rows.dtype == torch.int64


@pytest.mark.parametrize(
    "content, name, message",
    [
        (None, "missing.txt", "corpus not found"),
        ("x", "data.csv", "unsupported corpus file"),
        ("{bad", "d.jsonl", "d.jsonl:1: not a JSON line"),
        ('{"title": "no text"}', "e.jsonl", "'text' field"),
    ],
)
def test_bad_corpus_inputs_give_clear_errors(tmp_path, content, name, message):
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(SlimnasError, match=message):
        load_documents(str(tmp_path / name))


def test_a_corpus_too_small_for_one_row_per_split_is_refused(tmp_path):
    (tmp_path / "tiny.txt").write_text("\n\n".join(["a short paragraph of text."] * 3))
    with pytest.raises(SlimnasError, match="corpus too small"):
        load_corpus(tiny_tokenizer(300), DataSettings(corpus=str(tmp_path / "tiny.txt"), seq_len=64))
