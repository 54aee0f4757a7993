"""Typed config sections: dataclasses whose fields carry their own checks.

`build(cls, mapping, path)` turns a plain (YAML) mapping into an instance of `cls`, checking every key against
the dataclass: unknown keys, wrong types, values out of range or outside a set of choices, and files or folders
that do not exist all raise `ConfigError` naming the full key path, what was expected and what was given.

A field declares its checks through `spec(...)`:

    bits: int = spec(4, lo=2, hi=8)
    observer: str = spec("mse", choices=("minmax", "mse"))
    checkpoint: Optional[str] = spec(None, exists="file")
"""
from __future__ import annotations

import dataclasses
import os
import typing
from typing import Any, Union

from ptqkit import assets
from ptqkit.errors import ConfigError

_MISSING = dataclasses.MISSING


def spec(default=_MISSING, *, lo=None, hi=None, choices=None, exists=None, factory=None, doc=""):
    """A dataclass field with checks. `exists` is "file" or "dir" for paths that must be there."""
    meta = {"lo": lo, "hi": hi, "choices": choices, "exists": exists, "doc": doc}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner = " or ".join(_type_name(a) for a in args)
        return f"{inner} or null"
    if origin in (list, tuple):
        (arg, *_) = typing.get_args(tp) or (Any,)
        inner = _type_name(arg)
        for article in ("an ", "a "):
            if inner.startswith(article):
                inner = inner[len(article):] + "s"
        return f"a list of {inner}"
    if origin is dict or tp is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            Any: "a value (see its meaning)"}.get(tp, str(tp))


def convert(value, tp, path: str):
    """Check `value` against the annotation `tp`; return the converted value."""
    origin = typing.get_origin(tp)
    if origin is Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert(value, arg, path)
            except ConfigError:
                continue
        raise ConfigError(path, _type_name(tp), value)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(path, "a mapping", value)
        return build(tp, value, path)
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, _type_name(tp), value)
        (arg, *_) = typing.get_args(tp) or (Any,)
        return [convert(v, arg, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, "a mapping", value)
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, "true or false", value)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, "an integer", value)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, "a number", value)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(path, "a string", value)
        return value
    raise TypeError(f"unsupported annotation {tp!r} at {path}")


def check_field(value, meta, path: str):
    if value is None:
        return
    lo, hi, choices, exists = meta.get("lo"), meta.get("hi"), meta.get("choices"), meta.get("exists")
    values = value if isinstance(value, list) else [value]
    for v in values:
        if choices is not None and v not in choices:
            raise ConfigError(path, "one of " + ", ".join(map(str, choices)), v)
        if lo is not None and hi is not None and not (lo <= v <= hi):
            raise ConfigError(path, f"a value in [{lo}, {hi}]", v)
        if lo is not None and hi is None and v < lo:
            raise ConfigError(path, f"a value >= {lo}", v)
        if hi is not None and lo is None and v > hi:
            raise ConfigError(path, f"a value <= {hi}", v)
    found = {"file": os.path.isfile, "dir": os.path.isdir}.get(exists)
    if found is not None and not found(assets.resolve(value)):
        if assets.is_asset(value):
            raise assets.missing_error(value, path, "file" if exists == "file" else "folder")
        raise ConfigError(path, "an existing file" if exists == "file" else "an existing folder", value)


def build(cls, mapping: dict, path: str = ""):
    """Build dataclass `cls` from `mapping`, checking every key. `path` prefixes key names in errors."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in mapping if k not in fields]
    if unknown:
        key = f"{path}.{unknown[0]}" if path else str(unknown[0])
        raise ConfigError(key, "a known key (one of: " + ", ".join(fields) + ")", show_actual=False)
    kwargs = {}
    for name, f in fields.items():
        key = f"{path}.{name}" if path else name
        if name in mapping:
            value = convert(mapping[name], hints[name], key)
        elif f.default is not _MISSING:
            value = f.default
        elif f.default_factory is not _MISSING:
            value = f.default_factory()
        else:
            raise ConfigError(key, f"{_type_name(hints[name])} (required)", show_actual=False)
        check_field(value, f.metadata, key)
        kwargs[name] = value
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if check is not None:
        check(path)
    return obj


def to_dict(obj) -> Any:
    """Plain-data copy of a config object, for YAML/JSON dumps."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def describe(cls, path: str = "", defaults: Any = None) -> list[tuple[str, str, Any, str]]:
    """(key, type, default, doc) rows for the config reference. A nested section's defaults are those of the
    instance its field's factory makes (e.g. `quant.w` is per-channel by default, unlike `quant.a`)."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{path}.{f.name}" if path else f.name
        tp = hints[f.name]
        if defaults is not None:
            default = getattr(defaults, f.name)
        else:
            default = f.default if f.default is not _MISSING else (
                f.default_factory() if f.default_factory is not _MISSING else "(required)")
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, key, default if dataclasses.is_dataclass(default) else None))
            continue
        rows.append((key, _type_name(tp), default, f.metadata.get("doc", "")))
    return rows
