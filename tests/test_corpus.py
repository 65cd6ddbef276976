import json

import pytest
import torch
from conftest import tiny_tokenizer

from compress.corpus import load_documents, pack, token_split
from compress.errors import SlimnasError


def test_builtin_corpus_is_real_prose_available_offline():
    documents = load_documents("builtin")
    assert len(documents) > 50
    assert sum(len(d) for d in documents) > 300_000


def test_split_is_deterministic_and_disjoint():
    tokenizer = tiny_tokenizer(300)
    first = token_split("builtin", tokenizer, seq_len=64, heldout_fraction=0.1, seed=3)
    again = token_split("builtin", tokenizer, seq_len=64, heldout_fraction=0.1, seed=3)
    other = token_split("builtin", tokenizer, seq_len=64, heldout_fraction=0.1, seed=4)
    assert torch.equal(first.train, again.train) and first.fingerprint == again.fingerprint
    assert first.fingerprint != other.fingerprint
    assert first.train.shape[1] == 64 and len(first.heldout) == round(0.1 * (len(first.train) + len(first.heldout)))
    packed = pack(load_documents("builtin"), tokenizer, seq_len=64)
    assert sorted(map(tuple, torch.cat([first.train, first.heldout]).tolist())) == sorted(map(tuple, packed.tolist()))


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
        ("{bad", "d.jsonl", "'text' field"),
    ],
)
def test_bad_corpus_inputs_give_clear_errors(tmp_path, content, name, message):
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(SlimnasError, match=message):
        load_documents(str(tmp_path / name))
