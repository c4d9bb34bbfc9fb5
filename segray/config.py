"""Frozen config dataclasses with a strict ``from_dict``.

Configuration flows one way: flags or YAML -> frozen dataclass (unknown keys
and wrong types raise, naming the key) -> ``asdict`` into Ray's
``train_loop_config`` -> rebuilt on each worker with ``from_dict``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is missing, unknown or of the wrong type."""


def _check(name: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            if arg is type(None) and value is None:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check(name, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{name}: expected {hint}, got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{name}: expected one of {list(args)}, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{name}: expected {len(args)} values, got {value!r}")
            return tuple(_check(f"{name}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        return origin(_check(f"{name}[{i}]", v, item) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return from_dict(hint, value, prefix=f"{name}.")
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return value
    if isinstance(hint, type) and not isinstance(value, hint):
        raise ConfigError(f"{name}: expected {hint.__name__}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Builds ``cls`` from ``data``; unknown keys and wrong types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or cls.__name__}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; known: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, field in fields.items():
        if name in data:
            kwargs[name] = _check(prefix + name, data[name], hints[name])
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing config key {prefix + name}")
    return cls(**kwargs)


def to_dict(obj: Any) -> dict[str, Any]:
    """``asdict`` with tuples turned into lists, so the result is JSON-ready."""

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(obj))


def parse_size(text: str) -> tuple[int, int]:
    """'256' -> (256, 256); '256x320' -> (256, 320) as (height, width)."""
    parts = text.lower().split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        raise ConfigError(f"size {text!r}: expected H or HxW, e.g. 256 or 256x320") from None
    if len(sizes) == 1:
        sizes = sizes * 2
    if len(sizes) != 2 or min(sizes) <= 0:
        raise ConfigError(f"size {text!r}: expected H or HxW with positive integers")
    return sizes[0], sizes[1]
