"""One source per default: every section's defaults are its dataclass's, and no YAML file writes them again."""

import dataclasses
from pathlib import Path

import optuna
import pytest
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf
from test_search_per_layer import TINY

from slimnas.cli import COMMANDS
from slimnas.config import SECTIONS, compose
from slimnas.core.settings import settings_of
from slimnas.recipes.settings import sampler_file
from slimnas.search.constraints import Budget
from slimnas.search.evolution import LevelSwitchSampler
from slimnas.search.layer_space import LayerSpace
from slimnas.search.space import PerLayerSpaceSettings

CONF = Path(__file__).resolve().parents[1] / "conf"
COMMAND_FILES = sorted(path for path in CONF.glob("*.yaml"))


COMMAND_OF = {  # a command whose config has the section
    "data": "common", "importance": "common", "pruning": "prune", "distill": "distill", "correct": "correct",
    "quality": "bench", "speed": "bench", "search": "search", "retrain": "retrain", "baselines": "baselines",
    "chains": "chains",
}  # fmt: skip


def defaults_of(settings: type) -> dict:
    """The dataclass's own defaults, field by field."""
    return {
        f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
        for f in dataclasses.fields(settings)
    }


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_a_composed_section_is_its_dataclass_and_nothing_else(section):
    composed = settings_of(compose(COMMAND_OF[section], []), section)
    values = {f.name: getattr(composed, f.name) for f in dataclasses.fields(composed)}
    expected = defaults_of(SECTIONS[section])
    if section == "search":  # the sampler is a group default (search/sampler: tpe), not a dataclass value
        assert values.pop("sampler")["_target_"] == "optuna.samplers.TPESampler" and expected.pop("sampler") is None
    assert type(composed) is SECTIONS[section] and values == expected


@pytest.mark.parametrize("path", COMMAND_FILES, ids=[p.name for p in COMMAND_FILES])
def test_command_files_hold_no_section_defaults(path):
    """A command file lists its groups and sets its own few keys: it never repeats a section's settings."""
    content = yaml.safe_load(path.read_text()) or {}
    assert not set(content) & set(SECTIONS), f"{path.name} sets {set(content) & set(SECTIONS)}"


def test_every_command_has_a_config_that_composes_and_a_recipe():
    import importlib

    for name, (config, _) in COMMANDS.items():
        assert compose(config, []) is not None, name
        assert callable(importlib.import_module(f"slimnas.recipes.{name}").main), name


def test_a_sections_precision_follows_the_commands_precision():
    cfg = compose("search", ["precision=fp32"])
    assert {settings_of(cfg, key).precision for key in ("distill", "importance", "speed")} == {"fp32"}


def test_overrides_are_type_checked_when_composed():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        compose("search", ["search.n_trials=many"])
    with pytest.raises(ConfigCompositionException):
        compose("search", ["data.no_such_setting=1"])


SAMPLERS = {"tpe": optuna.samplers.TPESampler, "nsga2": optuna.samplers.NSGAIISampler,
            "gp": optuna.samplers.GPSampler, "random": optuna.samplers.RandomSampler,
            "cmaes": optuna.samplers.CmaEsSampler, "evolution": LevelSwitchSampler}  # fmt: skip


def test_every_sampler_option_is_tested():
    assert sorted(path.stem for path in sampler_file("tpe").parent.glob("*.yaml")) == sorted(SAMPLERS)


@pytest.mark.parametrize("choice", SAMPLERS)
def test_any_optuna_sampler_by_configuration_alone_proposes_per_layer_candidates(choice):
    """Each option builds its sampler and proposes past its random start-up trials (where CMA-ES imports `cmaes`
    and the GP fits), every proposal a candidate within the budget."""
    cfg = compose("search", [f"search/sampler={choice}", "search.proposals=per_layer"])
    sampler = instantiate(OmegaConf.to_object(cfg.search.sampler), seed=3)
    assert isinstance(sampler, SAMPLERS[choice])
    space = LayerSpace.of(PerLayerSpaceSettings(), [48, 64], TINY, Budget(params=0.7, window=0.3))
    study = optuna.create_study(sampler=sampler)
    for _ in range(8):
        trial = study.ask()
        shape = space.suggest(trial)
        assert space.low <= space.params(shape) <= space.high
        study.tell(trial, float(space.params(shape) % 97))


BAD_SETTINGS = [
    ("pipeline", ["chain=[abc]"], "chain must be a list of decreasing fractions"),
    ("pipeline", ["chain=[0.4,0.6]"], "chain must be a list of decreasing fractions"),
    ("pipeline", ["chain=abc"], "chain must be a list of decreasing fractions"),
    ("search", ["search.storage.url=foo://host/db"], "search.storage.url=foo://host/db cannot be used"),
    ("search", ["search.storage.url=not a url"], "cannot be used: Could not parse"),
    ("search", ["hydra/launcher=submitit_slurm"], "cannot share a SQLite file"),
    # the pipeline refuses the launcher before its correction stage spends anything
    ("pipeline", ["hydra/launcher=submitit_slurm", "correct.budget_tokens=1000"], "cannot share a SQLite file"),
]


@pytest.mark.parametrize("command, overrides, message", BAD_SETTINGS, ids=[" ".join(o) for _, o, _ in BAD_SETTINGS])
def test_bad_settings_are_one_line_exit_2_and_write_nothing(tmp_path, capsys, command, overrides, message):
    from slimnas.cli import main

    run_dir = tmp_path / "runs" / "search"
    assert main([command, f"run_dir={run_dir}", *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("slimnas: error:") and message in err[0]
    assert not (tmp_path / "runs").exists()


def test_bad_settings_are_refused_before_torch_is_imported(tmp_path):
    """The checks run on the composed configuration alone: a second, not the recipe's imports."""
    import subprocess
    import sys

    cases = [(command, overrides) for command, overrides, _ in BAD_SETTINGS]
    script = (
        "import sys\nfrom slimnas.cli import main\n"
        f"codes = [main([command, 'run_dir={tmp_path / 'run'}', *overrides]) for command, overrides in {cases!r}]\n"
        "print(codes, 'torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.stdout.split("\n")[0] == f"{[2] * len(BAD_SETTINGS)} False", done.stderr


def test_a_storage_server_nobody_listens_on_leaves_no_run_directory(tiny_checkpoint, tmp_path, capsys):
    from slimnas.cli import main

    run_dir = tmp_path / "runs" / "search"
    url = "postgresql://nobody@127.0.0.1:1/slimnas"  # port 1: refused at once
    assert main(["search", f"teacher={tiny_checkpoint}", f"run_dir={run_dir}", f"search.storage.url={url}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"slimnas: error: cannot open study storage {url}")
    assert not (tmp_path / "runs").exists()


def test_auto_precision_is_bf16_only_where_the_device_computes_it_natively(monkeypatch):
    import torch

    import slimnas.core.device as device_module

    cpu = torch.device("cpu")
    for native, expected in ((False, torch.float32), (True, torch.bfloat16)):
        monkeypatch.setattr(device_module, "native_bf16", lambda device, native=native: native)
        with device_module.autocast(cpu, "auto"):
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == expected
    with device_module.autocast(cpu, "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with device_module.autocast(cpu, "fp32"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
