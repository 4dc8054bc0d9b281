"""Typed config blocks: build dataclasses from plain dicts (YAML/JSON) with clear errors.

Every config section of the engine is a dataclass; ``from_mapping`` checks each key against the
dataclass fields (unknown key -> error with the nearest valid name), checks value types, and returns
the instance. Errors name the section (``where``), the key, the value and what would be valid.
``read_config_file`` reads YAML/JSON files (duplicate keys are errors) and ``parse_value`` one YAML
value (``2e-5`` is a float), for the launcher's and the evaluator's files and ``--set`` values.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value or key that cannot be used; the message says where and what would be valid."""


def suggest(name: str, valid: typing.Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the nearest valid name, or an empty string."""
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_keys(data: Mapping[str, Any], valid: typing.Iterable[str], where: str) -> None:
    """Raise ConfigError for the first key of ``data`` not in ``valid``, with a suggestion."""
    valid = list(valid)
    for key in data:
        if key not in valid:
            raise ConfigError(
                f"{where}: unknown key {key!r}{suggest(str(key), valid)}; valid keys: {', '.join(sorted(valid))}"
            )


def _type_name(tp: Any) -> str:
    if get_origin(tp) is typing.Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) in (list, tuple, dict) and get_args(tp):
        return f"{get_origin(tp).__name__}[{', '.join(_type_name(a) for a in get_args(tp))}]"
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Return ``value`` checked against the annotation ``tp`` (ints accepted for floats); ConfigError
    naming ``where`` otherwise."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for option in get_args(tp):
            try:
                return coerce(value, option, where)
            except ConfigError as err:
                errors.append(err)
        raise ConfigError(f"{where}: expected {' or '.join(_type_name(a) for a in get_args(tp))}, "
                          f"got {_got(value, tp)}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {value!r}")
    if origin is typing.Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(f"{where}: invalid value {value!r}; valid: {', '.join(repr(a) for a in get_args(tp))}")
    if origin in (list, tuple, typing.Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r} ({type(value).__name__})")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}: {value!r}")
            items = [coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            item_tp = args[0] if args else Any
            items = [coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin in (dict, typing.Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r} ({type(value).__name__})")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r} ({type(value).__name__})")
        return from_mapping(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {_got(value, tp)}")


def _got(value: Any, tp: Any) -> str:
    """The rejected value and its type; for a boolean where a string is allowed, how to write the string."""
    text = f"{value!r} ({type(value).__name__})"
    options = get_args(tp) or (tp,)
    if isinstance(value, bool) and str in options:
        # YAML 1.1 reads bare no/yes/off/on as booleans
        text += f"; a bare no/yes/off/on is a boolean in YAML: quote it, e.g. \"{'yes' if value else 'no'}\""
    return text


def from_mapping(cls: type[T], data: Mapping[str, Any] | None, where: str) -> T:
    """Build dataclass ``cls`` from ``data``: unknown keys and wrong types raise ConfigError.

    Missing keys take the dataclass defaults; ``where`` names the section in messages
    (e.g. ``"model_config.autoregressive_config"``).
    """
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    check_keys(data, fields, where)
    hints = get_type_hints(cls)
    kwargs = {key: coerce(value, hints[key], f"{where}.{key}") for key, value in data.items()}
    missing = [name for name, f in fields.items() if name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where}: missing required key(s): {', '.join(missing)}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{where}: {err}") from err


# ---------------------------------------------------------------------------------------------- reading
class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``2e-5`` (no dot) as a string; configs mean a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    """A YAML mapping whose keys are unique: the same key twice is an error, never "the last one wins"."""
    loader.flatten_mapping(node)
    seen: dict[Any, yaml.Mark] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            first = seen[key]
            raise ConfigError(f"line {key_node.start_mark.line + 1}: key {key!r} "
                              f"appears twice in one mapping (first on line {first.line + 1}); keep one")
        seen[key] = key_node.start_mark
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _unique_json_object(pairs: list[tuple[str, Any]]) -> dict:
    keys = [k for k, _ in pairs]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise ConfigError(f"key {twice[0]!r} appears twice in one JSON object; keep one")
    return dict(pairs)


def parse_value(text: str) -> Any:
    """A YAML scalar or flow value (``5``, ``2e-5``, ``true``, ``null``, ``[a, b]``, ``{k: v}``)."""
    return yaml.load(text, Loader=_Loader) if text.strip() else ""


def read_config_file(path: str | os.PathLike) -> Any:
    """Parse a ``.yaml``/``.yml``/``.json`` file (other extensions: YAML, a superset of JSON)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ConfigError(f"{path}: byte 0x{data[err.start]:02x} on line {line} is not valid UTF-8; save the "
                          f"config as UTF-8") from err
    try:
        if path.suffix == ".json":
            return json.loads(text, object_pairs_hook=_unique_json_object)
        return yaml.load(text, Loader=_Loader)
    except ConfigError as err:  # a duplicate key
        raise ConfigError(f"{path}: {err}") from err
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {err}") from err
