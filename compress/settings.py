"""The compression stages' settings: data, importance, pruning, distillation, teacher correction.

Plain dataclasses with no torch or transformers behind them, so a command's configuration is composed and
checked in well under a second (slimnas.config registers them as Hydra structured configs). Each one's
__post_init__ checks what its types cannot; every default is written once, here.
"""

import math
from dataclasses import dataclass, field

from slimnas.core.errors import SlimnasError

AUTO, BUILTIN = "auto", "builtin"  # data.corpus: the Wikipedia corpus of the data directory (else builtin); stdlib text
REDUCTIONS = ("mean", "l2", "max")
LAYER_METRICS = ("block", "perplexity")
DEPTH_STRATEGIES = ("independent", "contiguous")


@dataclass
class DataSettings:
    dir: str | None = None  # benchmark files and corpus; None = $SLIMNAS_DATA, else shared/data beside the checkout
    corpus: str = AUTO  # auto | builtin | a .txt / .jsonl file | hf:NAME[:CONFIG[:SPLIT]]
    seq_len: int = 128  # tokens per KD and calibration row
    heldout_tokens: int | None = None  # tokens of each held-out document's row; null = seq_len
    selection_docs: int = 64  # documents the search ranks candidates on, one row each
    evaluation_docs: int = 128  # documents behind every reported number, one row each
    seed: int = 0  # which documents land in which split, and where in each held-out document its row starts

    def __post_init__(self):
        if self.seq_len < 2 or (self.heldout_tokens is not None and self.heldout_tokens < 2):
            raise SlimnasError("data.seq_len and data.heldout_tokens must be at least 2")
        if min(self.selection_docs, self.evaluation_docs) < 2:
            raise SlimnasError(
                "data.selection_docs and data.evaluation_docs must be at least 2 (an error bar needs two)"
            )


@dataclass
class ImportanceSettings:
    n_samples: int = 1024  # calibration sequences (Minitron uses 1024); fewer on a CPU
    batch_size: int = 8
    seq_agg: str = "mean"  # reduction over sequence positions of |activation|
    batch_agg: str = "l2"  # reduction over samples of the per-sample scores
    layer_perplexity: bool = False  # also score each layer by the calibration perplexity when it is skipped
    perplexity_samples: int = 8  # calibration rows for that probe
    precision: str = "auto"  # in a command: the top-level precision setting

    def __post_init__(self):
        for name in ("seq_agg", "batch_agg"):
            if getattr(self, name) not in REDUCTIONS:
                raise SlimnasError(f"{name} must be one of {', '.join(REDUCTIONS)}, not {getattr(self, name)!r}")
        if self.n_samples < 1 or self.batch_size < 1:
            raise SlimnasError("n_samples and batch_size must be at least 1")


@dataclass
class PruningSettings:
    """How layers are chosen: by which score, one by one or as one contiguous block."""

    layer_metric: str = "block"  # block (1 - cos) or perplexity (needs importance.layer_perplexity=true)
    depth_strategy: str = "independent"  # independent or contiguous

    def __post_init__(self):
        if self.layer_metric not in LAYER_METRICS:
            raise SlimnasError(f"unknown layer metric {self.layer_metric!r}: use {' or '.join(LAYER_METRICS)}")
        if self.depth_strategy not in DEPTH_STRATEGIES:
            raise SlimnasError(f"unknown depth strategy {self.depth_strategy!r}: use {' or '.join(DEPTH_STRATEGIES)}")


@dataclass
class DistillSettings:
    # slimnas distill's KD tokens. Every stage that trains passes its own budget to the Distiller, once, where it
    # builds it: search.race.rung_tokens, retrain.budget_tokens, correct.budget_tokens
    budget_tokens: int = 100_000
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr x min_lr_ratio
    warmup_fraction: float = 0.05
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    temperature: float = 1.0
    ce_weight: float = 0.0  # weight of next-token cross-entropy beside the KL
    hidden_weight: float = 0.0  # weight of the hidden-state loss (needs teacher_mode=live)
    hidden_layers: list[int] = field(default_factory=list)  # student layers (negative: from the end), each matched
    # to the teacher layer it was cut from
    teacher_mode: str = "cache"  # cache: top-k teacher logits on disk, shared by runs; live: run the teacher
    top_k: int = 64
    chunk_tokens: int = 1024  # positions per vocabulary-sized chunk of the loss
    eval_every: int = 50  # steps between held-out evaluations (distill, retrain)
    save_every: int = 50  # steps between resumable checkpoints (distill, retrain)
    precision: str = "auto"  # in a command: the top-level precision setting
    seed: int = 0  # the order of the KD rows

    def __post_init__(self):
        if self.teacher_mode not in ("cache", "live"):
            raise SlimnasError(f"distill.teacher_mode must be cache or live, not {self.teacher_mode!r}")
        if self.hidden_weight > 0 and (self.teacher_mode != "live" or not self.hidden_layers):
            raise SlimnasError("a hidden-state loss needs distill.teacher_mode=live and distill.hidden_layers")
        positive = ("budget_tokens", "batch_size", "grad_accum", "top_k", "chunk_tokens", "eval_every")
        for name in (*positive, "save_every"):
            if getattr(self, name) < 1:
                raise SlimnasError(f"distill.{name} must be at least 1, not {getattr(self, name)}")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1 or not 0 <= self.warmup_fraction < 1:
            raise SlimnasError("distill.lr must be > 0, min_lr_ratio in [0, 1] and warmup_fraction in [0, 1)")
        if not self.temperature > 0:
            raise SlimnasError(f"distill.temperature must be > 0, not {self.temperature}")

    def tokens_per_step(self, seq_len: int) -> int:
        return self.batch_size * self.grad_accum * seq_len

    def steps_for(self, tokens: int, seq_len: int) -> int:
        """KD steps that `tokens` buy (at least one): the one place budgets become steps."""
        return max(1, tokens // self.tokens_per_step(seq_len))

    def rows_for(self, budget_tokens: int, seq_len: int) -> int:
        """Corpus rows a budget reads (fewer than that are cycled through, reshuffled each epoch)."""
        return math.ceil(self.steps_for(budget_tokens, seq_len) * self.tokens_per_step(seq_len) / seq_len)


@dataclass
class CorrectSettings:
    budget_tokens: int = 0  # next-token fine-tuning tokens on the corpus's train documents; 0 = no correction
    lr: float = 2e-5  # a small step: the teacher should move onto the corpus, not forget what it knows
    batch_size: int = 8
    warmup_fraction: float = 0.05
    min_lr_ratio: float = 0.1
    eval_every: int = 50  # steps between held-out evaluations (perplexity and KL to the original teacher)
    save_every: int = 50  # steps between resumable checkpoints
    seed: int = 0  # the order of the rows

    def __post_init__(self):
        if self.budget_tokens < 0 or self.batch_size < 1 or not self.lr > 0:
            raise SlimnasError("correct.budget_tokens must be >= 0, correct.batch_size >= 1 and correct.lr > 0")

    def as_distill(self, precision: str) -> DistillSettings:
        """The same schedule machinery as distillation, with the next-token loss alone (no teacher)."""
        return DistillSettings(
            batch_size=self.batch_size, lr=self.lr,
            warmup_fraction=self.warmup_fraction, min_lr_ratio=self.min_lr_ratio, eval_every=self.eval_every,
            save_every=self.save_every, seed=self.seed, ce_weight=1.0, precision=precision,
        )  # fmt: skip
