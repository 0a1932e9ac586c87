"""Config flows one way: Hydra composes it, the entry point converts it once, here, into typed frozen
dataclasses. Unknown keys are errors that name the key and the keys that exist."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Mapping, TypeVar

from omegaconf import DictConfig, ListConfig, OmegaConf

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key or value is wrong; the message names it."""


def _is_tuple_type(tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin is tuple:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_is_tuple_type(a) for a in typing.get_args(tp))
    return False


def to_container(cfg: Any) -> Any:
    """A DictConfig/ListConfig (resolved) or a plain mapping -> plain dicts and lists."""
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def build(cls: type[T], data: Mapping[str, Any] | None, where: str) -> T:
    """Instantiate the frozen dataclass `cls` from `data`; `where` is the config path for messages.

    Lists become tuples where the field is a tuple. Unknown keys raise ConfigError."""
    data = dict(to_container(data) or {})
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(
            f"unknown config key {where}.{unknown[0]}"
            + (f" (and {', '.join(unknown[1:])})" if unknown[1:] else "")
            + f": {where} has {', '.join(names)}"
        )
    kwargs = {}
    for key, value in data.items():
        if isinstance(value, list) and _is_tuple_type(hints.get(key)):
            value = tuple(value)
        elif isinstance(value, Mapping) and dataclasses.is_dataclass(hints.get(key)):
            value = build(hints[key], value, f"{where}.{key}")  # a nested group, e.g. tool.sandbox
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad value in {where}: {exc}") from exc


def as_dict(obj: Any) -> Any:
    """A dataclass (possibly nested) -> plain JSON-able dict."""
    if dataclasses.is_dataclass(obj):
        return {f.name: as_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [as_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: as_dict(v) for k, v in obj.items()}
    return obj
