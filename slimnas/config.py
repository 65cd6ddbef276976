"""Every command's settings: Hydra structured configs, one dataclass per section, one place per default.

Each stage keeps its sections' dataclasses in its own light `settings` module (compress/settings.py,
bench/settings.py, search/settings.py, retrain/settings.py, slimnas/recipes/settings.py): no torch, no
Optuna, no pandas behind them, so a command's configuration is composed and every section checked in well
under a second, before any recipe is imported. Here each is registered in Hydra's ConfigStore as the option
`default` of its group. The YAML files in conf/ hold only the command files (which groups a command uses,
its own few keys), the presets (conf/preset: what they change and why) and the sampler options
(conf/search/sampler). A section's `precision` follows the command's top-level `precision` setting.
"""

import itertools

from hydra import compose as hydra_compose
from hydra import initialize_config_module
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, ListConfig, OmegaConf

from slimnas.bench.settings import QualitySettings, SpeedSettings
from slimnas.compress.settings import (
    CorrectSettings,
    DataSettings,
    DistillSettings,
    ImportanceSettings,
    PruningSettings,
)
from slimnas.core.errors import SlimnasError
from slimnas.core.launch import check_storage, launcher_of, wants_workers
from slimnas.core.settings import check_precision, settings_of
from slimnas.recipes.settings import BaselinesSettings, ChainsSettings
from slimnas.retrain.settings import RetrainSettings
from slimnas.search.settings import SearchSettings

CONFIG_MODULE = "slimnas.conf"  # the command files and presets ship inside the package (conf/ in the repository)
SECTIONS = {
    "data": DataSettings,
    "importance": ImportanceSettings,
    "pruning": PruningSettings,
    "distill": DistillSettings,
    "correct": CorrectSettings,
    "quality": QualitySettings,
    "speed": SpeedSettings,
    "search": SearchSettings,
    "retrain": RetrainSettings,
    "baselines": BaselinesSettings,
    "chains": ChainsSettings,
}


def register() -> None:
    """Each section's dataclass as its group's `default` option (idempotent)."""
    store = ConfigStore.instance()
    for group, settings in SECTIONS.items():
        node = OmegaConf.structured(settings)
        if "precision" in node:
            node.precision = "${precision}"  # one precision setting per command, not one per section
        store.store(group=group, name="default", node=node)


def compose(command_config: str, overrides: list[str]) -> DictConfig:
    register()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base=None):
        return hydra_compose(config_name=command_config, overrides=overrides)


def check_chain(chain: object) -> list[float]:
    """slimnas pipeline's chain=[f1, f2, ...]: decreasing fractions of the original teacher's parameters in (0, 1)."""
    refused = SlimnasError(
        f"chain must be a list of decreasing fractions of the teacher's parameters in (0, 1), not {chain}"
    )
    if not isinstance(chain, ListConfig | list):
        raise refused
    try:
        fractions = [float(f) for f in chain]
    except (TypeError, ValueError):
        raise refused from None
    if any(not 0 < f < 1 for f in fractions) or any(b >= a for a, b in itertools.pairwise(fractions)):
        raise refused
    return fractions


def check(cfg: DictConfig) -> None:
    """Every section the command uses, checked from the configuration alone (seconds before any model loads), and
    what the sections depend on together: the pipeline's chain, and a launcher's workers against the storage."""
    if missing := sorted(OmegaConf.missing_keys(cfg)):
        raise SlimnasError(f"missing setting {', '.join(missing)}: give it as key=value (or as the command's path)")
    if "precision" in cfg:
        check_precision(cfg.precision)
    for section in SECTIONS:
        if section in cfg:
            settings_of(cfg, section)
    if "chain" in cfg:
        check_chain(cfg.chain)
    if "search" in cfg and wants_workers(cfg):
        check_storage(cfg, launcher_of(list(cfg.get("launcher", []))))
