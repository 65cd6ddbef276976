"""The benchmark commands' own settings: `slimnas baselines` (the proof) and `slimnas chains`."""

from dataclasses import dataclass, field
from pathlib import Path

from slimnas import conf
from slimnas.core.errors import SlimnasError

SEARCHING = ("search", "modelopt", "random", "hetero")  # methods that spend KD tokens to choose
RULES = ("uniform", "depth_only", "width_only")
BLOCK_PICKS = ("mip", "proportional")  # per-layer shapes from the block library's set-up: no search, no KD
PER_LAYER = ("hetero", *BLOCK_PICKS)  # methods in the per-layer space (search.proposals=per_layer)
METHODS = (*SEARCHING, "zero_shot", *BLOCK_PICKS, *RULES)
UNIFORM_METHODS = tuple(m for m in METHODS if m not in PER_LAYER)  # the default: the uniform proof


def sampler_file(name: str) -> Path:
    """An option of the search/sampler group: its YAML file (conf/search/sampler/NAME.yaml)."""
    return Path(conf.__file__).parent / "search" / "sampler" / f"{name}.yaml"


ARMS = ("one_shot", "one_shot_corrected", "chain", "chain_corrected")


@dataclass
class BaselinesSettings:
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # the sampler's seed and the KD row order
    methods: list[str] = field(default_factory=lambda: list(UNIFORM_METHODS))
    reference: str = "search"  # the method every other one is paired against (by seed, and by document for KL)
    modelopt_top_k: int = 4  # ModelOpt's recipe: the screen's best k, each distilled with 1/k of the KD budget
    heldout_text: str | None = "wikitext2/wiki.valid.tokens"  # under data.dir: text no method saw (one row an article)
    hetero_sampler: str | None = None  # the per-layer search's sampler, an option of conf/search/sampler (evolution:
    # DarwinLM's level switches, per-layer studies only); null: search.sampler, which the uniform methods use

    def __post_init__(self):
        if len(self.seeds) < 2 or len(set(self.seeds)) < len(self.seeds):
            raise SlimnasError("baselines.seeds needs at least two distinct seeds for a confidence interval")
        unknown = set(self.methods) - set(METHODS)
        if unknown or "search" not in self.methods:
            raise SlimnasError(f"baselines.methods must include search and come from {', '.join(METHODS)}")
        if self.reference not in self.methods:
            raise SlimnasError(f"baselines.reference {self.reference!r} must be one of baselines.methods")
        if self.modelopt_top_k < 1:
            raise SlimnasError("baselines.modelopt_top_k must be at least 1")
        if self.hetero_sampler is not None and not sampler_file(self.hetero_sampler).is_file():
            options = sorted(path.stem for path in sampler_file("x").parent.glob("*.yaml"))
            raise SlimnasError(f"baselines.hetero_sampler must be one of {', '.join(options)}, not "
                               f"{self.hetero_sampler!r}")  # fmt: skip


@dataclass
class ChainsSettings:
    stages: list[float] = field(default_factory=lambda: [0.6, 0.4])  # the chain's targets; the last is the final size
    correct_tokens: int = 49_152  # teacher correction for the *_corrected arms
    arms: list[str] = field(default_factory=lambda: list(ARMS))
    # every arm runs once per seed (the sampler's seed and the KD row order): a small search's pick moves with it,
    # and only an interval over seeds covers that; one seed gives the table without a verdict
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])

    def __post_init__(self):
        if not self.seeds or len(set(self.seeds)) < len(self.seeds):
            raise SlimnasError("chains.seeds needs at least one seed, each once (three or more for a verdict)")
        if len(self.stages) < 2:
            raise SlimnasError("chains.stages needs at least two stages (the last is the final size)")
        if set(self.arms) - set(ARMS) or "one_shot" not in self.arms:
            raise SlimnasError(f"chains.arms must include one_shot and come from {', '.join(ARMS)}")
        if self.correct_tokens < 1 and any(arm.endswith("corrected") for arm in self.arms):
            raise SlimnasError("chains.correct_tokens must be at least 1 for the corrected arms")
