"""Everything a search needs, checked and built once before the first trial: one immutable `SearchSetup`.

Built in order of cost, so bad input fails in seconds with nothing written: settings, the teacher's
shape and the feasible set, the benchmark files, the storage connection; only then the corpus, the
importance scores, the teacher's logit cache and the selection rows.
"""

from dataclasses import dataclass, replace
from itertools import pairwise
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from optuna.storages import RDBStorage

from slimnas.bench.quality import QualitySettings
from slimnas.bench.speed import SpeedSettings
from slimnas.bench.tasks import TaskSuite, prepare_suite
from slimnas.compress.arch import Architecture
from slimnas.compress.context import TeacherContext, load_teacher_context
from slimnas.compress.corpus import DataSettings
from slimnas.compress.distill import DistillSettings, make_teacher_targets
from slimnas.compress.heldout import HeldoutSet
from slimnas.compress.importance import ImportanceSettings
from slimnas.compress.models import cache_root, load_model
from slimnas.compress.prune import PrunePolicy
from slimnas.compress.runtime.config import settings_from
from slimnas.compress.runtime.device import hardware, pick_device
from slimnas.compress.runtime.errors import SlimnasError
from slimnas.compress.runtime.files import hash_json
from slimnas.compress.teacher_targets import TeacherTargets
from slimnas.search.constraints import Budget
from slimnas.search.objectives import QUALITY_METRICS, Objective, objectives_from_config
from slimnas.search.space import FeasibleEncoding, SearchSpace
from slimnas.search.storage import check_existing_study, open_storage, storage_url

SAMPLERS = ("tpe", "nsga2", "gp", "random", "enumerate", "auto")
NESTED_SECTIONS = ("budget", "space", "fidelity", "references", "storage")  # search.* records of their own
SCREEN_ROLES = ("rank", "stop")
REFERENCE_KINDS = ("uniform", "depth_only", "width_only", "zero_shot")


@dataclass(frozen=True)
class SearchSettings:
    n_trials: int = 20  # trials that reach the last rung (early stops and rejected proposals do not count)
    study_name: str = "slimnas"
    seed: int = 0
    sampler: str = "auto"
    enumerate_max: int = 20
    objectives: tuple[str, ...] = ("quality", "params")
    quality_metric: str = "heldout_kl"
    score_trials: bool = False
    measure_speed: bool = True
    keep_checkpoints: bool = False
    max_attempts: int = 3  # failed attempts of one candidate before it counts as evaluated
    max_failures_in_a_row: int = 3  # then the search stops with the last reason

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise SlimnasError(f"unknown sampler {self.sampler!r}: use {', '.join(SAMPLERS)}")
        if self.quality_metric not in QUALITY_METRICS:
            raise SlimnasError(f"search.quality_metric must be one of {', '.join(QUALITY_METRICS)}")
        if self.quality_metric == "summary" and not self.score_trials:
            raise SlimnasError("search.quality_metric=summary needs search.score_trials=true")
        if min(self.n_trials, self.max_attempts, self.max_failures_in_a_row, self.enumerate_max) < 1:
            raise SlimnasError("search.n_trials, max_attempts, max_failures_in_a_row and enumerate_max must be >= 1")


@dataclass(frozen=True)
class Fidelity:
    """Successive halving: KD budgets at which candidates are ranked and the bottom of each cohort stops."""

    rung_tokens: tuple[int, ...] = (100_000, 400_000)  # cumulative KD tokens at the end of each rung
    eta: int = 2  # keep the top 1/eta of the trials that reached a rung
    min_peers: int = 3  # always promote until this many trials reached the rung
    screen: str = "rank"  # the zero-KD screen: rank (recorded only) or stop (also halves, like a rung)

    def __post_init__(self):
        if self.screen not in SCREEN_ROLES:
            raise SlimnasError(f"search.fidelity.screen must be rank or stop, not {self.screen!r}")
        if not self.rung_tokens or min(self.rung_tokens) < 1 or self.eta < 2 or self.min_peers < 1:
            raise SlimnasError("search.fidelity needs rungs of at least one token, eta >= 2 and min_peers >= 1")


