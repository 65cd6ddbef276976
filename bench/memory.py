"""Peak memory of one model on its own: weights, KV cache, activations and autocast copies.

Measured where nothing else is loaded, so a teacher or an optimizer living beside the model in the
calling process does not count. On CPU a fresh Python process loads the model and runs one greedy
generation; its peak resident memory minus what it held just before loading is the model's own. A
tiny model is loaded and run first, so the libraries' one-off set-up (lazy imports, kernel and thread
pools, tens of MiB) is not billed to the model measured. On CUDA the caching allocator's peak during
load and generation, minus what was allocated before, is the same in-process.

    python -m slimnas.bench.memory MODEL [--prompt-len 128 --new-tokens 32 --precision auto]
"""

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from slimnas.bench.settings import SpeedSettings
from slimnas.bench.speed import generate_timed
from slimnas.core.errors import SlimnasError

CPU_METHOD = "fresh process: peak RSS - RSS before loading"
CUDA_METHOD = "CUDA allocator: peak - allocated before loading"


@dataclass
class MemoryRecord:
    model: str
    peak_bytes: int  # the model's own peak during load + one generation
    weight_bytes: int  # parameters and buffers as loaded
    method: str


def status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise SlimnasError(f"/proc/self/status has no {field}: peak memory needs Linux on CPU")


def _load_and_generate(model_name: str, settings: SpeedSettings, device: torch.device) -> int:
    from slimnas.compress.models import load_model

    model = load_model(model_name, device).model
    prompt = torch.randint(0, model.config.vocab_size, (settings.batch_size, settings.prompt_len)).to(device)
    generate_timed(model, prompt, settings.new_tokens, settings.precision)
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def _warm_up(settings: SpeedSettings) -> None:
    """Load and run a tiny Llama once: what any later load and generation sets up once is then already held."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1,
        vocab_size=256, max_position_embeddings=settings.prompt_len + settings.new_tokens,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as directory:
        LlamaForCausalLM(config).save_pretrained(directory)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, use_safetensors=True)
    prompt = torch.randint(0, config.vocab_size, (settings.batch_size, settings.prompt_len))
    generate_timed(model, prompt, settings.new_tokens, settings.precision)


def measure_memory(model_name: str, settings: SpeedSettings, device: torch.device) -> MemoryRecord:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        weights = _load_and_generate(model_name, settings, device)
        peak = torch.cuda.max_memory_allocated(device) - before
        return MemoryRecord(model_name, peak, weights, CUDA_METHOD)
    command = [sys.executable, "-m", "slimnas.bench.memory", model_name, "--prompt-len", str(settings.prompt_len)]
    command += ["--new-tokens", str(settings.new_tokens), "--batch-size", str(settings.batch_size)]
    command += ["--precision", settings.precision]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise SlimnasError(f"memory measurement of {model_name} failed: {last}")
    return MemoryRecord(**json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description="peak memory of one model in a fresh process (CPU)")
    parser.add_argument("model")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()
    settings = SpeedSettings(args.batch_size, args.prompt_len, args.new_tokens, precision=args.precision)
    _warm_up(settings)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    except OSError:
        pass  # a restricted container: the peak then counts from start-up, a little higher
    before = status_bytes("VmRSS")
    weights = _load_and_generate(args.model, settings, torch.device("cpu"))
    peak = status_bytes("VmHWM") - before
    print(json.dumps(MemoryRecord(args.model, peak, weights, CPU_METHOD).__dict__))


if __name__ == "__main__":
    main()
