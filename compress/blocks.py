"""The block library (Puzzle's idea, measured cheaply): what replacing one sub-block of the teacher costs.

For every layer, every variant of its attention (KV groups kept, each with the teacher's query heads per group;
0 removes it, never in layer 0) and every variant of its FFN (neurons kept; 0 removes it): the full-vocabulary KL
to the teacher on the selection documents when only that sub-block is replaced by its importance-pruned variant,
and the exact change in parameters, bf16 weight bytes and analytic FLOPs per token (compress.arch). Puzzle treats
the costs as additive: a per-layer candidate's predicted KL is the sum of its blocks' (search.mip picks by it).
The sizes are exactly additive; the KL sum is only a prediction, since layers interact.

Cheap because the teacher's activations are reused: the teacher runs once over the documents with every layer's
input kept, with the arguments the model passes the layer (position embeddings, mask); a cut at layer i then runs
the variant layer and the teacher's layers after it, half the model on average, through the same scorer as the
screen (HeldoutSet.score). Each variant is pruned once, in every layer at once (each layer's own importance picks
its heads and neurons, as in a per-layer student), and its layer i is the cut at layer i. The kept inputs take
layers x documents x tokens x hidden x 4 bytes (0.6 GB for SmolLM2-135M on 64 documents of 128 tokens).

A cut's cost is its later layers on every token of the documents plus the vocabulary projection of every scored
position (SmolLM2-135M on 2 busy CPU cores, 64 documents of 128 tokens: ~3 s a layer, ~19 s the 49k-entry head),
so a library of hundreds of cuts is measured on a `HeldoutSet.subset` of the selection documents: the first ones,
scored on the last positions of each (whole rows still run through the layers).

The library is a cache like the screen's (CACHE/blocks/KEY.jsonl, keyed by the teacher, the importance, the
documents, the positions scored and the variants): one line per measured cut, appended as soon as it is measured,
so a killed build resumes where it stopped; processes sharing the cache take turns. The teacher's own blocks cost 0
by definition and are not measured.
"""

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from itertools import groupby
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import PretrainedConfig, PreTrainedModel

from slimnas.compress.arch import (
    Architecture,
    LayerShape,
    PerLayerArchitecture,
    Shape,
    flops_per_token,
    param_count,
)
from slimnas.compress.heldout import HeldoutSet
from slimnas.compress.importance import Importance
from slimnas.compress.models import LoadedModel, cache_root
from slimnas.compress.prune import plan_pruning, prune_model
from slimnas.core.device import autocast, model_device
from slimnas.core.errors import SlimnasError
from slimnas.core.files import hash_json, hash_tensor, locked, read_jsonl

ATTENTION, FFN = "attention", "ffn"
COST_DTYPE_BYTES = 2  # weight bytes are counted in bf16, as the search's budget and records count them


