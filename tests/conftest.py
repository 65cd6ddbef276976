"""Shared fixtures: tiny random Llama-family models built in the test, and a tiny tokenizer."""

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def tiny_config(model_type: str = "llama", **overrides):
    settings = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_hidden_layers=4,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    settings.update(overrides)
    return AutoConfig.for_model(model_type, **settings)


def tiny_model(model_type: str = "llama", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), dtype=torch.float32)
    return model.eval()


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Each test gets its own slimnas cache, except the real teacher's conversion, shared across tests."""
    monkeypatch.setenv("SLIMNAS_CACHE", str(tmp_path / "cache"))
    teachers = Path(os.environ.get("SLIMNAS_TEST_TEACHERS", Path.home() / ".cache" / "slimnas" / "teachers"))
    (tmp_path / "cache").mkdir()
    teachers.mkdir(parents=True, exist_ok=True)
    (tmp_path / "cache" / "teachers").symlink_to(teachers)


def tiny_tokenizer(vocab_size: int = 128):
    """A byte-level BPE tokenizer trained on the built-in corpus: real tokenisation, tiny vocabulary."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<eos>", "<bos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[: vocab_size - 3],
    )
    tokenizer.train_from_iterator(list(topics.values())[:20], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")


def save_tiny_checkpoint(path: Path, model_type: str = "llama", seed: int = 0, **overrides) -> Path:
    vocab = overrides.setdefault("vocab_size", 300)
    tiny_model(model_type, seed, **overrides).save_pretrained(path)
    tiny_tokenizer(vocab).save_pretrained(path)
    return path


@pytest.fixture
def tiny_checkpoint(tmp_path) -> Path:
    return save_tiny_checkpoint(tmp_path / "tiny-teacher")
