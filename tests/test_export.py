"""GGUF export, checked by reading the file back with transformers' own GGUF loader (no mocks)."""

import json

import pytest
import torch
from conftest import save_tiny_checkpoint, tiny_model, tiny_tokenizer
from gguf import GGMLQuantizationType, GGUFReader
from hydra import compose, initialize_config_module
from safetensors.torch import load_file, save_file
from test_llamacpp import MIXED, save_student
from transformers import AutoModelForCausalLM, AutoTokenizer

from slimnas.cli import main
from slimnas.compress.export import export_gguf, tensor_count
from slimnas.core.errors import SlimnasError
from slimnas.recipes import export as run_export

SENTENCE = "The quick brown fox jumps over the lazy dog: 12,345 <eos> ünïcödé!"
# Tolerances on the logits (O(1) for these random models), measured with seed 0: f32 0.0 (exact),
# f16 3.3e-4, bf16 3.1e-3. f16 / bf16 round each weight by up to 2^-11 / 2^-8 relative, so errors of
# 1e-4..1e-3 / 1e-3..1e-2 are expected. The f16 bound stays below the 1.5e-2 that a missing K-row
# permutation costs, so even the f16 case would catch that bug.
TOLERANCE = {"f32": 1e-4, "f16": 5e-3, "bf16": 1e-2}


def export_settings(*overrides: str):
    """conf/export.yaml with overrides, composed by Hydra as the CLI does (the file is standalone: no defaults list)."""
    with initialize_config_module(config_module="slimnas.conf", version_base=None):
        return compose(config_name="export", overrides=list(overrides))


def logits_of(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


def assert_round_trip(checkpoint, gguf_file, tolerance: float, vocab_size: int = 300):
    """The GGUF model's logits match the checkpoint's, and its tokenizer encodes like the checkpoint's."""
    tokens = torch.randint(3, vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    original = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name).eval()
    difference = (logits_of(original, tokens) - logits_of(loaded, tokens)).abs().max().item()
    assert difference < tolerance, f"max abs logit difference {difference:.3g} >= {tolerance}"
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    gguf_tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    assert gguf_tokenizer(SENTENCE).input_ids == tokenizer(SENTENCE).input_ids
    assert gguf_tokenizer.decode(tokenizer(SENTENCE).input_ids) == SENTENCE
    assert (gguf_tokenizer.bos_token, gguf_tokenizer.eos_token, gguf_tokenizer.pad_token) == ("<bos>", "<eos>", "<pad>")
    return loaded


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_gguf_round_trip_reproduces_the_model_and_tokenizer(tiny_checkpoint, tmp_path, dtype):
    out = export_gguf(tiny_checkpoint, tmp_path / "out" / "tiny.gguf", dtype)
    loaded = assert_round_trip(tiny_checkpoint, out, TOLERANCE[dtype])
    assert loaded.config.tie_word_embeddings and loaded.config.num_key_value_heads == 2
    reader = GGUFReader(out)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert "output.weight" not in types and len(types) == tensor_count(out) == 2 + 4 * 9
    matrix = {"f32": GGMLQuantizationType.F32, "f16": GGMLQuantizationType.F16, "bf16": GGMLQuantizationType.BF16}
    assert types["token_embd.weight"] == types["blk.0.attn_k.weight"] == matrix[dtype]
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == GGMLQuantizationType.F32
    fields = reader.fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["llama.attention.key_length"].contents() == fields["llama.rope.dimension_count"].contents() == 16
    assert fields["tokenizer.ggml.model"].contents() == "gpt2" and fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert fields["tokenizer.ggml.add_bos_token"].contents() is False
    assert [p.name for p in out.parent.iterdir()] == ["tiny.gguf"]  # no staging file left behind


def test_pruned_shape_with_hidden_size_unequal_to_heads_times_head_dim(tmp_path):
    checkpoint = save_tiny_checkpoint(tmp_path / "pruned", hidden_size=48, num_attention_heads=4, head_dim=16)
    loaded = assert_round_trip(checkpoint, export_gguf(checkpoint, tmp_path / "pruned.gguf"), TOLERANCE["f32"])
    assert (loaded.config.hidden_size, loaded.config.head_dim) == (48, 16)


def test_untied_embeddings_write_and_load_the_output_matrix(tmp_path):
    checkpoint = save_tiny_checkpoint(tmp_path / "untied", tie_word_embeddings=False, num_key_value_heads=1)
    out = export_gguf(checkpoint, tmp_path / "untied.gguf")
    loaded = assert_round_trip(checkpoint, out, TOLERANCE["f32"])
    assert not loaded.config.tie_word_embeddings
    assert "output.weight" in {t.name for t in GGUFReader(out).tensors}


def test_mistral_exports_as_llama(tmp_path):
    # Not named just "mistral": transformers then loads it as a "mistral" GGUF, an architecture gguf-py lacks.
    checkpoint = save_tiny_checkpoint(tmp_path / "tiny-mistral", model_type="mistral")
    assert_round_trip(checkpoint, export_gguf(checkpoint, tmp_path / "mistral.gguf"), TOLERANCE["f32"])


def test_embedding_rows_past_the_tokenizer_get_placeholder_tokens(tmp_path):
    checkpoint = tmp_path / "padded"
    tiny_model(vocab_size=320).save_pretrained(checkpoint)
    tiny_tokenizer(300).save_pretrained(checkpoint)
    out = export_gguf(checkpoint, tmp_path / "padded.gguf")
    assert_round_trip(checkpoint, out, TOLERANCE["f32"], vocab_size=320)
    tokens = GGUFReader(out).fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == 320 and tokens[-1] == "[PAD319]"


def test_recipe_writes_beside_the_model_by_default_and_prints_one_line(tiny_checkpoint, capsys):
    run_export.main(export_settings(f"model={tiny_checkpoint}", "dtype=f16"))
    out = tiny_checkpoint / "model-f16.gguf"
    line = capsys.readouterr().out.strip()
    assert out.is_file() and line.startswith(f"wrote {out}: ") and "MiB, 38 tensors" in line


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["format=onnx"], "unknown export format 'onnx'"),
        (["dtype=q4"], "unknown GGUF dtype 'q4'"),
    ],
)
def test_recipe_rejects_bad_settings(tiny_checkpoint, overrides, message):
    with pytest.raises(SlimnasError, match=message):
        run_export.main(export_settings(f"model={tiny_checkpoint}", *overrides))
    assert not list(tiny_checkpoint.glob("*.gguf"))


