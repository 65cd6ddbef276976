"""Export a Hugging Face Llama-family checkpoint to one GGUF file, for llama.cpp (and transformers' GGUF loader).

A uniform student is a vanilla checkpoint, so the export is llama.cpp's own conversion for llama
(convert_hf_to_gguf.py) done with the `gguf` package: the same metadata keys, tensor names, Q/K row
order and byte-level BPE vocabulary. A per-layer student is written with llama.cpp's `deci` architecture, the
one it runs Puzzle / Nemotron-NAS models with: the same tensors, and per-layer arrays for the head count, the KV
head count and the FFN width (conversion/deci.py writes Nemotron-51B the same way). Its graph (src/models/deci.cpp)
decides the encoding:

- an attention-free layer is head_count[i] = 0 (and head_count_kv[i] = 0), with no attention tensors;
- head_count_kv[i] = 0 with heads > 0 would be Nemotron's "linear attention" (a bare o_proj), never written here;
- feed_forward_length[i] = 0 skips the rest of the block, attention included, so a layer whose MLP was removed is
  written with one all-zero neuron (its FFN adds exactly 0); a dropped layer is not in the checkpoint at all.

Two details matter for every pruned model:

- hidden_size can differ from heads * head_dim, so head_dim is written explicitly (rope dimension
  count and attention key/value length; transformers reads head_dim back from the rope count).
- llama.cpp applies rotary embeddings to interleaved pairs, Hugging Face to the two halves of each
  head, so the rows of q_proj and k_proj are permuted per head (k_proj over the KV heads).

Only what both readers understand is exported: no attention or MLP biases, no rope scaling, no
sliding window, and tokenizers must be byte-level BPE (tokenizer.json).
"""

import struct
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig

import slimnas.compress.modeling  # noqa: F401  (registers the per-layer students, so their config.json reads)
from slimnas.compress.arch import PerLayerArchitecture, family, head_dim
from slimnas.core.errors import SlimnasError, first_line
from slimnas.core.files import atomic_path, read_json

EXPORTABLE_MODEL_TYPES = ("llama", "mistral")  # mistral: same tensors as llama, written as llama like llama.cpp does
# What llama.cpp's deci graph lacks for a per-layer student of these families (uniform ones are refused as above).
DECI_LACKS = {"qwen2": "q/k/v projection biases", "qwen3": "q/k norms"}
FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
}


@dataclass
class Vocabulary:
    """A byte-level BPE tokenizer in GGUF terms ("gpt2" model)."""

    tokens: list[bytes]
    token_types: list[int]
    pre: str | None  # llama.cpp's name for the pre-tokenizer; None when not recognised
    special: gguf.SpecialVocab  # merges, special token ids, add_bos / add_eos flags, chat template


def export_gguf(model_dir: Path, out_file: Path, dtype: str = "f32") -> Path:
    """Write the checkpoint in model_dir as one GGUF file (atomically) and return its path."""
    model_dir, out_file = Path(model_dir).expanduser(), Path(out_file).expanduser()
    if dtype not in FILE_TYPES:
        raise SlimnasError(f"unknown GGUF dtype {dtype!r}: use {', '.join(FILE_TYPES)}")
    config = read_config(model_dir)
    vocabulary = read_vocabulary(model_dir, config.vocab_size)
    with atomic_path(out_file) as staging:
        writer = gguf.GGUFWriter(staging, gguf.MODEL_ARCH_NAMES[gguf_arch(config)])
        try:
            add_metadata(writer, config, model_dir.resolve().name, FILE_TYPES[dtype])
            add_vocabulary(writer, vocabulary)
            for name, array, raw_dtype in gguf_tensors(model_dir, config, dtype):
                writer.add_tensor(name, array, raw_dtype=raw_dtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return out_file


def tensor_count(gguf_file: Path) -> int:
    """Tensors in a GGUF file, read from its header (GGUFReader would parse all the metadata)."""
    with open(gguf_file, "rb") as f:
        magic, _version, count = struct.unpack("<IIQ", f.read(16))
    if magic != gguf.GGUF_MAGIC:
        raise SlimnasError(f"not a GGUF file: {gguf_file}")
    return count


# Config and metadata ---------------------------------------------------------------------------------------


def read_config(model_dir: Path) -> PretrainedConfig:
    """The checkpoint's config, refused unless llama.cpp's llama graph computes exactly this model."""
    if not (model_dir / "config.json").is_file():
        raise SlimnasError(f"not a Hugging Face checkpoint (no config.json): {model_dir}")
    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    except Exception as error:  # transformers raises many types for a bad config
        raise SlimnasError(f"cannot read {model_dir / 'config.json'}: {first_line(error)}") from error
    check_exportable(config, model_dir)
    return config


def check_exportable(config: PretrainedConfig, source: str | Path) -> None:
    """Refused in one line unless llama.cpp's llama or deci graph computes exactly this model (`source` names it)."""
    if config.is_heterogeneous and family(config) in DECI_LACKS:
        raise SlimnasError(
            f"cannot export a per-layer {family(config)} student to GGUF: llama.cpp's deci graph has no "
            f"{DECI_LACKS[family(config)]}"
        )
    if family(config) not in EXPORTABLE_MODEL_TYPES:
        raise SlimnasError(
            f"cannot export model type '{config.model_type}' to GGUF: only {', '.join(EXPORTABLE_MODEL_TYPES)}"
        )
    rope_type = rope_parameters(config)[1]
    window = getattr(config, "sliding_window", None)
    checks = {  # what the file cannot say, so llama.cpp and transformers would run another model
        "attention_bias": getattr(config, "attention_bias", False),
        "mlp_bias": getattr(config, "mlp_bias", False),
        f"hidden_act={config.hidden_act}": config.hidden_act != "silu",
        f"rope_type={rope_type}": rope_type != "default",
        f"sliding_window={window}": window is not None and window < config.max_position_embeddings,
    }
    if unsupported := [name for name, present in checks.items() if present]:
        raise SlimnasError(f"cannot export {source} to GGUF: unsupported {', '.join(unsupported)}")


def rope_parameters(config: PretrainedConfig) -> tuple[float, str]:
    """(rope theta, rope type); transformers 5 keeps them in rope_parameters, older configs at the top level."""
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))), rope.get("rope_type", "default")


