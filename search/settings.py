"""The search's settings: one dataclass per section of `search.*`, each setting's default written once, here.

They are Hydra structured configs (registered in slimnas.config): overrides are type-checked when the
command is composed, and `__post_init__` checks what types cannot.
"""

from dataclasses import dataclass, field
from typing import Any

from slimnas.core.errors import SlimnasError, first_line
from slimnas.search.constraints import Budget
from slimnas.search.objectives import OBJECTIVES, QUALITY_METRICS
from slimnas.search.space import SpaceSettings

REFERENCE_KINDS = ("uniform", "depth_only", "width_only")
PROPOSALS = ("screen", "uniform", "enumerate", "per_layer")


@dataclass
class ScreenSettings:
    """Before any KD, candidates are scored by held-out KL right after pruning; the best go first."""

    max_candidates: int = 2000  # every feasible candidate up to this many, else a seeded stratified sample
    top_k: int = 4  # the screen's best, queued as the study's first trials (the best is the zero-shot pick)
    per_layer_samples: int = 48  # search.proposals=per_layer: random per-layer candidates screened, one from each of
    # this many strata by parameter count (that space is never enumerated)

    def __post_init__(self):
        if min(self.max_candidates, self.top_k, self.per_layer_samples) < 1:
            raise SlimnasError("search.screen.max_candidates, top_k and per_layer_samples must be at least 1")


@dataclass
class BlockSettings:
    """search.proposals=per_layer: Puzzle-style seeds for the screen (search.block_seeds). The block library
    (compress.blocks: each layer's attention and FFN cut alone to each variant of search.space.per_layer, scored by
    KL to the teacher) is built, or read from its cache, then the MIP (search.mip) picks the per-layer candidates of
    least summed block KL within the parameter budget; they are screened with the sample, so the race runs them when
    they screen well. The library depends on the teacher, the variants and these documents, never on the seed."""

    enabled: bool = True  # only with search.proposals=per_layer
    mip_solutions: int = 4  # the MIP's best picks screened, in order of predicted KL
    differ_by: int = 4  # each pick differs from every earlier one in at least this many sub-blocks (a layer's
    # attention or FFN): distinct candidates rather than one pick and its near-copies
    proportional: bool = True  # also screen the importance-proportional allocation (search.allocation: FFN widths
    # by layer importance, attention whole; no library needed)
    documents: int | None = None  # the library scores the first this many selection documents (never evaluation
    # ones); null: all of them. A cut's cost grows with the documents: its later layers run on each
    positions: int | None = None  # and the last this many positions of each (all still run through the layers);
    # null: all. Only the vocabulary projection shrinks with it (~19 s of a SmolLM2 cut's ~65 s at 64 x 128 tokens)

    def __post_init__(self):
        if min(self.mip_solutions, self.differ_by) < 1:
            raise SlimnasError("search.blocks.mip_solutions and differ_by must be at least 1")
        if any(n is not None and n < 1 for n in (self.documents, self.positions)):
            raise SlimnasError("search.blocks.documents and positions must be at least 1, or null for all")


@dataclass
class RaceSettings:
    """KD in rungs; after each, a candidate stops only when a peer is better on the same documents with confidence."""

    rung_tokens: list[int] = field(default_factory=lambda: [100_000, 400_000])  # cumulative KD tokens of each rung
    confidence: float = 0.95  # paired tests over the selection documents, Bonferroni-adjusted (search.race)
    extensions: int = 2  # then the two leaders' last rung is doubled, at most this often, until they are separated

    def __post_init__(self):
        if not self.rung_tokens or min(self.rung_tokens) < 1:
            raise SlimnasError("search.race.rung_tokens needs at least one rung of at least one token")
        if not 0.5 <= self.confidence < 1:
            raise SlimnasError(f"search.race.confidence must be in [0.5, 1), not {self.confidence}")
        if self.extensions < 0:
            raise SlimnasError("search.race.extensions must be >= 0")


@dataclass
class ReferenceSettings:
    kinds: list[str] = field(default_factory=lambda: list(REFERENCE_KINDS))  # simple cuts run beside the search
    uniform_tolerance: float = 0.2  # largest spread of per-dimension ratios still called a uniform cut

    def __post_init__(self):
        unknown = set(self.kinds) - set(REFERENCE_KINDS)
        if unknown:
            raise SlimnasError(f"unknown reference kind(s) {sorted(unknown)}: choose from {', '.join(REFERENCE_KINDS)}")


