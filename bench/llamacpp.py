"""The llama.cpp speed engine (`speed.engine=llamacpp`): models timed where CPU users deploy them.

Each model of a comparison is exported once to a temporary GGUF (compress.export: `llama` for a uniform
student, `deci` for a per-layer one) and decoded greedily by llama.cpp (llama-cpp-python, the `slimnas[llamacpp]`
extra) on the CPU, batch 1, with bench.speed's ABBA blocks, ratios and re-timing around it.

The GGUFs are f16: what llama.cpp's own converter writes by default and what users run unquantised. A decode
step at batch 1 reads every weight once, so its speed depends much on the bytes read, and an f32 file would time
twice the deployed model's weight traffic. The KV cache keeps llama.cpp's default (f16) for the same reason; the
logit checks (tests/test_llamacpp.py) use f32 throughout, where exactness matters and speed does not. llama.cpp
computes the logits of the last position only, as a deployed decoder does, on the CPU (no layer offloaded) with
torch's thread count, so both engines use the same cores.
"""

import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import llama_cpp
import numpy as np
import torch
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from slimnas.bench.settings import SpeedSettings
from slimnas.bench.speed import Timings, TimingsOf
from slimnas.compress.export import export_gguf

GGUF_DTYPE = "f16"  # module doc: the deployed dtype


class LlamaCppDecoder:
    """Greedy decode of one sequence in llama.cpp with its KV cache: the prompt in one batch, then one token per
    step, each timed (llama.cpp's eval only, as bench.speed times the model's forward only)."""

    def __init__(self, gguf_file: Path, n_ctx: int, n_batch: int, threads: int):
        self.llm = llama_cpp.Llama(
            model_path=str(gguf_file), n_ctx=n_ctx, n_batch=n_batch, n_threads=threads, n_threads_batch=threads,
            n_gpu_layers=0, verbose=False,
        )  # fmt: skip
        self.n_vocab = self.llm.n_vocab()

    def next_token(self) -> int:
        """The argmax of the last position's logits (the only ones llama.cpp computed)."""
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.n_vocab,))
        return int(logits.argmax())

    def generate(self, prompt: list[int], new_tokens: int) -> tuple[float, list[float]]:
        """(prefill seconds, per-step seconds), from an empty KV cache."""
        self.llm.reset()
        started = time.perf_counter()
        self.llm.eval(prompt)
        prefill = time.perf_counter() - started
        token, steps = self.next_token(), []
        for _ in range(new_tokens):
            started = time.perf_counter()
            self.llm.eval([token])
            steps.append(time.perf_counter() - started)
            token = self.next_token()
        return prefill, steps


class LlamaCppTimings(Timings):
    """A model's GGUF timed in llama.cpp on the CPU, with bench.speed's prompt."""

    engine = "llamacpp"

    def __init__(self, name: str, config: PretrainedConfig, gguf_file: Path, settings: SpeedSettings):
        super().__init__(name, config, settings)
        self.decoder = LlamaCppDecoder(
            gguf_file, settings.prompt_len + settings.new_tokens, settings.prompt_len, torch.get_num_threads()
        )
        self.warm_up()

    @property
    def device(self) -> str:
        return "cpu"

    def generate(self, new_tokens: int) -> tuple[float, list[float]]:
        return self.decoder.generate(self.prompt[0].tolist(), new_tokens)


def export_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path) -> Path:
    """The model in memory as a GGUF file in `folder` (through a Hugging Face checkpoint, which the export reads)."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return export_gguf(folder, folder / f"model-{GGUF_DTYPE}.gguf", GGUF_DTYPE)


@contextmanager
def gguf_timings(settings: SpeedSettings, tokenizer: PreTrainedTokenizerBase | None) -> Iterator[TimingsOf]:
    """Timings in llama.cpp; each model is exported once while the context lasts (a re-timing reuses its GGUF)."""
    if tokenizer is None:
        raise ValueError("speed.engine=llamacpp needs the models' tokenizer: the GGUF holds the vocabulary")
    with tempfile.TemporaryDirectory(prefix="slimnas-gguf-") as scratch:
        files: dict[int, Path] = {}  # id(model): the models stay alive while the context lasts

        def timings_of(name: str, model: PreTrainedModel) -> Timings:
            if id(model) not in files:
                files[id(model)] = export_model(model, tokenizer, Path(scratch) / str(len(files)))
            return LlamaCppTimings(name, model.config, files[id(model)], settings)

        yield timings_of
