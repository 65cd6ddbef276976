"""The benchmarks' settings: lm-eval quality (the task suite, its pools and limits) and speed measurement.

Plain dataclasses with nothing heavy behind them, registered as Hydra structured configs by slimnas.config.
"""

import importlib.util
from dataclasses import asdict, dataclass, field, replace

from slimnas.core.errors import SlimnasError

SPEED_ENGINES = ("torch", "llamacpp")


@dataclass
class SpeedSettings:
    batch_size: int = 1
    prompt_len: int = 128
    new_tokens: int = 32
    warmup: int = 1  # untimed generations of each model first
    repeats: int = 4  # ABBA blocks (model, reference, reference, model): the speed-up's error bar is over these
    precision: str = "auto"  # in a command: the top-level precision setting (torch only)
    # What times a model and its reference: "torch" (PyTorch, the model as it is trained) or "llamacpp" (both
    # exported to temporary f16 GGUFs and decoded by llama.cpp on the CPU, as CPU users deploy them; the extra
    # `slimnas[llamacpp]`, batch 1). Speed-ups of different engines are not compared: a study keeps to one.
    engine: str = "torch"
    # A decode speed-up is unstable when its error bar (the ± the tables show) is over `stable_stderr` of it, or when
    # it is over `stable_flops_ratio` times the FLOPs ratio: a machine busy during one block does that. Such a
    # speed-up is timed again, `retimes` times at most; still unstable, it is marked and kept off the speed front.
    stable_stderr: float = 0.25
    stable_flops_ratio: float = 1.3
    retimes: int = 1

    def __post_init__(self):
        if min(self.batch_size, self.prompt_len, self.new_tokens) < 1 or self.warmup < 0 or self.repeats < 2:
            raise SlimnasError(
                "speed.batch_size, prompt_len and new_tokens must be at least 1, speed.repeats at least 2"
            )
        if self.stable_stderr <= 0 or self.stable_flops_ratio < 1 or self.retimes < 0:
            raise SlimnasError("speed.stable_stderr must be > 0, speed.stable_flops_ratio >= 1, speed.retimes >= 0")
        if self.engine not in SPEED_ENGINES:
            raise SlimnasError(f"speed.engine must be one of {', '.join(SPEED_ENGINES)}, not {self.engine!r}")
        if self.engine == "llamacpp" and importlib.util.find_spec("llama_cpp") is None:
            raise SlimnasError(
                "speed.engine=llamacpp needs llama-cpp-python: pip install 'slimnas[llamacpp]' (built from source)"
            )
        if self.engine == "llamacpp" and self.batch_size != 1:
            raise SlimnasError(f"speed.engine=llamacpp times batch 1 only, not speed.batch_size={self.batch_size}")

    def identity(self) -> dict:
        """These settings as studies and retrained records hash them: engine=torch, the default, is left out, so
        what was measured before the engine setting existed keeps its hash (and its study resumes)."""
        values = asdict(self)
        if self.engine == "torch":
            del values["engine"]
        return values


@dataclass
class QualitySettings:
    tasks: list[str] = field(
        default_factory=lambda: ["piqa", "arc_easy_dev", "arc_challenge_dev", "hellaswag", "lambada_openai", "wikitext"]
    )
    limit: int | None = 200  # evaluation-pool documents per task for final scores (bench, retrain); null = the pool
    trial_limit: int | None = 40  # selection-pool documents per task when a search trial is scored
    selection_share: float = 0.3  # share of each task's documents in the selection pool (the rest: evaluation)
    seed: int = 0  # which documents form the pools and the subsets
    batch_size: int = 8
    max_length: int | None = 2048  # context window (rolling windows for wikitext); null = the model's maximum.
    # Memory grows with batch_size x max_length x vocabulary: 8 x 8192 x 49152 ran out of 24 GiB

    def __post_init__(self):
        for name in ("limit", "trial_limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise SlimnasError(f"quality.{name} must be at least 1, or null for the whole pool")
        if self.batch_size < 1:
            raise SlimnasError("quality.batch_size must be at least 1")
        if not 0 < self.selection_share < 1:
            raise SlimnasError(f"quality.selection_share must be in (0, 1), not {self.selection_share}")

    def on_search_pools(self, seed: int, selection_share: float) -> "QualitySettings":
        """These settings scoring a search's candidates, on the pools of the search that ran with `seed` and
        `selection_share`: it chose on that selection pool, so no final score may read it. A value left at its
        default is the search's. Another is refused with one line unless its evaluation pool lies inside the
        search's, which needs the same seed and at least the search's selection share."""
        chosen_seed = seed if self.seed == QualitySettings.seed else self.seed
        share = selection_share if self.selection_share == QualitySettings.selection_share else self.selection_share
        if chosen_seed != seed:
            raise SlimnasError(
                f"quality.seed={chosen_seed} draws other pools than the search's (quality.seed={seed}): their "
                "evaluation pool would overlap the search's selection pool; leave quality.seed to the search"
            )
        if share < selection_share:
            raise SlimnasError(
                f"quality.selection_share={share} is below the search's ({selection_share}): the evaluation pool "
                "would take documents of the search's selection pool; leave it to the search, or raise it"
            )
        return replace(self, seed=seed, selection_share=share)
