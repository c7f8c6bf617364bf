"""What is wrong with a `mosaic-ray serve --config` file, said when it is read (issue 18: a typo
in the YAML was accepted and failed 23 s later inside Ray, in 256 log lines).

Every problem is one line, 'dotted.path: what is wrong', the path being where it sits in the
YAML, from `LaunchConfig`'s ValidationError: the whole tree is pydantic, down to the real engine's
`app.runtime.engine.kwargs` (an `EngineConfig`, validated by `EngineSpec` as a shard builds it,
weights not loaded).
"""

from __future__ import annotations

import difflib
import typing
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, ValidationError



def validation_lines(err: ValidationError, model: type[BaseModel]) -> list[str]:
    """One line per error of `err` (raised validating `model`): the dotted path, then pydantic's
    message and the value given, or, for an unknown key, the fields allowed there. A value is
    never shown under a model that hides its inputs (API keys: `AuthSpec`)."""
    return [_line(error, model) for error in err.errors()]


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
    if _is_model(node) and part in getattr(node, "plain_models", {}):  # plain data checked as a model
        return node.plain_models[part]
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


def unknown_field(path: str, allowed: Iterable[str]) -> str:
    """The line of an unknown key at `path` (its last part is the key): the close match, if any,
    then every allowed field."""
    allowed = sorted(allowed)
    key = path.rpartition(".")[2]
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{path}: unknown field{hint}; allowed: {', '.join(allowed)}"


def shown(value: Any) -> str:
    """A value as an error line shows it: its type and a repr of at most 40 characters."""
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"
