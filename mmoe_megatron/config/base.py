"""Strict loading of nested config dataclasses from plain dicts (YAML), and back.

Every field is type-checked against its annotation; unknown keys and bad values raise
`ConfigError` naming the dotted field and what is allowed. Range limits live in the field's
metadata (`ge`, `gt`, `le`, `lt`) so the error message can state them.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin


class ConfigError(ValueError):
    """A user mistake in a config file or override: names the field and the fix."""

    def __init__(self, path: str, problem: str):
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}" if path else problem)


def field(default: Any = dataclasses.MISSING, *, ge=None, gt=None, le=None, lt=None, **kw):
    """A dataclass field with numeric bounds that the loader enforces."""
    metadata = {k: v for k, v in dict(ge=ge, gt=gt, le=le, lt=lt).items() if v is not None}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        value = default
        return dataclasses.field(
            default_factory=lambda: copy.deepcopy(value), metadata=metadata, **kw
        )
    return dataclasses.field(default=default, metadata=metadata, **kw)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        return f"list of {_type_name(get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _check_bounds(value: Any, meta: typing.Mapping, path: str) -> None:
    for key, op, word in (
        ("ge", lambda a, b: a >= b, ">="),
        ("gt", lambda a, b: a > b, ">"),
        ("le", lambda a, b: a <= b, "<="),
        ("lt", lambda a, b: a < b, "<"),
    ):
        if key in meta:
            items = value if isinstance(value, list) else [value]
            for item in items:
                if item is not None and not isinstance(item, str) and not op(item, meta[key]):
                    raise ConfigError(path, f"got {item!r}; must be {word} {meta[key]}")


def coerce(value: Any, tp: Any, path: str) -> Any:
    """Return `value` checked (and, for numbers given as strings, converted) against `tp`."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(path, f"must not be null; expected {_type_name(tp)}")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, path)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(path, f"got {value!r}; expected {_type_name(tp)}")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices or type(value) is not type(choices[0]):
            allowed = ", ".join(repr(c) for c in choices)
            raise ConfigError(path, f"got {value!r}; allowed: {allowed}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, f"got {value!r}; expected {_type_name(tp)}")
        (item_tp,) = get_args(tp)
        return [coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_tp, val_tp = get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(path, f"got {value!r}; expected a mapping")
        return {coerce(k, key_tp, path): coerce(v, val_tp, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value) and isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(path, f"got {value!r}; expected a mapping with keys {field_names(tp)}")
        return from_dict(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(path, f"got {value!r}; expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(path, f"got {value!r}; expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out = float(value)
        elif isinstance(value, str):
            try:
                out = float(value)
            except ValueError:
                raise ConfigError(path, f"got {value!r}; expected a number") from None
        else:
            raise ConfigError(path, f"got {value!r}; expected a number")
        if out != out or out in (float("inf"), float("-inf")):
            raise ConfigError(path, f"got {value!r}; expected a finite number")
        return out
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(path, f"got {value!r}; expected a string")
    if tp is Any:
        return value
    raise TypeError(f"{path}: unsupported annotation {tp!r}")  # a bug in the schema, not user input


def field_names(cls: type) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls))


def from_dict(cls: type, data: dict, path: str = ""):
    """Build dataclass `cls` from `data`, strictly. Missing required fields and unknown keys fail."""
    if not isinstance(data, dict):
        raise ConfigError(path, f"expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{path}.{unknown[0]}" if path else str(unknown[0])
        raise ConfigError(where, f"unknown key; allowed keys here: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        sub = f"{path}.{name}" if path else name
        if name in data:
            value = coerce(data[name], hints[name], sub)
            _check_bounds(value, f.metadata, sub)
            kwargs[name] = value
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(sub, f"required field is missing (expected {_type_name(hints[name])})")
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """Plain-data view of a config tree (the inverse of `from_dict`)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def apply_override(data: dict, dotted: str, value: Any) -> None:
    """Set `data[a][b][c] = value` for `dotted == "a.b.c"`, creating mappings on the way."""
    keys = dotted.split(".")
    node = data
    for i, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(".".join(keys[: i + 1]), f"is {child!r}, not a section; cannot set {dotted}")
        node = child
    node[keys[-1]] = value
