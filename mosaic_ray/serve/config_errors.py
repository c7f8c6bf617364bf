"""What is wrong with a `mosaic-ray serve --config` file, said when it is read (issue 18: a typo
in the YAML was accepted and failed 23 s later inside Ray, in 256 log lines).

Every problem is one line, 'dotted.path: what is wrong', the path being where it sits in the
YAML: the pydantic sections (`LaunchConfig`) through their ValidationError, and the real engine's
`app.runtime.engine.kwargs` (a plain dict to pydantic) by building the very dataclasses a shard
builds from it (`EngineConfig` and its parts, `mosaic_ray/config_load.py`), weights not loaded.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ValidationError

from mosaic_ray.config_load import ConfigFieldError, build_config, shown, unknown_field
from mosaic_ray.runtime.config import DEFAULT_ENGINE_FACTORY

ENGINE_KWARGS = ("app", "runtime", "engine", "kwargs")


def validation_lines(err: ValidationError, model: type[BaseModel]) -> list[str]:
    """One line per error of `err` (raised validating `model`): the dotted path, then pydantic's
    message and the value given, or, for an unknown key, the fields allowed there. A value is
    never shown under a model that hides its inputs (API keys: `AuthSpec`)."""
    return [_line(error, model) for error in err.errors()]


def engine_kwargs_lines(raw: Mapping) -> list[str]:
    """The problems of the real engine's kwargs in the raw config mapping `raw` (the YAML with the
    flags applied): [] when they build an `EngineConfig`, when another factory is named (its
    kwargs are its own), or when the kwargs are no mapping (pydantic says so)."""
    engine = _get(raw, ENGINE_KWARGS[:-1])
    factory = engine.get("factory", DEFAULT_ENGINE_FACTORY) if isinstance(engine, Mapping) else None
    kwargs = engine.get("kwargs", {}) if isinstance(engine, Mapping) else {}
    if factory != DEFAULT_ENGINE_FACTORY or not isinstance(kwargs, Mapping):
        return []
    from mosaic_ray.config import EngineConfig  # imports torch: only once there is an engine to check

    try:
        build_config(EngineConfig, kwargs, ".".join(ENGINE_KWARGS))
    except ConfigFieldError as err:
        return err.lines
    return []


def _get(raw: Any, path: tuple[str, ...]) -> Any:
    """raw[path[0]][path[1]]..., {} where a part is missing, None where a part is no mapping."""
    node = raw
    for key in path:
        if not isinstance(node, Mapping):
            return None
        node = node.get(key, {})
    return node


def _line(error: dict, model: type[BaseModel]) -> str:
    loc = tuple(error["loc"])
    path = ".".join(str(part) for part in loc) or "(top level)"
    nodes = _walk(model, loc)
    if error["type"] == "extra_forbidden":
        owner = nodes[len(loc) - 1] if len(nodes) >= len(loc) else None  # the model holding the key
        if _is_model(owner):
            return unknown_field(path, owner.model_fields)
        return f"{path}: unknown field"
    message = error["msg"].removeprefix("Value error, ")
    hidden = any(_is_model(n) and n.model_config.get("hide_input_in_errors") for n in nodes)
    if hidden or error["type"] == "missing":
        return f"{path}: {message}"
    return f"{path}: {message}, got {shown(error.get('input'))}"


def _walk(model: type[BaseModel], loc: tuple) -> list[Any]:
    """The type at each step of `loc` from `model` ([model, type of loc[0], ...]), ending early
    where the path leaves what the hints say (a field of no model, a key of no dict)."""
    nodes: list[Any] = [model]
    for part in loc:
        node = _step(nodes[-1], part)
        if node is None:
            break
        nodes.append(node)
    return nodes


def _step(node: Any, part: Any) -> Any:
    if _is_model(node):
        field = node.model_fields.get(part)
        return None if field is None else _unwrap(field.annotation)
    if typing.get_origin(node) is dict:  # `part` is one of its keys
        return _unwrap(typing.get_args(node)[1])
    return None


def _unwrap(hint: Any) -> Any:
    """A model or dict type out of an optional or union hint; the hint itself otherwise."""
    for arg in typing.get_args(hint) if typing.get_origin(hint) not in (dict, None) else ():
        if _is_model(arg) or typing.get_origin(arg) is dict:
            return arg
    return hint


def _is_model(node: Any) -> bool:
    return isinstance(node, type) and issubclass(node, BaseModel)

