"""Typed configuration: dataclass schemas, strict YAML loading and dotted command-line overrides.

A config file is data. Every key must name a field of the schema; an unknown key is an error that names
the key, the file it came from and the closest valid key. Values are checked against the field's type
annotation (``int``, ``float``, ``bool``, ``str``, ``Optional``, ``Literal``, ``list``, ``tuple``,
``dict`` and nested dataclasses).

A YAML file may start from another with ``extends: other.yaml`` (a path relative to the file); mappings
are merged key by key, everything else is replaced.

A dataclass may define a classmethod ``config_defaults(data) -> dict`` that supplies defaults depending on
the incoming data: ``ModelConfig`` uses it so that ``arch: beit3_base`` fills in the preset's sizes and
the remaining keys override them.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

__all__ = [
    "ConfigError",
    "from_dict",
    "to_dict",
    "load_config",
    "parse_overrides",
    "dump_yaml",
]


class ConfigError(ValueError):
    """A config file or override does not fit its schema. The message names the key and where it came from."""


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def _unknown_key_error(key: str, prefix: str, valid: Sequence[str], source: str) -> ConfigError:
    full = f"{prefix}{key}"
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    hint = f"; did you mean {prefix + close[0]!r}?" if close else ""
    return ConfigError(f"{source}: unknown key {full!r}{hint} (valid keys here: {', '.join(sorted(valid))})")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Checks ``value`` against the annotation ``tp`` and converts where it is lossless (int → float)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    where = f"{source}: key {key!r}"
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[-1] if errors else f"{where}: got None")
    if origin is typing.Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}{hint}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, source=source, prefix=f"{key}.")
    if origin in (list, Sequence) or tp is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return [_coerce(v, inner, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is tuple or tp is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        inner = args or (Any,) * len(value)
        return tuple(_coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, inner)))
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, vt, f"{key}.{k}", source) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:  # YAML 1.1 reads "1e-4" as a string
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{where}: cannot use {value!r} as {tp}")


def from_dict(cls: type[T], data: Mapping[str, Any], *, source: str = "<config>", prefix: str = "") -> T:
    """Builds the dataclass ``cls`` from a mapping, strictly.

    Args:
        cls: the schema.
        data: the values; keys must be field names of ``cls``.
        source: where the data came from (a file name), for error messages.
        prefix: dotted path of this section inside the whole config, for error messages.

    Raises:
        ConfigError: unknown key, wrong type, or missing required field.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: section {prefix.rstrip('.') or '<top>'!r} must be a mapping")
    names = _field_names(cls)
    for key in data:
        if key not in names:
            raise _unknown_key_error(str(key), prefix, names, source)
    merged: dict[str, Any] = {}
    hook = getattr(cls, "config_defaults", None)
    if hook is not None:
        merged.update(hook(data))
    merged.update(data)
    hints = _hints(cls)
    kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}", source) for k, v in merged.items()}
    try:
        obj = cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{source}: section {prefix.rstrip('.') or '<top>'!r}: {e}") from None
    check = getattr(obj, "validate", None)
    if check is not None:
        try:
            check()
        except ValueError as e:
            raise ConfigError(f"{source}: section {prefix.rstrip('.') or '<top>'!r}: {e}") from None
    return obj


def to_dict(obj: Any) -> Any:
    """The plain-data form of a config (dataclasses → dicts, tuples → lists), ready for YAML or JSON."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def dump_yaml(obj: Any) -> str:
    """YAML text of a config object or plain data."""
    return yaml.safe_dump(to_dict(obj), sort_keys=False)


def _deep_merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _deep_merge(dict(out[k]), v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Reads a YAML mapping, resolving ``extends:`` chains."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: 'extends' forms a cycle")
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    data = dict(data)
    parent = data.pop("extends", None)
    if parent is not None:
        base = read_yaml(path.parent / parent, _seen + (path,))
        data = _deep_merge(base, data)
    return data


def _check_override_key(cls: type, dotted: str) -> None:
    """Raises ConfigError if ``dotted`` does not name a field (or a key under a dict field) of ``cls``."""
    parts = dotted.split(".")
    tp: Any = cls
    for i, part in enumerate(parts):
        # unwrap Optional[Dataclass]
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
            tp = inner[0] if inner else tp
        if not dataclasses.is_dataclass(tp):
            if typing.get_origin(tp) in (dict, Mapping) or tp is dict or tp is Any:
                return  # free-form mapping below this point
            raise ConfigError(f"command line: {dotted!r}: {'.'.join(parts[:i])!r} is a value, not a section")
        names = _field_names(tp)
        if part not in names:
            raise _unknown_key_error(part, ".".join(parts[:i]) + ("." if i else ""), names, "command line")
        tp = _hints(tp)[part]


def parse_overrides(overrides: Sequence[str], cls: type | None = None) -> dict[str, Any]:
    """Parses ``a.b=value`` strings into a nested mapping; values are read as YAML scalars or lists.

    Args:
        overrides: strings like ``model.depth=4`` or ``data.shards=[a.tar,b.tar]``.
        cls: when given, each key is checked against this schema.
    """
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"command line: override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"command line: override {item!r} has an empty key")
        if cls is not None:
            _check_override_key(cls, key)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"command line: override {item!r} conflicts with an earlier one")
        node[parts[-1]] = value
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Loads a config: the YAML file (if any), then the dotted overrides, checked against ``cls``.

    Args:
        cls: the schema dataclass of the command.
        path: a YAML file; ``None`` starts from the schema's defaults.
        overrides: ``key=value`` strings applied after the file.

    Raises:
        ConfigError: with the key, the file (or "command line") and the closest valid key.
    """
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        data = read_yaml(path)
        source = str(path)
        from_dict(cls, data, source=source)  # report file errors against the file
    if overrides:
        data = _deep_merge(data, parse_overrides(overrides, cls))
        source = f"{source} + command line"
    return from_dict(cls, data, source=source)
