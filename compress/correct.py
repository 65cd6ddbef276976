"""Teacher correction (Minitron): fine-tune the unpruned teacher on the distillation corpus before pruning it.

The KD corpus is not the teacher's own training data; distilling from an uncorrected teacher passes that
shift on to every student. A short next-token fine-tune on the corpus's train documents first moves
the teacher onto it. Same schedule machinery as distillation (compress.distill.Distiller with no
teacher targets: plain cross-entropy), resumable, saved as a plain Hugging Face checkpoint.
"""

from dataclasses import dataclass

from slimnas.compress.distill import DistillSettings
from slimnas.compress.runtime.errors import SlimnasError


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
            budget_tokens=max(1, self.budget_tokens), batch_size=self.batch_size, lr=self.lr,
            warmup_fraction=self.warmup_fraction, min_lr_ratio=self.min_lr_ratio, eval_every=self.eval_every,
            save_every=self.save_every, seed=self.seed, ce_weight=1.0, precision=precision,
        )  # fmt: skip