@dataclass(frozen=True)
class Sizes:
    """A model's size by the three measures a budget can cap, or a block's change of them (negative: smaller)."""

    params: int
    weight_bytes: int  # bf16
    flops_per_token: int  # analytic, one token attending to the library's context

    @classmethod
    def of(cls, config: PretrainedConfig, arch: PerLayerArchitecture, context: int) -> "Sizes":
        params = param_count(config, arch)
        return cls(params, params * COST_DTYPE_BYTES, flops_per_token(config, context, arch))

    def __add__(self, other: "Sizes") -> "Sizes":
        return Sizes(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def __sub__(self, other: "Sizes") -> "Sizes":
        return Sizes(*(getattr(self, f.name) - getattr(other, f.name) for f in fields(self)))


@dataclass(frozen=True)
class BlockVariants:
    """The sizes each layer's sub-blocks may take (the teacher's own sizes are added: a block may stay whole)."""

    ffn: tuple[int, ...]  # FFN neurons; 0 removes the MLP
    kv_groups: tuple[int, ...]  # KV groups kept, with the teacher's query heads per group; 0 removes the attention

    def checked(self, config: PretrainedConfig) -> "BlockVariants":
        """Sorted, without repeats, with the teacher's sizes; a size the teacher cannot give is one line."""
        teacher = Architecture.of(config)
        for name, sizes, limit in (
            ("ffn", self.ffn, teacher.intermediate_size),
            ("kv_groups", self.kv_groups, teacher.num_key_value_heads),
        ):
            if any(not 0 <= size <= limit for size in sizes):
                raise SlimnasError(
                    f"invalid block variants: {name} {list(sizes)} must lie in [0, {limit}] (the teacher's)"
                )
        return BlockVariants(
            tuple(sorted({*self.ffn, teacher.intermediate_size})),
            tuple(sorted({*self.kv_groups, teacher.num_key_value_heads})),
        )

    def sizes(self, kind: str) -> tuple[int, ...]:
        return self.kv_groups if kind == ATTENTION else self.ffn


@dataclass(frozen=True)
class Block:
    """One sub-block of one layer in one variant: its measured KL and what it changes in size."""

    layer: int
    kind: str  # attention | ffn
    size: int  # KV groups (attention) or neurons (ffn); the teacher's own size costs 0
    kl: float  # mean over the documents when only this sub-block of the teacher is replaced
    kl_stderr: float
    kl_per_doc: list[float]
    sizes: Sizes  # the change from the teacher (exactly additive over blocks)
    seconds: float  # the cut's forward and scoring (0: the teacher's own block, not measured)

    @classmethod
    def from_line(cls, line: dict) -> "Block":
        return cls(**{**line, "sizes": Sizes(**line["sizes"])})


@dataclass(frozen=True)
class BlockLibrary:
    teacher: PerLayerArchitecture
    heads_per_group: int  # an attention variant of g KV groups has g x this many query heads
    context: int  # positions each document has: the FLOPs' context
    teacher_sizes: Sizes
    variants: BlockVariants
    blocks: tuple[Block, ...]  # layer by layer: attention variants, then FFN variants, each by size

    def options(self, layer: int, kind: str) -> list[Block]:
        """The variants one sub-block can take, by size (layer 0's attention is never removed)."""
        return [b for b in self.blocks if b.layer == layer and b.kind == kind]

    def architecture(self, kv_groups: Sequence[int], ffn: Sequence[int]) -> PerLayerArchitecture:
        """A choice of one attention and one FFN variant per layer as a per-layer candidate (a layer with neither
        is dropped)."""
        if len(kv_groups) != len(self.teacher.layers) or len(ffn) != len(self.teacher.layers):
            raise SlimnasError(
                f"a choice needs one attention and one FFN size for each of {len(self.teacher.layers)} layers"
            )
        layers = [_layer_shape(self.heads_per_group, g, width) for g, width in zip(kv_groups, ffn, strict=True)]
        return PerLayerArchitecture(self.teacher.hidden_size, tuple(layers))

    def predict(self, shape: Shape) -> float | None:
        """Puzzle's additive prediction of a candidate's KL: the sum of its blocks' KL. None for a candidate not
        made of the library's blocks (a uniform one, another hidden size, a size the library has not measured)."""
        if not isinstance(shape, PerLayerArchitecture) or shape.hidden_size != self.teacher.hidden_size:
            return None
        costs = {(b.layer, b.kind, b.size): b.kl for b in self.blocks}
        chosen = [
            key
            for i, layer in enumerate(shape.layers)
            for key in ((i, ATTENTION, layer.num_key_value_heads), (i, FFN, layer.intermediate_size))
        ]
        if (
            len(shape.layers) != len(self.teacher.layers)
            or any(
                layer.num_attention_heads != layer.num_key_value_heads * self.heads_per_group for layer in shape.layers
            )
            or any(key not in costs for key in chosen)
        ):
            return None
        return sum(costs[key] for key in chosen)


def _layer_shape(heads_per_group: int, kv_groups: int, ffn: int) -> LayerShape:
    return LayerShape(ffn, kv_groups * heads_per_group, kv_groups)


def _cut(
    teacher: PerLayerArchitecture, heads_per_group: int, kind: str, size: int, layers: Sequence[int]
) -> PerLayerArchitecture:
    """The teacher with one sub-block kind set to `size` in the given layers, everything else whole."""
    shapes = list(teacher.layers)
    for i in layers:
        if kind == ATTENTION:
            shapes[i] = _layer_shape(heads_per_group, size, shapes[i].intermediate_size)
        else:
            shapes[i] = replace(shapes[i], intermediate_size=size)
    return PerLayerArchitecture(teacher.hidden_size, tuple(shapes))


def _cut_layers(kind: str, size: int, n_layers: int) -> range:
    """The layers a variant can replace: all, but layer 0 keeps its attention."""
    return range(1 if kind == ATTENTION and size == 0 else 0, n_layers)


class TeacherActivations:
    """The teacher's run over the documents with each decoder layer's input kept, batch by batch, with the keyword
    arguments the model passed it (position embeddings, mask): what a cut needs to run from its layer on."""

    @torch.no_grad()
    def __init__(self, teacher: PreTrainedModel, documents: HeldoutSet):
        self.teacher, self.documents = teacher, documents
        layers = teacher.model.layers
        self.inputs: list[list[torch.Tensor]] = [[] for _ in layers]
        self.arguments: list[list[dict]] = [[] for _ in layers]

        def keep(index: int):
            def hook(module, args, kwargs):
                self.inputs[index].append(args[0])
                self.arguments[index].append(kwargs)

            return hook

        handles = [layer.register_forward_pre_hook(keep(i), with_kwargs=True) for i, layer in enumerate(layers)]
        try:
            documents.hidden_states(teacher)
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def final_hidden(self, index: int, layer: torch.nn.Module) -> torch.Tensor:
        """The final hidden states (HeldoutSet.hidden_states' layout) with `layer` in place of the teacher's layer
        `index`: only it and the teacher's later layers run, in the documents' batches and precision."""
        body = self.teacher.model
        states = []
        with autocast(model_device(self.teacher), self.documents.precision):
            for batch, hidden in enumerate(self.inputs[index]):
                hidden = layer(hidden, **self.arguments[index][batch])
                for later in range(index + 1, len(body.layers)):
                    hidden = body.layers[later](hidden, **self.arguments[later][batch])
                states.append(body.norm(hidden).float())
        return self.documents.scored(torch.cat(states))


def library_file(teacher: LoadedModel, importance: Importance, documents: HeldoutSet, variants: BlockVariants) -> Path:
    """The cache file of a block library: keyed by everything its numbers depend on."""
    key = hash_json([
        teacher.fingerprint, [hash_tensor(t) for t in (importance.heads, importance.neurons, importance.channels)],
        hash_tensor(documents.rows), documents.positions, documents.precision,
        asdict(variants.checked(teacher.model.config)),
    ])  # fmt: skip
    return cache_root() / "blocks" / f"{key[:24]}.jsonl"


def build_block_library(
    teacher: PreTrainedModel, importance: Importance, documents: HeldoutSet, variants: BlockVariants, cache_path: Path
) -> BlockLibrary:
    """Every layer's sub-blocks in every variant, measured (or read back from `cache_path`, and completed)."""
    config = teacher.config
    variants = variants.checked(config)
    shape = PerLayerArchitecture.of(config)
    whole = shape.layers[0]
    heads_per_group = whole.num_attention_heads // whole.num_key_value_heads
    context = documents.rows.shape[1]
    teacher_sizes = Sizes.of(config, shape, context)
    teacher_size = {ATTENTION: whole.num_key_value_heads, FFN: whole.intermediate_size}
    cuts = [
        (kind, size, layer)
        for kind in (ATTENTION, FFN)
        for size in variants.sizes(kind)
        if size != teacher_size[kind]
        for layer in _cut_layers(kind, size, len(shape.layers))
    ]
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    with locked(cache_path.with_suffix(".lock")):
        done = {
            (b.kind, b.size, b.layer): b
            for b in map(Block.from_line, read_jsonl(cache_path) if cache_path.is_file() else [])
        }
        missing = [cut for cut in cuts if cut not in done]
        if missing:
            activations = TeacherActivations(teacher, documents)
            with (
                open(cache_path, "a") as lines,
                tqdm(total=len(missing), desc="block library (single-block cuts)", unit="cut", leave=False) as bar,
            ):
                for (kind, size), group in groupby(missing, key=lambda cut: cut[:2]):
                    layers = [layer for _, _, layer in group]
                    everywhere = _cut(shape, heads_per_group, kind, size, layers)
                    student = prune_model(teacher, plan_pruning(importance, config, everywhere), everywhere)
                    for layer in layers:
                        started = time.perf_counter()
                        metrics = documents.score(
                            activations.final_hidden(layer, student.model.layers[layer]), teacher.lm_head
                        )
                        sizes = (
                            Sizes.of(config, _cut(shape, heads_per_group, kind, size, [layer]), context) - teacher_sizes
                        )
                        block = Block(
                            layer,
                            kind,
                            size,
                            metrics.kl,
                            metrics.kl_stderr,
                            metrics.kl_per_doc,
                            sizes,
                            time.perf_counter() - started,
                        )
                        done[kind, size, layer] = block
                        lines.write(json.dumps(asdict(block)) + "\n")
                        lines.flush()
                        bar.update()
                    del student
    zero = Sizes(0, 0, 0)
    for kind, size in teacher_size.items():
        for layer in range(len(shape.layers)):
            done[kind, size, layer] = Block(layer, kind, size, 0.0, 0.0, [0.0] * len(documents.rows), zero, 0.0)
    blocks = [
        done[kind, size, layer]
        for layer in range(len(shape.layers))
        for kind in (ATTENTION, FFN)
        for size in variants.sizes(kind)
        if layer in _cut_layers(kind, size, len(shape.layers))
    ]
    return BlockLibrary(shape, heads_per_group, context, teacher_sizes, variants, tuple(blocks))
