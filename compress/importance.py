"""Minitron activation-based importance of heads, MLP neurons, embedding channels and layers.

One pass of forward hooks over calibration sequences:
- head i of a layer: the norm of its slice of the attention output (the input of o_proj),
- MLP neuron j: |act(gate) * up| (the input of down_proj),
- embedding channel c: |output| of every RMSNorm, summed over the norms,
each reduced over sequence positions then over samples (default: mean then L2).
Depth: the mean cosine between the residual stream at every pair of layer boundaries gives block
importance 1 - cos(h_i, h_j) for every span of layers (so contiguous blocks can be scored too);
optionally the perplexity on calibration rows when each layer is skipped. Results are cached on
disk, keyed by everything they depend on.
"""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import PreTrainedModel

from slimnas.compress.arch import head_dim
from slimnas.compress.settings import ImportanceSettings
from slimnas.core.device import autocast, model_device
from slimnas.core.errors import SlimnasError
from slimnas.core.files import atomic_path, hash_json, locked


@dataclass
class Importance:
    heads: torch.Tensor  # [layers, query heads]
    neurons: torch.Tensor  # [layers, intermediate]
    channels: torch.Tensor  # [hidden]
    boundary_cosine: torch.Tensor  # [layers + 1, layers + 1]: mean cos of the residual stream at two boundaries
    layer_perplexity: torch.Tensor = field(default_factory=lambda: torch.empty(0))  # [layers] or empty
    base_perplexity: float = float("nan")

    def layer_scores(self, metric: str = "block") -> torch.Tensor:
        """Per-layer importance, higher = keep: block importance or perplexity when skipped."""
        if metric == "block":
            return 1 - torch.diagonal(self.boundary_cosine, offset=1)
        if metric == "perplexity":
            if self.layer_perplexity.numel() == 0:
                raise SlimnasError("layer perplexity was not computed: rerun importance with layer_perplexity=true")
            return self.layer_perplexity
        raise SlimnasError(f"unknown layer metric {metric!r}: use block or perplexity")

    def block_importance(self, start: int, length: int) -> float:
        """1 - cos between the stream entering layer `start` and leaving layer `start + length - 1`."""
        return float(1 - self.boundary_cosine[start, start + length])

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.contiguous() for k, v in asdict(self).items() if isinstance(v, torch.Tensor)}
        save_file(tensors, str(path), metadata={"base_perplexity": json.dumps(self.base_perplexity)})

    @classmethod
    def load(cls, path: Path) -> "Importance":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            base = json.loads(f.metadata()["base_perplexity"])
        return cls(**load_file(str(path)), base_perplexity=base)


class _Reducer:
    """Reduces |activations| [batch, seq, units] over positions, then accumulates across samples."""

    def __init__(self, settings: ImportanceSettings):
        self.settings = settings
        self.total: torch.Tensor | None = None
        self.count = 0

    def add(self, activation: torch.Tensor) -> None:
        values = activation.detach().float().abs()
        per_sample = {"mean": values.mean(1), "l2": values.norm(dim=1), "max": values.amax(1)}[self.settings.seq_agg]
        if self.settings.batch_agg == "max":
            batch = per_sample.amax(0)
            self.total = batch if self.total is None else torch.maximum(self.total, batch)
        else:
            batch = per_sample.pow(2).sum(0) if self.settings.batch_agg == "l2" else per_sample.sum(0)
            self.total = batch if self.total is None else self.total + batch
        self.count += per_sample.shape[0]

    def result(self) -> torch.Tensor:
        if self.settings.batch_agg == "l2":
            return self.total.sqrt()
        if self.settings.batch_agg == "mean":
            return self.total / self.count
        return self.total


class _BoundaryCosines:
    """Mean cosine of the residual stream between every pair of layer boundaries, summed batch by batch.

    Each boundary is normalised as it arrives and parked on the CPU in fp16, so the device holds one
    boundary at a time (a 1B-8B teacher fits); the pairwise sums run over chunks of positions.
    """

    def __init__(self, n_boundaries: int, chunk_positions: int = 512):
        self.sums = torch.zeros(n_boundaries, n_boundaries, dtype=torch.float64)
        self.positions = 0
        self.chunk_positions = chunk_positions
        self.batch: list[torch.Tensor] = []

    def add(self, hidden: torch.Tensor) -> None:
        self.batch.append(F.normalize(hidden.float().flatten(0, 1), dim=-1).to("cpu", torch.float16))

    def end_batch(self) -> None:
        n_positions = self.batch[0].shape[0]
        for start in range(0, n_positions, self.chunk_positions):
            stream = torch.stack([b[start : start + self.chunk_positions] for b in self.batch]).float()
            stream = F.normalize(stream, dim=-1)  # again after fp16 rounding: equal vectors give cos 1
            self.sums += torch.einsum("ind,jnd->ij", stream, stream).double()
        self.positions += n_positions
        self.batch.clear()

    def result(self) -> torch.Tensor:
        return (self.sums / self.positions).float()