@dataclass(frozen=True)
class ReferenceSettings:
    kinds: tuple[str, ...] = REFERENCE_KINDS
    zero_shot_candidates: int = 16  # candidates screened without KD for the zero-shot pick
    uniform_tolerance: float = 0.2  # largest spread of per-dimension ratios still called uniform

    def __post_init__(self):
        unknown = set(self.kinds) - set(REFERENCE_KINDS)
        if unknown:
            raise SlimnasError(f"unknown reference kind(s) {sorted(unknown)}")


@dataclass(frozen=True)
class StorageSettings:
    url: str | None = None  # None = SQLite in the run directory
    heartbeat_interval: int = 20  # seconds between a running trial's heartbeats
    grace_period: int = 180  # a trial of another host silent this long is failed and retried


@dataclass(frozen=True)
class SearchSetup:
    run_dir: Path
    settings: SearchSettings
    fidelity: Fidelity
    references: ReferenceSettings
    budget: Budget
    objectives: tuple[Objective, ...]
    space: SearchSpace
    feasible: tuple[Architecture, ...]
    encoding: FeasibleEncoding  # the sampler's coordinates: every point a feasible candidate
    sampler: str  # resolved: auto became enumerate or tpe
    policy: PrunePolicy
    distill: DistillSettings  # budget = the last rung
    rung_steps: tuple[int, ...]  # KD steps at the end of each rung
    quality: QualitySettings
    speed: SpeedSettings | None
    storage: RDBStorage
    context: TeacherContext
    teacher_targets: TeacherTargets
    selection: HeldoutSet
    suite: TaskSuite | None
    hardware: dict
    settings_hash: str  # every setting that changes a trial's result: a study holds trials of one hash only
    command: str
    log_file: Path

    @property
    def timings_rank(self) -> bool:
        return any(o.measured for o in self.objectives) or self.budget.latency_ms is not None


def _settings_hash(cfg: DictConfig, teacher_fingerprint: str) -> str:
    """What makes two trials comparable: every setting that changes a trial's result."""
    values = OmegaConf.to_container(cfg, resolve=True)
    # how many trials, where they are stored, and which references are queued do not change what a trial measures
    ignored = ("n_trials", "storage", "keep_checkpoints", "references")
    search = {k: v for k, v in values["search"].items() if k not in ignored}
    shared = {k: values[k] for k in ("data", "importance", "distill", "pruning", "precision", "device")}
    if values["search"]["score_trials"]:
        shared["quality"] = values["quality"]
    if values["search"]["measure_speed"] or set(values["search"]["objectives"]) & {"throughput", "latency"}:
        shared["speed"] = values["speed"]
    return hash_json([teacher_fingerprint, search, shared])


