"""A typed config dataclass (`mosaic_ray.config`) built from plain data (a YAML mapping), every
problem named by its dotted path in that data.

`EngineConfig(**kwargs)` already refuses a bad value, but from inside: an unknown key is a
TypeError of `__init__` with no place ("unexpected keyword argument 'retreival'"), and a nested
config's range error names its class, not where it sits (`ClusterConfig.variance_ratio`, not
`...kwargs.cache.cluster.variance_ratio`). `build_config` builds the same dataclasses with the same
`__post_init__` checks (the only copy of the bounds), bottom-up, one nested config at a time, so
each error is said at its place, one line each:

    app.runtime.engine.kwargs.cache.retreival: unknown field (did you mean 'retrieval'?); allowed: ...
    app.runtime.engine.kwargs.cache.cluster.variance_ratio: 700.0 out of range (0.0, 100.0]
    app.runtime.engine.kwargs.cache.budget_ratio: expected float, got str 'high'
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

from mosaic_ray.config_checks import RangeError


class ConfigFieldError(ValueError):
    """Plain data that is no valid config: `lines`, one problem each, 'dotted.path: what is wrong'."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


def unknown_field(path: str, allowed: Iterable[str]) -> str:
    """The line of an unknown key at `path` (its last part is the key): the close match, if any,
    then every allowed field. Shared by the dataclass and the pydantic configs' errors."""
    allowed = sorted(allowed)
    key = path.rpartition(".")[2]
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{path}: unknown field{hint}; allowed: {', '.join(allowed)}"


def build_config(cls: type, data: Any, path: str) -> Any:
    """`cls(**data)` with its nested dataclass fields built from their mappings first. Raises
    ConfigFieldError listing every unknown key and wrong type under `path`, else the first
    `__post_init__` refusal of the innermost config that refuses (a config whose parts are wrong
    is not built, so its own checks never see a half-built part)."""
    config, errors = _build(cls, data, path)
    if errors:
        raise ConfigFieldError(errors)
    return config


def _build(cls: type, data: Any, path: str) -> tuple[Any, list[str]]:
    if not isinstance(data, Mapping):
        return None, [f"{path}: expected a mapping of {cls.__name__} fields, got {shown(data)}"]
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    errors = [unknown_field(f"{path}.{key}", names) for key in data if key not in names]
    values = {}
    for key, value in data.items():
        if key not in names:
            continue
        nested = _dataclass_in(hints[key])
        if nested is not None and isinstance(value, Mapping):
            value, more = _build(nested, value, f"{path}.{key}")
        else:
            more = _type_errors(hints[key], value, f"{path}.{key}")
        errors += more
        values[key] = value
    if errors:
        return None, errors
    try:
        return cls(**values), []
    except (ValueError, TypeError) as err:
        return None, [_placed(err, cls, path)]


def _placed(err: Exception, cls: type, path: str) -> str:
    """A `__post_init__` refusal said at `path`: its leading 'Cls.field' becomes the dotted path."""
    if isinstance(err, RangeError):
        return f"{path}.{err.name.partition('.')[2]}: {err.value!r} out of range {err.bounds}"
    message, prefix = str(err), f"{cls.__name__}."
    if message.startswith(prefix):
        field, _, rest = message[len(prefix):].partition(" ")
        return f"{path}.{field}: {rest}"
    return f"{path}: {message}"


def _alternatives(hint: Any) -> tuple[Any, ...]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _dataclass_in(hint: Any) -> type | None:
    return next((t for t in _alternatives(hint) if dataclasses.is_dataclass(t)), None)


def _type_errors(hint: Any, value: Any, path: str) -> list[str]:
    """[] when `value` is of a type `hint` names (an int is a float; a bool is no int), else its
    line. Hints other than plain classes (generics) are left to the config's own checks."""
    kinds = [typing.get_origin(t) or t for t in _alternatives(hint)]
    if not all(isinstance(k, type) for k in kinds):
        return []
    if value is None and type(None) in kinds:
        return []
    if isinstance(value, bool):
        ok = bool in kinds
    else:
        ok = isinstance(value, tuple(kinds)) or (isinstance(value, int) and float in kinds)
    if ok:
        return []
    names = " or ".join("a mapping" if dataclasses.is_dataclass(k) else k.__name__
                        for k in kinds if k is not type(None))
    return [f"{path}: expected {names}{' or null' if type(None) in kinds else ''}, got {shown(value)}"]


def shown(value: Any) -> str:
    """A value as an error line shows it: its type and a repr of at most 40 characters."""
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"
