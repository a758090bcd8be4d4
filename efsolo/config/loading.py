"""``params.yaml`` to validated ``Params``: YAML values converted to the schema's annotated types,
unknown and moved keys reported, every error one line naming the file and the key."""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from efsolo.config.moved_keys import MOVED_KEYS
from efsolo.config.schema import Params, ParamsError, require


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value to the annotated type ``tp`` or raise a one-line ParamsError."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        require(isinstance(value, dict), key, "must be a mapping", value)
        return _build(tp, value, key + ".")
    if origin is Literal:
        allowed = typing.get_args(tp)
        require(value in allowed, key, f"must be one of {list(allowed)}", value)
        return value
    if origin is tuple and typing.get_args(tp)[-1] is not Ellipsis:  # fixed length, e.g. [low, high]
        args = typing.get_args(tp)
        require(isinstance(value, list) and len(value) == len(args), key, f"must be a list of {len(args)}", value)
        return tuple(_coerce(v, t, f"{key}[{i}]") for i, (v, t) in enumerate(zip(value, args)))
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if value is None or value == "":
            return ()
        if isinstance(value, (str, int, float)):
            value = [value]  # a single folder is a list of one
        require(isinstance(value, list), key, "must be a list", value)
        return tuple(_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unsupported union type for {key}")
    if tp is bool:
        require(isinstance(value, bool), key, "must be true or false", value)
        return value
    if tp is int:
        require(isinstance(value, int) and not isinstance(value, bool), key, "must be an integer", value)
        return value
    if tp is float:
        require(isinstance(value, (int, float)) and not isinstance(value, bool), key, "must be a number", value)
        return float(value)
    if tp is str:
        if value is None:
            return ""
        require(isinstance(value, str), key, "must be a string", value)
        return value
    raise TypeError(f"unsupported type {tp!r} for {key}")


def _build(cls: type, raw: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        moved = MOVED_KEYS.get(prefix + unknown[0])
        raise ParamsError(f"unknown key {prefix}{unknown[0]}{more}" + (f": it moved to {moved}" if moved else ""))
    kwargs = {name: _coerce(raw[name], hints[name], prefix + name) for name in names if name in raw}
    return cls(**kwargs)


def params_from_dict(raw: dict) -> Params:
    """Build validated Params from a plain dict (as read from YAML)."""
    if not isinstance(raw, dict):
        raise ParamsError(f"top level must be a mapping, got {type(raw).__name__}")
    return _build(Params, raw)


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate ``params.yaml``; errors are one line naming the file and the key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    try:
        return params_from_dict(raw)
    except ParamsError as err:
        raise ParamsError(f"{path}: {err}") from None


def to_dict(params: Any) -> dict:
    """Plain nested dict of a params dataclass (tuples become lists, at any depth)."""
    def conv(v: Any) -> Any:
        if isinstance(v, (tuple, list)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v
    return conv(dataclasses.asdict(params))
