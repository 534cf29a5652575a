"""Typed dataclass configs read from YAML, with `a.b=value` overrides and validation on load.

Every config in the project is a (nested) dataclass. `load_config` reads a YAML file, applies
dotted overrides, checks every key and type (including `Literal` choices and numeric ranges
declared with `bounded`), then runs each dataclass's own `validate()` for cross-field checks.
Every float must be finite (NaN slips through range checks and trains a NaN model), and a key repeated in
the YAML is refused (the later copy would silently replace the earlier one, section and all). Any failure
is a `ConfigError` whose one-line message names the file and the dotted key:

    ConfigError: configs/tiny.yaml: unknown key 'quantizer.detph' (did you mean 'quantizer.depth'?)
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from unicode_mllm.errors import ConfigError

T = TypeVar("T")

_MISSING = dataclasses.MISSING


def bounded(
    default: Any = _MISSING,
    *,
    min: float | None = None,
    max: float | None = None,
    default_factory: Any = _MISSING,
    help: str | None = None,
) -> Any:
    """A dataclass field whose numeric value (or every element of a sequence) must lie in [min, max]."""
    metadata = {"min": min, "max": max, "help": help}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


class _NotFinite(ConfigError):
    """A NaN or infinite float: reported as such, never as a type mismatch of a union's other members."""


class _DuplicateKey(yaml.YAMLError):
    """A key written twice in one YAML mapping; the message names the dotted key and both lines."""


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key repeated within any mapping: PyYAML keeps the last copy silently, so a
    second `train:` section would replace the first one whole and reset its other keys to their defaults."""

    def construct_document(self, node: yaml.Node) -> Any:
        self._check_duplicates(node, "", set())
        return super().construct_document(node)

    def _check_duplicates(self, node: yaml.Node, prefix: str, visited: set[int]) -> None:
        if id(node) in visited:  # an alias of a node already checked (or of its own parent)
            return
        visited.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._check_duplicates(item, f"{prefix}[{i}]", visited)
        if not isinstance(node, yaml.MappingNode):
            return
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` keys are meant to be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            dotted = f"{prefix}.{key}" if prefix else str(key)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the constructor reports it
                continue
            if first is not None:
                raise _DuplicateKey(f"key '{dotted}' is written twice (lines {first} and {line}); keep one")
            seen[key] = line
            self._check_duplicates(value_node, dotted, visited)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `tp` and return it converted (list -> tuple etc.)."""

    def fail() -> typing.NoReturn:
        raise ConfigError(f"{source}: key '{key}' must be {_type_name(tp)}, got {value!r}")

    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            fail()
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            fail()
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except _NotFinite:
                raise
            except ConfigError as e:
                errors.append(e)
        fail()
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            fail()
        return _from_dict(tp, value, source, prefix=key + ".")
    if tp is bool:
        if not isinstance(value, bool):
            fail()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail()
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail()
        _check_finite(value, key, source)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            fail()
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            fail()
        return Path(value)
    if origin in (tuple, list):
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
            fail()
        items = list(value)
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(items) != len(args):
                raise ConfigError(f"{source}: key '{key}' must have {len(args)} items, got {value!r}")
            converted = [_coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(items, args, strict=True))]
        else:
            elem = args[0] if args else Any
            converted = [_coerce(v, elem, f"{key}[{i}]", source) for i, v in enumerate(items)]
        return tuple(converted) if origin is tuple else converted
    if origin is dict:
        if not isinstance(value, Mapping):
            fail()
        key_tp, val_tp = typing.get_args(tp) or (Any, Any)
        return {_coerce(k, key_tp, key, source): _coerce(v, val_tp, f"{key}.{k}", source) for k, v in value.items()}
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    fail()


def _check_finite(value: Any, key: str, source: str) -> None:
    """NaN compares false with every bound, so range checks pass it; inf is never a meaningful setting."""
    if isinstance(value, float) and not math.isfinite(value):
        raise _NotFinite(f"{source}: key '{key}' must be a finite number, got {value!r}")


def _check_finite_tree(value: Any, key: str, source: str) -> None:
    """Finiteness of a value that did not pass `_coerce` (a default, or a dataclass instance passed in)."""
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_finite_tree(v, f"{key}[{i}]", source)
    elif isinstance(value, Mapping):
        for k, v in value.items():
            _check_finite_tree(v, f"{key}.{k}", source)
    else:
        _check_finite(value, key, source)