def _hidden_states_argument(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _layer_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def compute_importance(model: PreTrainedModel, sequences: torch.Tensor, settings: ImportanceSettings) -> Importance:
    """Run the hooks over `sequences` [n, seq_len] (the first n_samples rows) and reduce."""
    device = model_device(model)
    layers = model.model.layers
    dim = head_dim(model.config)
    heads = [_Reducer(settings) for _ in layers]
    neurons = [_Reducer(settings) for _ in layers]
    norms = [_Reducer(settings) for _ in range(2 * len(layers) + 1)]
    cosines = _BoundaryCosines(len(layers) + 1)
    handles = []

    def on_attention_output(index):
        def hook(module, args):
            x = args[0]
            heads[index].add(x.view(*x.shape[:-1], -1, dim).float().norm(dim=-1))

        return hook

    def on_mlp_hidden(index):
        return lambda module, args: neurons[index].add(args[0])

    def on_norm(index):
        return lambda module, args, output: norms[index].add(output)

    def on_layer(index):
        def hook(module, args, kwargs, output):
            if index == 0:
                cosines.add(_hidden_states_argument(args, kwargs))
            cosines.add(_layer_output(output))

        return hook

    for i, layer in enumerate(layers):
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(on_attention_output(i)))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(on_mlp_hidden(i)))
        handles.append(layer.input_layernorm.register_forward_hook(on_norm(2 * i)))
        handles.append(layer.post_attention_layernorm.register_forward_hook(on_norm(2 * i + 1)))
        handles.append(layer.register_forward_hook(on_layer(i), with_kwargs=True))
    handles.append(model.model.norm.register_forward_hook(on_norm(2 * len(layers))))

    rows = sequences[: settings.n_samples]
    try:
        for start in tqdm(range(0, len(rows), settings.batch_size), desc="importance", unit="batch"):
            with autocast(device, settings.precision):
                model(input_ids=rows[start : start + settings.batch_size].to(device), use_cache=False)
            cosines.end_batch()
    finally:
        for handle in handles:
            handle.remove()

    importance = Importance(
        heads=torch.stack([r.result() for r in heads]).cpu(),
        neurons=torch.stack([r.result() for r in neurons]).cpu(),
        channels=torch.stack([r.result() for r in norms]).sum(0).cpu(),
        boundary_cosine=cosines.result(),
    )
    if settings.layer_perplexity:
        probe = rows[: settings.perplexity_samples]  # calibration rows: never the rows that rank candidates
        importance.base_perplexity, importance.layer_perplexity = _skip_layer_perplexity(model, probe, settings)
    return importance


def perplexity(model: PreTrainedModel, sequences: torch.Tensor, batch_size: int = 8, precision: str = "auto") -> float:
    """Token-level perplexity of packed sequences (every position predicts the next)."""
    device = model_device(model)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(sequences), batch_size):
            batch = sequences[start : start + batch_size].to(device)
            with autocast(device, precision):
                logits = model(input_ids=batch, use_cache=False).logits
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum"
            )
            total, count = total + loss.item(), count + batch[:, 1:].numel()
    return float(torch.tensor(total / count).exp())


def _skip_layer_perplexity(
    model: PreTrainedModel, probe: torch.Tensor, settings: ImportanceSettings
) -> tuple[float, torch.Tensor]:
    base = perplexity(model, probe, settings.batch_size, settings.precision)
    scores = []
    for layer in tqdm(model.model.layers, desc="layer perplexity", unit="layer"):

        def skip(module, args, kwargs, output):
            hidden = _hidden_states_argument(args, kwargs)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        handle = layer.register_forward_hook(skip, with_kwargs=True)
        try:
            scores.append(perplexity(model, probe, settings.batch_size, settings.precision))
        finally:
            handle.remove()
    return base, torch.tensor(scores)


def importance_cache_path(cache_dir: Path, teacher_fingerprint: str, data_fingerprint: str, settings) -> Path:
    key = hash_json([teacher_fingerprint, data_fingerprint, asdict(settings)])[:24]
    return cache_dir / "importance" / f"{key}.safetensors"


def cached_importance(
    model: PreTrainedModel,
    teacher_fingerprint: str,
    calibration: torch.Tensor,
    data_fingerprint: str,
    settings: ImportanceSettings,
    cache_dir: Path,
) -> tuple[Importance, Path]:
    """Importance for this teacher, data and settings: loaded if computed before, else computed and saved."""
    path = importance_cache_path(cache_dir, teacher_fingerprint, data_fingerprint, settings)
    with locked(path.with_suffix(".lock")):  # workers sharing the cache: one computes, the others wait and read
        if path.is_file():
            return Importance.load(path), path
        if len(calibration) < settings.n_samples:
            print(f"note: corpus has {len(calibration)} training sequences; scoring on all of them", flush=True)
        print(f"importance: computing on {min(len(calibration), settings.n_samples)} calibration rows", flush=True)
        importance = compute_importance(model, calibration, settings)
        with atomic_path(path) as staging:
            importance.save(staging)
    return importance, path
