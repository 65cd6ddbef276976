"""Settings records from Hydra config sections: one conversion, one error message for a bad section."""

from dataclasses import fields
from typing import TypeVar

from omegaconf import DictConfig, OmegaConf

from slimnas.compress.runtime.errors import SlimnasError

T = TypeVar("T")


def settings_from(cls: type[T], section: DictConfig | None, name: str, skip: tuple[str, ...] = (), **extra) -> T:
    """cls(**section, **extra), with YAML lists turned into the tuples frozen records hold.

    `skip` names sub-sections of `section` that are records of their own.
    """
    values = OmegaConf.to_container(section, resolve=True) if section is not None else {}
    values = {k: v for k, v in values.items() if k not in skip}
    tuple_fields = {f.name for f in fields(cls) if "tuple" in str(f.type)}
    for key in tuple_fields & set(values):
        values[key] = tuple(values[key])
    try:
        return cls(**values, **extra)
    except TypeError as error:
        raise SlimnasError(f"invalid {name} settings: {error}") from error
