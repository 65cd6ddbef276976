"""Settings records from a composed command config, and the checks every command shares (no heavy imports)."""

from typing import Any

from omegaconf import DictConfig, OmegaConf

from slimnas.core.errors import SlimnasError

PRECISIONS = ("auto", "bf16", "fp32")


def settings_of(cfg: DictConfig, key: str) -> Any:
    """The dataclass instance of one config section (its __post_init__ checks what types cannot)."""
    return OmegaConf.to_object(OmegaConf.select(cfg, key, throw_on_missing=True))


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise SlimnasError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    return precision