def test_bad_inputs_raise_one_line_errors(tmp_path, tiny_checkpoint):
    (tmp_path / "empty").mkdir()
    cases = [
        (lambda: export_gguf(tmp_path / "empty", tmp_path / "a.gguf"), "no config.json"),
        (lambda: export_gguf(tiny_checkpoint, tmp_path / "a.gguf", "q4"), "unknown GGUF dtype 'q4'"),
        (
            lambda: export_gguf(save_tiny_checkpoint(tmp_path / "qwen", "qwen2"), tmp_path / "a.gguf"),
            "cannot export model type 'qwen2' to GGUF",
        ),
        (
            lambda: export_gguf(save_tiny_checkpoint(tmp_path / "bias", attention_bias=True), tmp_path / "a.gguf"),
            "unsupported attention_bias",
        ),
    ]
    sentencepiece_like = save_tiny_checkpoint(tmp_path / "byte-fallback")
    tokenizer = json.loads((sentencepiece_like / "tokenizer.json").read_text())
    tokenizer["model"]["byte_fallback"] = True  # as Llama 2's: not byte-level BPE
    (sentencepiece_like / "tokenizer.json").write_text(json.dumps(tokenizer))
    cases.append((lambda: export_gguf(sentencepiece_like, tmp_path / "a.gguf"), "Cannot find GPT-2 BPE tokenizer"))
    small = save_tiny_checkpoint(tmp_path / "small")
    tiny_tokenizer(320).save_pretrained(small)
    cases.append((lambda: export_gguf(small, tmp_path / "a.gguf"), "320 tokens, more than the model's vocab_size 300"))
    for export, message in cases:
        with pytest.raises(SlimnasError, match=message) as caught:
            export()
        assert "\n" not in str(caught.value)
    assert not (tmp_path / "a.gguf").exists()


def test_a_failure_while_writing_leaves_no_file(tmp_path, tiny_checkpoint):
    weights = load_file(tiny_checkpoint / "model.safetensors")
    save_file({**weights, "model.extra.weight": torch.zeros(2)}, tiny_checkpoint / "model.safetensors")
    with pytest.raises(SlimnasError, match="'model.extra.weight': it has no GGUF name"):
        export_gguf(tiny_checkpoint, tmp_path / "out" / "x.gguf")
    assert list((tmp_path / "out").iterdir()) == []


def test_a_sharded_checkpoint_exports_every_shard(tmp_path):
    checkpoint = tmp_path / "sharded"
    tiny_model(vocab_size=300).save_pretrained(checkpoint, max_shard_size="100KB")
    tiny_tokenizer(300).save_pretrained(checkpoint)
    assert len(list(checkpoint.glob("model-*.safetensors"))) > 1
    assert_round_trip(checkpoint, export_gguf(checkpoint, tmp_path / "sharded.gguf"), TOLERANCE["f32"])


def test_per_layer_student_is_written_as_deci_with_per_layer_arrays(tmp_path):
    """Head counts, KV heads and FFN widths per layer; an attention-free layer has no attention tensors; an FFN-free
    layer gets one all-zero neuron (deci would skip its whole block, attention included, at width 0)."""
    save_student(tmp_path / "student", MIXED)
    out = export_gguf(tmp_path / "student", tmp_path / "student.gguf", "f16")
    reader = GGUFReader(out)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    assert fields["general.architecture"] == "deci" and fields["deci.block_count"] == 4  # layer 4 dropped
    assert fields["deci.attention.head_count"] == [4, 2, 0, 2]
    assert fields["deci.attention.head_count_kv"] == [2, 1, 0, 2]
    assert fields["deci.feed_forward_length"] == [96, 40, 64, 1]
    tensors = {t.name: t for t in reader.tensors}
    assert not [name for name in tensors if name.startswith("blk.2.attn")]
    assert tensors["blk.1.attn_k.weight"].shape.tolist() == [48, 16]  # one KV group of 16
    assert not tensors["blk.3.ffn_down.weight"].data.any() and tensors["blk.3.ffn_gate.weight"].shape.tolist() == [
        48,
        1,
    ]


@pytest.mark.parametrize("model_type, lacks", [("qwen2", "q/k/v projection biases"), ("qwen3", "q/k norms")])
def test_per_layer_student_of_a_family_deci_cannot_express_is_refused_in_one_line(tmp_path, capsys, model_type, lacks):
    save_student(tmp_path / "student", MIXED, model_type)
    capsys.readouterr()  # the save's progress bar
    assert main(["export", f"model={tmp_path / 'student'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"per-layer {model_type} student" in err and lacks in err
    assert not list(tmp_path.glob("student/*.gguf"))