def _check_range(value: Any, meta: Mapping[str, Any], key: str, source: str) -> None:
    lo, hi = meta.get("min"), meta.get("max")
    if lo is None and hi is None:
        return
    values = value if isinstance(value, (list, tuple)) else [value]
    for v in values:
        if v is None or not isinstance(v, (int, float)):
            continue
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            span = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
            raise ConfigError(f"{source}: key '{key}' = {value!r} is out of range {span}")


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def _unknown_key_error(cls: type, key: str, prefix: str, source: str) -> ConfigError:
    names = _field_names(cls)
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (valid keys: {', '.join(names)})"
    return ConfigError(f"{source}: unknown key '{prefix}{key}'{hint}")


def _from_dict(cls: type[T], data: Mapping[str, Any], source: str, prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise _unknown_key_error(cls, str(key), prefix, source)
        dotted = prefix + key
        converted = _coerce(value, hints[key], dotted, source)
        _check_range(converted, fields[key].metadata, dotted, source)
        kwargs[key] = converted
    try:
        instance = cls(**kwargs)
    except TypeError as e:  # a required field left out
        raise ConfigError(f"{source}: {prefix or 'config'}: {e}") from None
    return instance


def _validate_tree(cfg: Any, source: str, prefix: str = "") -> None:
    """Check finiteness and ranges of defaults too, then run `validate()` bottom-up on every nested dataclass."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        _check_finite_tree(value, prefix + f.name, source)
        _check_range(value, f.metadata, prefix + f.name, source)
        if dataclasses.is_dataclass(value):
            _validate_tree(value, source, prefix + f.name + ".")
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        except ValueError as e:
            raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'}: {e}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """'a.b=value' -> (['a', 'b'], parsed value). The value is parsed as YAML ('3e-4' -> 0.0003)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.load(raw, Loader=_StrictLoader) if raw.strip() else ""
    except _DuplicateKey as e:
        raise ConfigError(f"override {text!r}: {e}") from None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and _looks_like_float(value):
        value = float(value)  # YAML 1.1 reads '3e-4' as a string
    return key.split("."), value


def _looks_like_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return any(c in text.lower() for c in "e.") and text.strip().lower() not in {"nan", "inf", "-inf"}


def apply_overrides(cls: type, data: dict[str, Any], overrides: Iterable[str], source: str) -> dict[str, Any]:
    """Write each dotted override into the raw mapping, checking the path against the dataclass tree."""
    data = _deep_copy(data)
    for text in overrides:
        path, value = parse_override(text)
        node, node_cls, prefix = data, cls, ""
        for i, part in enumerate(path):
            names = {f.name for f in dataclasses.fields(node_cls) if f.init}
            if part not in names:
                raise _unknown_key_error(node_cls, part, prefix, f"override {text!r}")
            if i == len(path) - 1:
                node[part] = value
                break
            sub_cls = typing.get_type_hints(node_cls)[part]
            if not dataclasses.is_dataclass(sub_cls):
                raise ConfigError(f"override {text!r}: '{prefix}{part}' is not a section")
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: '{prefix}{part}' is not a mapping in {source}")
            node_cls, prefix = sub_cls, prefix + part + "."
    return data


def _deep_copy(data: Any) -> Any:
    if isinstance(data, Mapping):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def config_from_dict(
    cls: type[T], data: Mapping[str, Any] | None = None, overrides: Iterable[str] = (), source: str = "config"
) -> T:
    """Build and validate a config from a mapping plus dotted overrides."""
    raw = apply_overrides(cls, dict(data or {}), overrides, source)
    cfg = _from_dict(cls, raw, source)
    _validate_tree(cfg, source)
    return cfg


def load_config(cls: type[T], path: str | Path | None = None, overrides: Iterable[str] = ()) -> T:
    """Read `path` (YAML; None for the dataclass defaults), apply overrides, validate.

    Raises:
        ConfigError: unknown key, wrong type, out-of-range or non-finite value, failed cross-field check, a key
            written twice, a file that is not UTF-8; the message names the file and the dotted key.
    """
    data: dict[str, Any] = {}
    source = "config"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found: pass an existing YAML file (see configs/)")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"{source}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                "save the config as UTF-8"
            ) from None
        try:
            loaded = yaml.load(text, Loader=_StrictLoader)
        except _DuplicateKey as e:
            raise ConfigError(f"{source}: {e}") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{source}:{where} is not valid YAML: {getattr(e, 'problem', e)}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"{source}: top level must be a mapping of keys, got {type(loaded).__name__}")
        data = dict(loaded)
    return config_from_dict(cls, data, overrides, source)


def config_to_dict(cfg: Any) -> Any:
    """A plain YAML/JSON-safe tree of the config (tuples become lists, paths strings)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: config_to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


def dump_config(cfg: Any) -> str:
    """The resolved config as YAML text (saved next to checkpoints and results)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
