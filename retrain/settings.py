"""Retraining's settings: which candidates, how many KD tokens each, what is shown beside the numbers."""

from dataclasses import dataclass, field

from slimnas.core.errors import SlimnasError


@dataclass
class RetrainSettings:
    top_k: int = 2  # the search's pick, then the best of the front by quality
    references: bool = True  # also the reference trials (zero-shot pick, uniform, depth-only, width-only)
    budget_tokens: int = 400_000  # KD tokens for every candidate: same rows, order, schedule and seed
    prompts: list[str] = field(  # greedy continuations shown side by side with the teacher's in the report
        default_factory=lambda: [
            "The capital of France is",
            "Photosynthesis is the process by which",
            "In 1969, the first humans",
        ]
    )
    new_tokens: int = 24
    # Also score every candidate's KL to this model on the evaluation documents: the original teacher when the
    # run's teacher is a corrected one or a chain's earlier student (slimnas pipeline sets it). null: none
    reference_teacher: str | None = None
    jobs: bool = False  # each candidate in its own job through the Hydra launcher (hydra/launcher=..., joblib default)
    only: int | None = None  # retrain only this trial's candidate (what each of those jobs is given)
    # Under torchrun: the longest a rank waits for another during data-parallel KD (the start, rank 0's held-out
    # evaluations and checkpoints). Scoring is not under it: the other ranks leave once every candidate is distilled
    ddp_timeout_s: float = 1800.0

    def __post_init__(self):
        if self.top_k < 0 or self.budget_tokens < 1 or self.new_tokens < 0:
            raise SlimnasError("retrain.top_k must be >= 0, retrain.budget_tokens >= 1 and retrain.new_tokens >= 0")
        if self.ddp_timeout_s <= 0:
            raise SlimnasError(f"retrain.ddp_timeout_s must be positive, not {self.ddp_timeout_s}")
        if self.top_k == 0 and not self.references:
            raise SlimnasError("retrain.top_k=0 and retrain.references=false leave nothing to retrain")