def gguf_arch(config: PretrainedConfig) -> gguf.MODEL_ARCH:
    """llama for a uniform student, deci (per-layer head counts and FFN widths) for a per-layer one."""
    return gguf.MODEL_ARCH.DECI if config.is_heterogeneous else gguf.MODEL_ARCH.LLAMA


def add_metadata(writer: gguf.GGUFWriter, config: PretrainedConfig, name: str, file_type: int) -> None:
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    if config.is_heterogeneous:
        layers = PerLayerArchitecture.of(config).layers
        writer.add_feed_forward_length([layer.intermediate_size or 1 for layer in layers])  # 1: the zero neuron
        writer.add_head_count([layer.num_attention_heads for layer in layers])
        writer.add_head_count_kv([layer.num_key_value_heads for layer in layers])
    else:
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(rope_parameters(config)[0])
    # Explicit, as a pruned model may have hidden_size != heads * head_dim (llama.cpp's default).
    writer.add_rope_dimension_count(head_dim(config))
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


# Tokenizer -------------------------------------------------------------------------------------------------

# tokenizer.json pre-tokenizers llama.cpp knows by name (its convert script finds them by hashing sample output).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def pre_tokenizer_name(pre_tokenizer: dict | None) -> str | None:
    """llama.cpp's tokenizer.ggml.pre for a tokenizer.json pre_tokenizer, None when not one it knows."""
    steps = (pre_tokenizer or {}).get("pretokenizers", [pre_tokenizer] if pre_tokenizer else [])
    shape = [
        (s.get("type"), s.get("use_regex"), s.get("add_prefix_space"), s.get("individual_digits"), s.get("pattern"))
        for s in steps
    ]
    byte_level = ("ByteLevel", True, False, None, None)
    if shape == [byte_level]:
        return "gpt-2"
    if shape == [("Digits", None, None, True, None), byte_level]:
        return "smollm"  # SmolLM and StarCoder: single digits, then GPT-2's split
    if shape == [("Split", None, None, None, {"Regex": LLAMA3_SPLIT}), ("ByteLevel", False, False, None, None)]:
        return "llama-bpe"
    return None


def read_vocabulary(model_dir: Path, vocab_size: int) -> Vocabulary:
    """Tokens, types and specials of a byte-level BPE tokenizer.json, padded to the embedding's rows."""
    tokenizer_file = model_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise SlimnasError(f"no tokenizer.json in {model_dir}: GGUF export needs a byte-level BPE tokenizer")
    tokenizer = read_json(tokenizer_file)
    try:
        bpe = gguf.vocab.BpeVocab(model_dir)
    except (OSError, ValueError, KeyError, TypeError) as error:  # not byte-level BPE, or a malformed file
        raise SlimnasError(f"cannot export the tokenizer of {model_dir}: {first_line(error)}") from error
    entries = list(bpe.all_tokens())
    tokens = [text if isinstance(text, bytes) else text.encode() for text, _score, _type in entries]
    types = [int(token_type) for _text, _score, token_type in entries]
    # BpeVocab prefers vocab.json when there is one; transformers reads tokenizer.json: they must agree.
    expected = tokenizer["model"].get("vocab", {}) | {a["content"]: a["id"] for a in tokenizer.get("added_tokens", [])}
    if {token.decode(): i for i, token in enumerate(tokens)} != expected:
        raise SlimnasError(f"the tokenizer files in {model_dir} disagree (vocab.json and tokenizer.json)")
    # Added tokens (often inside the base vocabulary): special ones are CONTROL, others USER_DEFINED,
    # which llama.cpp and transformers both match whole in the text.
    for added in tokenizer.get("added_tokens", []):
        types[added["id"]] = int(gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED)
    if len(tokens) > vocab_size:
        raise SlimnasError(f"the tokenizer has {len(tokens)} tokens, more than the model's vocab_size {vocab_size}")
    # Embedding rows past the tokenizer get placeholder tokens, as llama.cpp's converter writes them.
    tokens += [f"[PAD{i}]".encode() for i in range(len(tokens), vocab_size)]
    types += [int(gguf.TokenType.UNUSED)] * (vocab_size - len(types))

    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise SlimnasError(f"no BPE merges in {tokenizer_file}")
    # A byte-level BPE tokenizer adds BOS / EOS only through tokenizer_config or its post-processor,
    # both read by SpecialVocab; say "no" explicitly rather than leave llama.cpp to guess.
    special.add_special_token.setdefault("bos", False)
    special.add_special_token.setdefault("eos", False)
    return Vocabulary(tokens, types, pre_tokenizer_name(tokenizer.get("pre_tokenizer")), special)


