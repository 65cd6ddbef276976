"""One name and one default per setting: the YAML files and the settings records agree."""

import dataclasses

import pytest
from omegaconf import OmegaConf

from slimnas.baselines import BaselineSettings
from slimnas.bench.quality import QualitySettings
from slimnas.bench.speed import SpeedSettings
from slimnas.cli import COMMANDS, compose
from slimnas.compress.corpus import DataSettings
from slimnas.compress.distill import DistillSettings
from slimnas.compress.importance import ImportanceSettings
from slimnas.compress.prune import PrunePolicy
from slimnas.search.constraints import Budget
from slimnas.search.retraining import RetrainSettings
from slimnas.search.setup import Fidelity, ReferenceSettings, SearchSettings, StorageSettings

RECORDS = [  # (record, the config section it is read from, in the config that has it)
    (DataSettings, "data", "common"),
    (ImportanceSettings, "importance", "common"),
    (PrunePolicy, "pruning", "prune"),
    (DistillSettings, "distill", "distill"),
    (QualitySettings, "quality", "bench"),
    (SpeedSettings, "speed", "bench"),
    (SearchSettings, "search", "search"),
    (Fidelity, "search.fidelity", "search"),
    (ReferenceSettings, "search.references", "search"),
    (StorageSettings, "search.storage", "search"),
    (Budget, "search.budget", "search"),
    (RetrainSettings, "retrain", "retrain"),
    (BaselineSettings, "baselines", "baselines"),
]


@pytest.mark.parametrize("record, section, config", RECORDS, ids=[r[1] for r in RECORDS])
def test_every_yaml_default_is_the_records_default(record, section, config):
    values = OmegaConf.to_container(OmegaConf.select(compose(config, []), section), resolve=True)
    for field in dataclasses.fields(record):
        if field.name not in values:
            continue  # set by the command (precision), not a setting of this section
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        yaml_value = tuple(values[field.name]) if isinstance(default, tuple) else values[field.name]
        assert yaml_value == default, f"{section}.{field.name}: YAML {yaml_value!r}, record {default!r}"
    nested = {f.name for f in dataclasses.fields(record)}
    unknown = {k for k, v in values.items() if k not in nested and not isinstance(v, dict)}
    assert not unknown, f"{section} has settings no record reads: {unknown}"


def test_every_command_has_a_config_that_composes():
    for name, (_, config, _) in COMMANDS.items():
        assert compose(config, []) is not None, name
