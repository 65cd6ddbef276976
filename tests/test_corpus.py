import json
from dataclasses import replace

import pytest
import torch
from conftest import SHARED_DATA, needs_data, tiny_tokenizer

from slimnas.compress.corpus import load_corpus, load_documents, pack, resolve_corpus, text_rows
from slimnas.compress.settings import BUILTIN, DataSettings
from slimnas.core.data import find_data_dir
from slimnas.core.errors import SlimnasError


def test_builtin_corpus_is_real_prose_available_offline():
    documents = load_documents(BUILTIN)
    assert len(documents.texts) > 50 and documents.unit == "topic"
    assert sum(len(d) for d in documents.texts) > 300_000
    assert len(set(documents.ids)) == len(documents.ids)


def test_no_document_is_in_two_splits_and_each_held_out_document_gives_one_row():
    tokenizer = tiny_tokenizer(300)
    settings = DataSettings(corpus=BUILTIN, seq_len=64, selection_docs=8, evaluation_docs=12, seed=3)
    first, again = load_corpus(tokenizer, settings), load_corpus(tokenizer, settings)
    assert torch.equal(first.train, again.train) and first.fingerprint == again.fingerprint
    ids = {split: set(first.document_ids[split]) for split in ("train", "selection", "evaluation")}
    assert not ids["train"] & ids["selection"] and not ids["train"] & ids["evaluation"]
    assert not ids["selection"] & ids["evaluation"]
    assert ids["train"] | ids["selection"] | ids["evaluation"] == set(load_documents(BUILTIN).ids)
    assert (len(first.selection), len(first.evaluation)) == (8, 12) == (len(ids["selection"]), len(ids["evaluation"]))
    described = first.describe()
    assert (described["selection_documents"], described["evaluation_documents"]) == (8, 12)
    # each held-out row is a stretch of its own document's tokens, at a position the seed chooses
    documents = load_documents(BUILTIN)
    texts = dict(zip(documents.ids, documents.texts, strict=True))
    for row, document in zip(first.selection, first.document_ids["selection"], strict=True):
        tokens = tokenizer(texts[document], add_special_tokens=False)["input_ids"]
        assert any(tokens[i : i + 64] == row.tolist() for i in range(len(tokens) - 63))
    other = load_corpus(
        tokenizer, DataSettings(corpus=BUILTIN, seq_len=64, selection_docs=8, evaluation_docs=12, seed=4)
    )
    assert set(other.document_ids["selection"]) != ids["selection"] and other.fingerprint != first.fingerprint


def test_held_out_rows_can_be_shorter_than_the_kd_rows():
    corpus = load_corpus(
        tiny_tokenizer(300), DataSettings(corpus=BUILTIN, seq_len=64, heldout_tokens=32, selection_docs=4)
    )
    assert corpus.train.shape[1] == 64 and corpus.selection.shape[1] == corpus.evaluation.shape[1] == 32


def test_a_corpus_with_too_few_documents_scales_its_held_out_sets_and_says_so(capsys):
    corpus = load_corpus(tiny_tokenizer(300), DataSettings(corpus=BUILTIN, seq_len=32))  # asks for 64 + 128
    assert 2 <= len(corpus.selection) < 64 and len(corpus.evaluation) < 128
    assert "too few for 64 selection and 128 evaluation documents" in capsys.readouterr().out


@needs_data
def test_auto_corpus_is_the_wikipedia_file_when_the_data_directory_has_it(tmp_path):
    assert resolve_corpus("auto", SHARED_DATA) == str(SHARED_DATA / "corpus" / "wiki_en_core.jsonl")
    assert resolve_corpus("auto", tmp_path) == BUILTIN  # a data directory without the corpus
    assert resolve_corpus("auto", None) == BUILTIN
    assert resolve_corpus("my.txt", SHARED_DATA) == "my.txt"
    assert load_documents(str(SHARED_DATA / "corpus" / "wiki_en_core.jsonl")).unit == "article"


def test_data_directory_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("SLIMNAS_DATA", raising=False)
    assert find_data_dir(str(tmp_path)) == tmp_path
    monkeypatch.setenv("SLIMNAS_DATA", str(tmp_path))
    assert find_data_dir(None) == tmp_path
    with pytest.raises(SlimnasError, match="data.dir points to .*nowhere"):
        find_data_dir(str(tmp_path / "nowhere"))