def add_vocabulary(writer: gguf.GGUFWriter, vocabulary: Vocabulary) -> None:
    writer.add_tokenizer_model("gpt2")
    if vocabulary.pre is not None:
        writer.add_tokenizer_pre(vocabulary.pre)
    writer.add_token_list(vocabulary.tokens)
    writer.add_token_types(vocabulary.token_types)
    vocabulary.special.add_to_gguf(writer, quiet=True)


# Tensors ---------------------------------------------------------------------------------------------------


def permute_rotary(weights: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of q_proj / k_proj from HF's half-split rotary layout to llama.cpp's interleaved pairs.

    The inverse of transformers' LlamaTensorProcessor._reverse_permute_weights (for k_proj, n_head is
    the KV head count); the same as llama.cpp's LlamaModel.permute.
    """
    rows = weights.shape[0]
    return weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def checkpoint_tensors(model_dir: Path):
    """(name, tensor) for every tensor of model.safetensors or of the shards its index lists."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(read_json(index)["weight_map"].values()))
    elif (model_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise SlimnasError(f"no model.safetensors in {model_dir}")
    for file in files:
        with safe_open(model_dir / file, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def gguf_tensors(model_dir: Path, config: PretrainedConfig, dtype: str):
    """(GGUF name, array, raw GGML type or None) for each weight, permuted and converted as llama.cpp stores them."""
    arch = gguf_arch(config)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    layers = PerLayerArchitecture.of(config).layers
    for hf_name, tensor in checkpoint_tensors(model_dir):
        if hf_name.endswith("rotary_emb.inv_freq") or (config.tie_word_embeddings and hf_name == "lm_head.weight"):
            continue  # recomputed from the config; a tied head is the embedding matrix
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise SlimnasError(
                f"cannot export tensor '{hf_name}': it has no GGUF name for {gguf.MODEL_ARCH_NAMES[arch]}"
            )
        tensor = tensor.float()
        if hf_name.endswith("self_attn.q_proj.weight"):
            tensor = permute_rotary(tensor, layers[layer_index(hf_name)].num_attention_heads)
        elif hf_name.endswith("self_attn.k_proj.weight"):
            tensor = permute_rotary(tensor, layers[layer_index(hf_name)].num_key_value_heads)
        yield name, *convert(tensor.contiguous().numpy(), dtype)
    for i, layer in enumerate(layers):
        if not layer.intermediate_size:  # MLP removed: one all-zero neuron, as deci skips a block with no FFN
            for tensor_name, array in zero_ffn(config.hidden_size).items():
                yield f"blk.{i}.{tensor_name}.weight", *convert(array, dtype)


def layer_index(hf_name: str) -> int:
    """i in model.layers.i.*"""
    return int(hf_name.split("layers.", 1)[1].split(".", 1)[0])


def zero_ffn(hidden_size: int) -> dict[str, np.ndarray]:
    """A one-neuron FFN that adds exactly 0 (its norm is the identity scale; the zero down projection decides)."""
    return {
        "ffn_norm": np.ones(hidden_size, dtype=np.float32),
        "ffn_gate": np.zeros((1, hidden_size), dtype=np.float32),
        "ffn_up": np.zeros((1, hidden_size), dtype=np.float32),
        "ffn_down": np.zeros((hidden_size, 1), dtype=np.float32),
    }


def convert(array: np.ndarray, dtype: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType | None]:
    """The array in the file's dtype; 1-D tensors (norms) stay f32, as llama.cpp writes and expects them."""
    if dtype == "f32" or array.ndim == 1:
        return array.astype(np.float32, copy=False), None
    if dtype == "f16":
        return array.astype(np.float16), None
    # numpy has no bfloat16: the writer takes the rounded values as bytes plus their GGML type
    bf16 = gguf.GGMLQuantizationType.BF16
    return gguf.quants.quantize(array, bf16), bf16
