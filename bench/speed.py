"""Speed and memory: prefill and decode throughput, per-token decode latency, peak memory.

Greedy decoding runs token by token with the KV cache so each step can be timed: CUDA events with
synchronisation on GPU, perf_counter on CPU. Peak memory is the CUDA allocator's peak on GPU and
the process's peak RSS on CPU (reset before the measurement where Linux allows it).
"""

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel

from compress.arch import flops_per_token, param_count
from compress.precision import autocast, synchronize


@dataclass(frozen=True)
class SpeedSettings:
    batch_size: int = 1
    prompt_len: int = 128
    new_tokens: int = 32
    warmup: int = 1
    repeats: int = 3
    precision: str = "auto"


@dataclass
class SpeedRecord:
    model: str
    device: str
    params: int
    flops_per_token: int  # analytic, at the prompt length as context
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    latency_p50_ms: float  # per decoded token, batch included
    latency_p90_ms: float
    peak_memory_bytes: int
    memory_kind: str  # cuda_max_allocated or cpu_peak_rss


class _Timer:
    """Elapsed seconds of a block: CUDA events on GPU, perf_counter elsewhere."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.started = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.end.record()
            torch.cuda.synchronize(self.device)
            self.seconds = self.start.elapsed_time(self.end) / 1000
        else:
            self.seconds = time.perf_counter() - self.started


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    clear_refs = Path("/proc/self/clear_refs")
    if clear_refs.exists():
        try:
            clear_refs.write_text("5")  # Linux: resets the peak RSS (VmHWM) to the current RSS
        except OSError:
            pass


def _peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024, "cpu_peak_rss"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu_peak_rss"


@torch.no_grad()
def _generate(model: PreTrainedModel, prompt: torch.Tensor, new_tokens: int, device, precision: str):
    """Prefill, then greedy decode with the KV cache; returns (prefill seconds, per-step seconds)."""
    with autocast(device, precision):
        with _Timer(device) as prefill:
            out = model(input_ids=prompt, use_cache=True)
        cache, steps = out.cache, []
        next_ids = out.logits[:, -1:].argmax(-1)
        for _ in range(new_tokens):
            with _Timer(device) as step:
                out = model(input_ids=next_ids, cache=cache, use_cache=True)
            cache, next_ids = out.cache, out.logits[:, -1:].argmax(-1)
            steps.append(step.seconds)
    return prefill.seconds, steps


def measure_speed(model: PreTrainedModel, settings: SpeedSettings, name: str = "model") -> SpeedRecord:
    device = next(model.parameters()).device
    model.eval()
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (settings.batch_size, settings.prompt_len), generator=generator)
    prompt = prompt.to(device)
    for _ in range(settings.warmup):
        _generate(model, prompt, min(4, settings.new_tokens), device, settings.precision)
    synchronize(device)
    _reset_peak_memory(device)
    prefill_seconds, step_seconds = [], []
    for _ in range(settings.repeats):
        prefill, steps = _generate(model, prompt, settings.new_tokens, device, settings.precision)
        prefill_seconds.append(prefill)
        step_seconds.extend(steps)
    peak, kind = _peak_memory(device)
    quantiles = statistics.quantiles(step_seconds, n=10) if len(step_seconds) > 1 else step_seconds * 9
    return SpeedRecord(
        model=name,
        device=str(device),
        params=param_count(model.config),
        flops_per_token=flops_per_token(model.config, settings.prompt_len),
        prefill_tokens_per_s=settings.batch_size * settings.prompt_len / statistics.median(prefill_seconds),
        decode_tokens_per_s=settings.batch_size * len(step_seconds) / sum(step_seconds),
        latency_p50_ms=1000 * statistics.median(step_seconds),
        latency_p90_ms=1000 * quantiles[8],
        peak_memory_bytes=peak,
        memory_kind=kind,
    )
