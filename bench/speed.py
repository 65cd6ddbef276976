"""Speed: prefill and decode throughput and per-token decode latency, timed against a reference model.

Greedy decoding runs token by token with the KV cache so each step can be timed: CUDA events with
synchronisation on GPU, perf_counter on CPU. A model is timed against a reference (the teacher) in
ABBA blocks: model, reference, reference, model. Each block gives one ratio (the reference's two
timings over the model's two), so a machine that speeds up or slows down steadily during a block
affects both sides alike, and load from another process slows both sides of a block alike: the ratio
stays meaningful where absolute tokens/s do not. The number of blocks is fixed (`repeats`): stopping
once the error bar looks small enough would bias the error bar itself. The CPU load at the start is
recorded with every measurement.

ABBA cancels steady load, not a burst: another process busy during one block inflates that block's
ratio. Such a decode speed-up is wide (its error bar over `speed.stable_stderr` of it) or faster than
the FLOPs allow (over `speed.stable_flops_ratio` times the FLOPs ratio), and is timed again, whole,
`speed.retimes` times at most. The last timing is kept; still unstable, it says why (`unstable`), and the
tables mark it, the speed plot draws it hollow, and the front over measured objectives leaves it out.

What runs the generations is the engine (`speed.engine`): PyTorch, the model as it is trained (here), or
llama.cpp on the model's GGUF export (bench.llamacpp), as CPU users deploy it. The ABBA blocks, the ratios and
the re-timing are the same for both; every record says which engine measured it.
"""

import statistics
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from slimnas.bench.settings import SpeedSettings
from slimnas.compress.arch import flops_per_token, param_count
from slimnas.compress.export import check_exportable
from slimnas.core.device import autocast, cpu_load, model_device, synchronize
from slimnas.core.errors import SlimnasError
from slimnas.core.stats import mean_and_stderr


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
    repeats: int
    cpu_load: float  # 1-minute load average per core when the measurement started
    engine: str = "torch"  # what ran the generations (speed.engine)


@dataclass
class SpeedComparison:
    """A model and its reference timed in ABBA blocks in one run: the ratios are the comparable numbers."""

    model: SpeedRecord
    reference: SpeedRecord
    decode_speedup: float
    decode_speedup_stderr: float
    prefill_speedup: float
    prefill_speedup_stderr: float
    flops_reduction: float  # reference FLOPs per token / model FLOPs per token
    measurements: int = 1  # how often the pair was timed: an unstable speed-up is timed again (speed.retimes)
    unstable: str | None = None  # why the decode speed-up is still unstable after that; None when it is stable

    def as_row(self) -> dict:
        return {
            "model": self.model.model,
            "reference": self.reference.model,
            "engine": self.model.engine,
            "decode_speedup": self.decode_speedup,
            "decode_speedup_stderr": self.decode_speedup_stderr,
            "prefill_speedup": self.prefill_speedup,
            "prefill_speedup_stderr": self.prefill_speedup_stderr,
            "flops_reduction": self.flops_reduction,
            "decode_speedup_per_flops": self.decode_speedup / self.flops_reduction,
            "measurements": self.measurements,
            "unstable": self.unstable,
        }


def instability(comparison: SpeedComparison, settings: SpeedSettings) -> str | None:
    """Why a decode speed-up cannot be trusted, or None: an error bar too wide for its value, or more speed than the
    FLOPs allow (a model with 1/k of the reference's FLOPs per token is not much more than k times as fast)."""
    value, stderr, flops = comparison.decode_speedup, comparison.decode_speedup_stderr, comparison.flops_reduction
    reasons = []
    if not stderr <= settings.stable_stderr * value:  # a NaN error bar is no error bar
        reasons.append(f"its error bar {stderr:.2f} is over {settings.stable_stderr:.0%} of it")
    if value > settings.stable_flops_ratio * flops:
        reasons.append(f"it is over {settings.stable_flops_ratio:g} x the FLOPs ratio {flops:.2f}")
    return f"decode speed-up {value:.2f}x unstable: {' and '.join(reasons)}" if reasons else None


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


@torch.no_grad()
def generate_timed(model: PreTrainedModel, prompt: torch.Tensor, new_tokens: int, precision: str):
    """Prefill, then greedy decode with the KV cache; returns (prefill seconds, per-step seconds)."""
    device = model_device(model)
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


class Timings(ABC):
    """One model's timed generations in one engine: the prompt (seeded, the same for every model and engine), then
    the prefill seconds and per-step decode seconds of each run."""

    engine: str

    def __init__(self, name: str, config: PretrainedConfig, settings: SpeedSettings):
        self.name, self.config, self.settings = name, config, settings
        generator = torch.Generator().manual_seed(0)
        shape = (settings.batch_size, settings.prompt_len)
        self.prompt = torch.randint(0, config.vocab_size, shape, generator=generator)
        self.prefill: list[float] = []
        self.steps: list[list[float]] = []

    @property
    @abstractmethod
    def device(self) -> str: ...

    @abstractmethod
    def generate(self, new_tokens: int) -> tuple[float, list[float]]:
        """Prefill the prompt, then greedy decode `new_tokens` with the KV cache: (prefill s, per-step s)."""

    def warm_up(self) -> None:
        for _ in range(self.settings.warmup):
            self.generate(min(4, self.settings.new_tokens))

    def run_once(self) -> None:
        prefill, steps = self.generate(self.settings.new_tokens)
        self.prefill.append(prefill)
        self.steps.append(steps)

    def record(self, load: float) -> SpeedRecord:
        batch, prompt_len = self.settings.batch_size, self.settings.prompt_len
        steps = [s for repeat in self.steps for s in repeat]
        quantiles = statistics.quantiles(steps, n=10) if len(steps) > 1 else steps * 9
        return SpeedRecord(
            model=self.name,
            device=self.device,
            params=param_count(self.config),
            flops_per_token=flops_per_token(self.config, prompt_len),
            prefill_tokens_per_s=batch * prompt_len / statistics.median(self.prefill),
            decode_tokens_per_s=batch * len(steps) / sum(steps),
            latency_p50_ms=1000 * statistics.median(steps),
            latency_p90_ms=1000 * quantiles[8],
            repeats=len(self.steps),
            cpu_load=load,
            engine=self.engine,
        )


