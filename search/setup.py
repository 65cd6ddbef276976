"""Everything a search needs, checked and built once before the first trial: one immutable `SearchSetup`.

Built in order of cost, so bad input fails in seconds with nothing written: settings, the teacher's
shape and the feasible set, the benchmark files, the storage connection; only then the corpus, the
importance scores, the teacher's logit cache, the selection documents and, for a per-layer study, its seeds (the
block library and the MIP's picks over it).
"""

from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from optuna.storages import RDBStorage

from slimnas.bench.quality import check_summary
from slimnas.bench.settings import QualitySettings, SpeedSettings
from slimnas.bench.speed import check_engine
from slimnas.bench.tasks import TaskSuite, prepare_suite
from slimnas.compress.arch import Architecture, PerLayerArchitecture
from slimnas.compress.context import TeacherContext, load_teacher_context
from slimnas.compress.distill import make_teacher_targets
from slimnas.compress.heldout import HeldoutSet
from slimnas.compress.models import cache_root, load_model
from slimnas.compress.settings import DistillSettings, PruningSettings
from slimnas.compress.teacher_targets import TeacherTargets
from slimnas.core.device import hardware, pick_device
from slimnas.core.errors import SlimnasError
from slimnas.core.files import hash_json
from slimnas.core.settings import settings_of
from slimnas.search.block_seeds import BlockSeeds, block_seeds, check_blocks
from slimnas.search.layer_space import LayerSpace
from slimnas.search.objectives import Objective, objectives_of
from slimnas.search.settings import SearchSettings
from slimnas.search.space import FeasibleEncoding, SearchSpace
from slimnas.search.storage import check_existing_study, open_storage, storage_url

# Settings that do not change what a trial measures: a study resumed with other values of these is the same study.
UNHASHED = (
    "n_trials", "storage", "keep_checkpoints", "references", "screen", "sampler", "seed", "proposals",
    "workers", "gpus", "blocks",
)  # fmt: skip


@dataclass(frozen=True)
class SearchSetup:
    run_dir: Path
    settings: SearchSettings
    objectives: tuple[Objective, ...]
    space: SearchSpace
    feasible: tuple[Architecture, ...]
    encoding: FeasibleEncoding  # the sampler's coordinates: every point a feasible candidate
    layer_space: LayerSpace | None  # search.proposals=per_layer: the per-layer candidates under the budget
    policy: PruningSettings
    distill: DistillSettings
    trial_tokens: int  # KD tokens of a trial's one KD run: the last rung's (search.race.rung_tokens[-1])
    rung_steps: tuple[int, ...]  # KD steps at the end of each rung (rung k ends at rung_steps[k - 1])
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
    seeds: dict[PerLayerArchitecture, str] = field(default_factory=dict)  # per-layer shapes proposed outside the
    # sampler, each with its proposer (search.blocks: the MIP's picks, the proportional allocation): screened with the
    # per-layer sample, so the race sees them when they screen well
    blocks: BlockSeeds | None = None  # search.blocks: where the seeds came from, and what the block library cost

    @property
    def library_seconds(self) -> float:
        """The block library's seconds when its cuts were measured (0 without one): charged like the screen's."""
        return self.blocks.library_seconds if self.blocks is not None else 0.0

    @property
    def timings_rank(self) -> bool:
        return any(o.measured for o in self.objectives) or self.settings.budget.latency_ms is not None

    @property
    def last_rung(self) -> int:
        return len(self.rung_steps)

    def tokens_at(self, rung: int) -> int:
        """KD tokens a candidate has seen at the end of a rung (0 at the screen)."""
        return 0 if rung == 0 else self.rung_steps[rung - 1] * self.distill.tokens_per_step(self.context.corpus.seq_len)


def settings_hash(cfg: DictConfig, teacher_fingerprint: str) -> str:
    """What makes two trials comparable: every setting that changes a trial's result."""
    values = OmegaConf.to_container(cfg, resolve=True)
    search = {k: v for k, v in values["search"].items() if k not in UNHASHED}
    search["budget"] = {k: v for k, v in search["budget"].items() if k != "kd_tokens"}  # how many, not what
    search["race"] = search["race"]["rung_tokens"]  # the confidence decides who goes on, not what is measured
    if values["search"]["proposals"] != "per_layer":  # the per-layer variants are only a per-layer study's
        search["space"] = {k: v for k, v in search["space"].items() if k != "per_layer"}
    shared = {k: values[k] for k in ("data", "importance", "distill", "pruning", "precision", "device")}
    if values["search"]["score_trials"]:
        shared["quality"] = values["quality"]
    if values["search"]["measure_speed"] or set(values["search"]["objectives"]) & {"throughput", "latency"}:
        shared["speed"] = settings_of(cfg, "speed").identity()  # the engine too: one Pareto front per engine
    return hash_json([teacher_fingerprint, search, shared])