def build_setup(cfg: DictConfig) -> SearchSetup:
    # 1. Settings records: every value checked, nothing loaded yet
    search = cfg.search
    settings = settings_from(SearchSettings, search, "search", skip=NESTED_SECTIONS)
    fidelity = settings_from(Fidelity, search.fidelity, "search.fidelity")
    references = settings_from(ReferenceSettings, search.references, "search.references")
    storage_settings = settings_from(StorageSettings, search.storage, "search.storage")
    budget = settings_from(Budget, search.budget, "search.budget")
    objectives = tuple(objectives_from_config(list(settings.objectives)))
    policy = settings_from(PrunePolicy, cfg.pruning, "pruning")
    data = settings_from(DataSettings, cfg.data, "data")
    importance = settings_from(ImportanceSettings, cfg.importance, "importance", precision=cfg.precision)
    distill = settings_from(DistillSettings, cfg.distill, "distill", precision=cfg.precision)
    distill = replace(distill, budget_tokens=max(fidelity.rung_tokens))
    rung_steps = tuple(distill.steps_for(tokens, data.seq_len) for tokens in fidelity.rung_tokens)
    if any(b <= a for a, b in pairwise((0, *rung_steps))):
        step = distill.tokens_per_step(data.seq_len)
        raise SlimnasError(
            f"search.fidelity.rung_tokens {list(fidelity.rung_tokens)} must increase by at least one KD step "
            f"({step} tokens) per rung"
        )
    quality = settings_from(QualitySettings, cfg.quality, "quality")
    needs_speed = settings.measure_speed or any(o.measured for o in objectives) or budget.latency_ms is not None
    speed = settings_from(SpeedSettings, cfg.speed, "speed", precision=cfg.precision) if needs_speed else None

    # 2. The teacher's shape: the space and the feasible set under the budget
    device = pick_device(cfg.device)
    teacher = load_model(cfg.teacher, device)
    config = teacher.model.config
    space = SearchSpace.from_config(OmegaConf.to_container(search.space), config)
    feasible = tuple(space.feasible(config, budget))
    if not feasible:
        raise SlimnasError(
            f"budget unreachable: no architecture of the search space ({space.size()} points) meets "
            f"{budget.describe(config)}"
        )
    sampler = settings.sampler
    if sampler == "auto":
        sampler = "enumerate" if len(feasible) <= settings.enumerate_max else "tpe"

    # 3. The task suite, when trials are scored (task names and files checked; prepared in the cache)
    suite = prepare_suite(list(quality.tasks), data.dir) if settings.score_trials else None
    if settings.quality_metric == "summary":
        quality.check_summary()

    # 4. The study's storage: a server nobody listens on fails here, before minutes of compute
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    url = storage_url(storage_settings.url, run_dir)
    storage = open_storage(url, storage_settings.heartbeat_interval, storage_settings.grace_period)
    settings_hash = _settings_hash(cfg, teacher.fingerprint)
    check_existing_study(storage, settings.study_name, settings_hash)

    # 5. Corpus, importance, the teacher's top-k logits for every KD row a trial can use, the selection rows
    context = load_teacher_context(cfg.teacher, cfg.device, data, cache_root(cfg.cache_dir), importance, teacher)
    targets = make_teacher_targets(distill, teacher, context.corpus.train, cache_root(cfg.cache_dir))
    targets.prepare(distill.rows_for(data.seq_len))
    selection = HeldoutSet("selection", context.corpus.selection, teacher.model, cfg.precision)

    return SearchSetup(
        run_dir=run_dir,
        settings=settings,
        fidelity=fidelity,
        references=references,
        budget=budget,
        objectives=objectives,
        space=space,
        feasible=feasible,
        encoding=FeasibleEncoding.of(list(feasible)),
        sampler=sampler,
        policy=policy,
        distill=distill,
        rung_steps=rung_steps,
        quality=quality,
        speed=speed,
        storage=storage,
        context=context,
        teacher_targets=targets,
        selection=selection,
        suite=suite,
        hardware=hardware(device),
        settings_hash=settings_hash,
        command=cfg.command,
        log_file=run_dir / "log.txt",
    )


def describe(setup: SearchSetup) -> list[str]:
    """The budgets and choices of the search, printed at its start."""
    config = setup.context.teacher.model.config
    tokens = ", ".join(f"{t:,}" for t in setup.fidelity.rung_tokens)
    lines = [
        f"search space: {setup.space.size()} points, {len(setup.feasible)} feasible under "
        f"{setup.budget.describe(config)}",
        f"sampler: {setup.sampler}; {setup.settings.n_trials} trials to reach the last rung; objectives: "
        + ", ".join(f"{o.name} ({o.direction})" for o in setup.objectives),
        f"KD per trial: rungs at {tokens} tokens (batch {setup.distill.batch_size} x {setup.context.corpus.seq_len}), "
        f"keep the top 1/{setup.fidelity.eta}; zero-KD screen: {setup.fidelity.screen}",
        f"quality: -held-out KL on {len(setup.context.corpus.selection)} selection rows (full vocabulary) "
        f"of {setup.context.corpus.source}",
    ]
    if setup.suite is not None:
        lines.append(f"lm-eval per trial: {setup.suite.describe()}, {setup.quality.trial_limit} documents each")
    return lines