@dataclass
class StorageSettings:
    url: str | None = None  # null = SQLite in the run directory; postgresql://user@host/db for many workers
    heartbeat_interval: int = 20  # seconds between a running trial's heartbeats
    grace_period: int = 180  # a trial of another host silent this long is failed and retried

    def __post_init__(self):
        """A URL SQLAlchemy cannot parse, of an unknown database, or whose driver is missing: refused before anything
        runs or is written (a server nobody listens on is found when the search opens the storage)."""
        if self.url is None:
            return
        from sqlalchemy.engine import make_url  # only when a URL is given: it takes a moment to import

        try:
            make_url(self.url).get_dialect().import_dbapi()
        except Exception as error:  # sqlalchemy raises many types: unparsable, unknown dialect, driver not installed
            raise SlimnasError(f"search.storage.url={self.url} cannot be used: {first_line(error)}") from error


@dataclass
class SearchSettings:
    n_trials: int = 20  # candidates to reach the last rung (stopped ones and rejected proposals do not count)
    study_name: str = "slimnas"
    seed: int = 0  # the sampler's, and the screen's sample
    sampler: Any = None  # an Optuna sampler for hydra.utils.instantiate: choose with search/sampler=tpe|nsga2|gp|...
    objectives: list[str] = field(default_factory=lambda: ["quality", "params"])  # also throughput, latency
    quality_metric: str = "heldout_kl"  # heldout_kl: quality = -KL on the selection documents; summary: lm-eval
    score_trials: bool = False  # lm-eval (selection pool, quality.trial_limit documents) on every trial that ends
    measure_speed: bool = True  # time every trial that reaches the last rung against the teacher
    keep_checkpoints: bool = False  # keep each completed trial's checkpoint in trials/N/model
    proposals: str = "screen"  # screen: the screen's best first, then the sampler, told the screen's results;
    # uniform: feasible candidates in a seeded random order, no screen, no sampler (the random-search baseline);
    # enumerate: every feasible candidate to the last rung, none stopped (what a race is measured against);
    # per_layer: per-layer candidates (search.space.per_layer), a stratified sample screened, then the sampler
    workers: int = 1  # processes joining the study, started by a Hydra launcher (hydra/launcher=joblib by default)
    gpus: list[int] = field(default_factory=list)  # worker i sees gpus[i % len] alone; [] = leave CUDA_VISIBLE_DEVICES
    max_attempts: int = 3  # failed attempts of one candidate before it counts as evaluated
    max_failures_in_a_row: int = 3  # then the search stops with the last failure's reason
    budget: Budget = field(default_factory=Budget)
    space: SpaceSettings = field(default_factory=SpaceSettings)
    screen: ScreenSettings = field(default_factory=ScreenSettings)
    blocks: BlockSettings = field(default_factory=BlockSettings)
    race: RaceSettings = field(default_factory=RaceSettings)
    references: ReferenceSettings = field(default_factory=ReferenceSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)

    def __post_init__(self):
        unknown = [name for name in self.objectives if name not in OBJECTIVES]
        if unknown or not self.objectives:
            raise SlimnasError(
                f"unknown objective(s) {unknown or self.objectives}: choose from {', '.join(OBJECTIVES)}"
            )
        if "quality" not in self.objectives:
            raise SlimnasError("search.objectives must include quality: the race compares candidates by it")
        if self.quality_metric not in QUALITY_METRICS:
            raise SlimnasError(f"search.quality_metric must be one of {', '.join(QUALITY_METRICS)}")
        if self.quality_metric == "summary" and not self.score_trials:
            raise SlimnasError("search.quality_metric=summary needs search.score_trials=true")
        if self.quality_metric == "summary" and self.proposals != "enumerate":
            raise SlimnasError(  # one metric chooses and decides: no leaders by the summary separated by KL
                "search.quality_metric=summary: the race stops and separates candidates by held-out KL, so it would "
                "choose by one metric and decide by another; use it with search.proposals=enumerate (no race)"
            )
        if self.proposals not in PROPOSALS:
            raise SlimnasError(f"search.proposals must be one of {', '.join(PROPOSALS)}, not {self.proposals!r}")
        if min(self.n_trials, self.max_attempts, self.max_failures_in_a_row, self.workers) < 1:
            raise SlimnasError("search.n_trials, workers, max_attempts and max_failures_in_a_row must be at least 1")
        if not isinstance(self.sampler, dict) or "_target_" not in self.sampler:
            raise SlimnasError("search.sampler needs a _target_ (an Optuna sampler class): use search/sampler=tpe")
        if self.sampler["_target_"].endswith("LevelSwitchSampler") and self.proposals != "per_layer":
            raise SlimnasError("search/sampler=evolution mutates per-layer variants: use it with "
                               "search.proposals=per_layer")  # fmt: skip
