"""Settings records from a composed command config: each section is a Hydra structured config of its dataclass."""

from typing import Any

from omegaconf import DictConfig, OmegaConf


def settings_of(cfg: DictConfig, key: str) -> Any:
    """The dataclass instance of one config section (its __post_init__ checks what types cannot)."""
    return OmegaConf.to_object(OmegaConf.select(cfg, key, throw_on_missing=True))