def test_text_files_are_articles_or_form_feed_blocks_and_jsonl_lines_are_documents(tmp_path):
    wiki = " = Alpha = \n\n one paragraph . \n\n two paragraphs . \n\n = Beta = \n\n three . \n"
    (tmp_path / "w.txt").write_text(wiki)
    articles = load_documents(str(tmp_path / "w.txt"))  # one article may not straddle two splits
    assert articles.unit == "article" and len(articles.texts) == 2 and "two paragraphs" in articles.texts[0]
    (tmp_path / "f.txt").write_text("doc one.\n\npart two of one.\fdoc two.")
    blocks = load_documents(str(tmp_path / "f.txt"))
    assert blocks.unit == "form-feed block" and blocks.texts == ["doc one.\n\npart two of one.", "doc two."]
    assert blocks.meaning == "a block between form feeds (the file has no WikiText headings)"
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"text": "alpha", "id": "x"}) + "\n" + json.dumps({"text": "b"}) + "\n"
    )
    lines = load_documents(str(tmp_path / "b.jsonl"))
    assert lines.texts == ["alpha", "b"] and lines.ids == ["x", "1"] and lines.unit == "line"
    rows = pack([[5, 6, 7]] * 20, eos=1, seq_len=8)
    assert rows.shape == (10, 8) and rows.dtype == torch.int64 and rows[0].tolist() == [5, 6, 7, 1, 5, 6, 7, 1]


def book(paragraphs: int) -> str:
    """One long text: numbered paragraphs separated by blank lines, no headings, no form feeds."""
    return "\n\n".join(
        f"Paragraph {i} of the book goes on about chapter {i // 10} at length." * 4 for i in range(paragraphs)
    )


def test_paragraphs_of_one_text_are_refused_as_held_out_documents(tmp_path):
    (tmp_path / "book.txt").write_text(book(300))  # enough paragraphs for both held-out sets
    settings = DataSettings(corpus=str(tmp_path / "book.txt"), seq_len=16, selection_docs=4, evaluation_docs=4)
    with pytest.raises(SlimnasError, match=r"book.txt marks no documents .* its 300 paragraphs") as refused:
        load_corpus(tiny_tokenizer(300), settings)
    assert "\n" not in str(refused.value) and "form feed" in str(refused.value)
    with pytest.raises(SlimnasError, match="marks no documents"):  # another held-out text (WikiText-2 valid's role)
        text_rows(tmp_path / "book.txt", tiny_tokenizer(300), 16, seed=0)
    # the same text with its documents marked by form feeds: each block is a document, and the line says so
    (tmp_path / "books.txt").write_text("\f".join(book(3) for _ in range(40)))
    corpus = load_corpus(tiny_tokenizer(300), replace(settings, corpus=str(tmp_path / "books.txt")))
    assert corpus.unit == "form-feed block" and corpus.documents("train") == 32
    assert "one document = a block between form feeds (the file has no WikiText headings)" in corpus.line()


def test_the_cli_refuses_a_text_of_paragraphs_with_one_line_and_exit_2(tiny_checkpoint, tmp_path, capsys):
    from slimnas.cli import main

    (tmp_path / "book.txt").write_text(book(300))
    assert main(["importance", f"teacher={tiny_checkpoint}", f"data.corpus={tmp_path / 'book.txt'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("slimnas: error:") and "marks no documents" in err[0]


def test_hub_rows_without_a_document_column_are_documents_and_the_corpus_line_says_so(monkeypatch):
    import datasets

    texts = [f"row {i} of a dataset with a text column only, long enough for a row." * 3 for i in range(40)]
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_dict({"text": texts}))
    settings = DataSettings(corpus="hf:someone/rows", seq_len=16, selection_docs=4, evaluation_docs=4)
    corpus = load_corpus(tiny_tokenizer(300), settings)
    assert corpus.unit == "row" and corpus.documents("train") == 32
    assert "one document = one row (no doc_id, document_id, id, title, url column groups rows" in corpus.line()
    titled = {"text": texts, "title": [f"article {i // 2}" for i in range(40)]}  # two rows an article
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_dict(titled))
    grouped = load_corpus(tiny_tokenizer(300), settings)
    assert grouped.documents("train") == 12 and "one document = the rows sharing one title" in grouped.line()


@needs_data
def test_wikitext_valid_gives_one_row_per_article():
    rows, unit = text_rows(SHARED_DATA / "wikitext2" / "wiki.valid.tokens", tiny_tokenizer(300), 64, seed=0)
    assert unit == "article" and 30 <= len(rows) <= 70 and rows.shape[1] == 64
    assert len({tuple(r) for r in rows.tolist()}) == len(rows)


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


def test_a_corpus_too_small_for_its_held_out_sets_is_refused(tmp_path):
    (tmp_path / "tiny.txt").write_text("\f".join(["a short document of text."] * 3))
    with pytest.raises(SlimnasError, match="corpus too small"):
        load_corpus(tiny_tokenizer(300), DataSettings(corpus=str(tmp_path / "tiny.txt"), seq_len=64))
