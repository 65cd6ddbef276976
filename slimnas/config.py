"""Every command's settings: Hydra structured configs, one dataclass per section, one place per default.

Each section's dataclass lives beside the code that reads it (DataSettings in compress/corpus.py, ...);
here each is registered in Hydra's ConfigStore as the option `default` of its group. The YAML files in
conf/ hold only the command files (which groups a command uses, its own few keys) and the presets
(conf/preset: what they change and why), and the sampler options (conf/search/sampler). A section's
`precision` follows the command's top-level `precision` setting.
"""

from hydra import compose as hydra_compose
from hydra import initialize_config_module
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from slimnas.baselines import BaselineSettings
from slimnas.bench.quality import QualitySettings
from slimnas.bench.speed import SpeedSettings
from slimnas.chains import ChainBenchSettings
from slimnas.compress.corpus import DataSettings
from slimnas.compress.correct import CorrectSettings
from slimnas.compress.distill import DistillSettings
from slimnas.compress.importance import ImportanceSettings
from slimnas.compress.prune import PrunePolicy
from slimnas.search.retraining import RetrainSettings
from slimnas.search.settings import SearchSettings

CONFIG_MODULE = "slimnas.conf"  # the command files and presets ship inside the package (conf/ in the repository)
SECTIONS = {
    "data": DataSettings,
    "importance": ImportanceSettings,
    "pruning": PrunePolicy,
    "distill": DistillSettings,
    "correct": CorrectSettings,
    "quality": QualitySettings,
    "speed": SpeedSettings,
    "search": SearchSettings,
    "retrain": RetrainSettings,
    "baselines": BaselineSettings,
    "chains": ChainBenchSettings,
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