class TorchTimings(Timings):
    """The model in PyTorch, where it is, at the settings' precision."""

    engine = "torch"

    def __init__(self, name: str, model: PreTrainedModel, settings: SpeedSettings):
        super().__init__(name, model.config, settings)
        self.model = model.eval()
        self.prompt = self.prompt.to(model_device(model))
        self.warm_up()
        synchronize(model_device(model))

    @property
    def device(self) -> str:
        return str(model_device(self.model))

    def generate(self, new_tokens: int) -> tuple[float, list[float]]:
        return generate_timed(self.model, self.prompt, new_tokens, self.settings.precision)


def check_engine(settings: SpeedSettings, teacher: PretrainedConfig, source: str) -> None:
    """Before any compute: llama.cpp times GGUF exports, so with speed.engine=llamacpp the teacher (and so its
    students, of its family) must export to GGUF; refused in one line otherwise."""
    if settings.engine == "llamacpp":
        try:
            check_exportable(teacher, source)
        except SlimnasError as error:
            raise SlimnasError(f"speed.engine=llamacpp times GGUF exports: {error}") from None


TimingsOf = Callable[[str, PreTrainedModel], Timings]  # (name, model) -> its timings, warmed up


@contextmanager
def speed_engine(settings: SpeedSettings, tokenizer: PreTrainedTokenizerBase | None = None) -> Iterator[TimingsOf]:
    """How `speed.engine` times a model: in PyTorch as it is, or in llama.cpp from its GGUF export, which needs the
    tokenizer (the GGUF holds the vocabulary). llama.cpp is an optional extra: its module is imported only here."""
    if settings.engine == "llamacpp":
        from slimnas.bench.llamacpp import gguf_timings

        with gguf_timings(settings, tokenizer) as timings_of:
            yield timings_of
    else:
        yield lambda name, model: TorchTimings(name, model, settings)


def measure_speed(
    model: PreTrainedModel,
    settings: SpeedSettings,
    name: str = "model",
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> SpeedRecord:
    """One model on its own: absolute numbers, comparable only with others taken on a quiet, equal machine."""
    load = cpu_load()
    with speed_engine(settings, tokenizer) as timings_of:
        timings = timings_of(name, model)
        for _ in range(settings.repeats):
            timings.run_once()
    return timings.record(load)


def compare_speed(
    model: PreTrainedModel,
    reference: PreTrainedModel,
    settings: SpeedSettings,
    name: str = "model",
    reference_name: str = "teacher",
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> SpeedComparison:
    """Time model and reference in ABBA blocks in the settings' engine (`tokenizer`: both models', which llama.cpp
    needs); an unstable speed-up is timed again (module doc), the last kept."""
    with speed_engine(settings, tokenizer) as timings_of:
        for measurement in range(1, settings.retimes + 2):
            comparison = time_pair(timings_of, model, reference, settings, name, reference_name)
            comparison.measurements, comparison.unstable = measurement, instability(comparison, settings)
            if comparison.unstable is None:
                break
            again = "timing it again" if measurement <= settings.retimes else f"marked so after {measurement} timings"
            print(f"note: {name}: {comparison.unstable}; {again}", flush=True)
    return comparison


def time_pair(
    timings_of: TimingsOf,
    model: PreTrainedModel,
    reference: PreTrainedModel,
    settings: SpeedSettings,
    name: str,
    reference_name: str,
) -> SpeedComparison:
    """One timing of model and reference in ABBA blocks; each block's ratio is one sample of the speed-up."""
    load = cpu_load()
    timed, baseline = timings_of(name, model), timings_of(reference_name, reference)
    decode_ratios, prefill_ratios = [], []
    for _ in range(settings.repeats):
        for timings in (timed, baseline, baseline, timed):
            timings.run_once()
        decode_ratios.append(sum(map(sum, baseline.steps[-2:])) / sum(map(sum, timed.steps[-2:])))
        prefill_ratios.append(sum(baseline.prefill[-2:]) / sum(timed.prefill[-2:]))
    record, reference_record = timed.record(load), baseline.record(load)
    decode, decode_stderr = mean_and_stderr(decode_ratios)
    prefill, prefill_stderr = mean_and_stderr(prefill_ratios)
    return SpeedComparison(
        record,
        reference_record,
        decode_speedup=decode,
        decode_speedup_stderr=decode_stderr,
        prefill_speedup=prefill,
        prefill_speedup_stderr=prefill_stderr,
        flops_reduction=reference_record.flops_per_token / record.flops_per_token,
    )