def build_setup(cfg: DictConfig) -> SearchSetup:
    # 1. Settings records: every value checked, nothing loaded yet
    settings: SearchSettings = settings_of(cfg, "search")
    objectives = tuple(objectives_of(settings.objectives))
    policy = settings_of(cfg, "pruning")
    data = settings_of(cfg, "data")
    importance = settings_of(cfg, "importance")
    distill: DistillSettings = settings_of(cfg, "distill")
    trial_tokens = max(settings.race.rung_tokens)
    rung_steps = tuple(distill.steps_for(tokens, data.seq_len) for tokens in settings.race.rung_tokens)
    if any(b <= a for a, b in pairwise((0, *rung_steps))):
        step = distill.tokens_per_step(data.seq_len)
        raise SlimnasError(
            f"search.race.rung_tokens {list(settings.race.rung_tokens)} must increase by at least one KD step "
            f"({step} tokens) per rung"
        )
    quality: QualitySettings = settings_of(cfg, "quality")
    needs_speed = settings.measure_speed or any(o.measured for o in objectives) or settings.budget.latency_ms
    speed = settings_of(cfg, "speed") if needs_speed else None

    # 2. The teacher's shape: the space and the feasible set under the budget
    device = pick_device(cfg.device)
    teacher = load_model(cfg.teacher, device)
    config = teacher.model.config
    if speed is not None:
        check_engine(speed, config, cfg.teacher)
    space = SearchSpace.from_settings(settings.space, config)
    feasible = tuple(space.feasible(config, settings.budget))
    layer_space = None
    if settings.proposals == "per_layer":
        layer_space = LayerSpace.of(settings.space.per_layer, space.values["hidden_size"], config, settings.budget)
        if settings.blocks.enabled:
            check_blocks(layer_space, config)
    if not feasible and layer_space is None:  # a per-layer study needs no uniform candidate (its references say so)
        raise SlimnasError(
            f"budget unreachable: no architecture of the search space ({space.size()} points) meets "
            f"{settings.budget.describe(config)}"
        )

    # 3. The task suite, when trials are scored (task names and files checked; prepared in the cache)
    suite = prepare_suite(list(quality.tasks), data.dir) if settings.score_trials else None
    if settings.quality_metric == "summary":
        check_summary(quality)

    # 4. The study's storage: a server nobody listens on fails here, before minutes of compute and the run directory
    run_dir = Path(cfg.run_dir)
    url = storage_url(settings.storage.url, run_dir)
    storage = open_storage(url, settings.storage.heartbeat_interval, settings.storage.grace_period)
    hashed = settings_hash(cfg, teacher.fingerprint)
    check_existing_study(storage, settings.study_name, hashed)
    run_dir.mkdir(parents=True, exist_ok=True)

    # 5. Corpus, importance, the teacher's top-k logits for every KD row a trial can use, the selection documents
    context = load_teacher_context(cfg.teacher, cfg.device, data, cache_root(cfg.cache_dir), importance, teacher)
    targets = make_teacher_targets(distill, teacher, context.corpus.train, cache_root(cfg.cache_dir))
    targets.prepare(distill.rows_for(trial_tokens, data.seq_len))
    selection = HeldoutSet("selection", context.corpus.selection, teacher.model, cfg.precision)

    # 6. Per-layer seeds: the block library (built once, then cached) and the MIP's picks over it (search.blocks)
    blocks = None
    if layer_space is not None and settings.blocks.enabled:
        blocks = block_seeds(settings.blocks, layer_space, teacher, context.importance, selection, settings.budget)

    return SearchSetup(
        run_dir=run_dir,
        settings=settings,
        objectives=objectives,
        space=space,
        feasible=feasible,
        encoding=FeasibleEncoding.of(list(feasible)),
        layer_space=layer_space,
        policy=policy,
        distill=distill,
        trial_tokens=trial_tokens,
        rung_steps=rung_steps,
        quality=quality,
        speed=speed,
        storage=storage,
        context=context,
        teacher_targets=targets,
        selection=selection,
        suite=suite,
        hardware=hardware(device),
        settings_hash=hashed,
        command=cfg.command,
        log_file=run_dir / "log.txt",
        seeds=blocks.proposers() if blocks is not None else {},
        blocks=blocks,
    )
