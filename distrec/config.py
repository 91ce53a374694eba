"""One config system for every stage: typed dataclasses, YAML files, `key=value` overrides.

    cfg = load_config(PrepareConfig, "configs/prepare/ml-1m.yaml", ["split.mode=time"])
    save_config(cfg, out_dir / "config.yaml")

Unknown keys are rejected with the nearest valid name, values are checked against the
field's type (with the dotted path in the message), and every stage writes the resolved
config beside its outputs. Written by hand rather than with OmegaConf/Hydra to keep one
small dependency-free path whose error messages we control.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from distrec.atomic import write_atomic


class ConfigError(ValueError):
    """A config file or override that does not match its schema."""


def doc(text: str, **kwargs):
    """A dataclass field with its help text (shown by `--help-config`)."""
    return dataclasses.field(metadata={"help": text}, **kwargs)


def nearest(name: str, choices: list[str]) -> str:
    """"; did you mean 'x'?" for the closest of `choices`, or nothing."""
    match = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else ""



def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        return f"list of {_type_name(get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, path: str) -> Any:
    """Check `value` against type `tp`; return it converted (int -> float, list -> nested)."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path + ".")
    if origin in (Union, types.UnionType):
        errors = []
        for arg in get_args(tp):
            try:
                return _coerce(arg, value, path)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if isinstance(value, bool) and not value and "no" in get_args(tp):
            return "no"  # YAML reads a bare `no` as false
        if value in get_args(tp) and not isinstance(value, bool):
            return value
        raise ConfigError(
            f"{path}: expected one of {_type_name(tp)}, got {value!r}"
            + nearest(str(value), [str(a) for a in get_args(tp)])
        )
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
        (item_tp,) = get_args(tp)
        return [_coerce(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is type(None):
        if value is None:
            return None
    elif tp is bool:
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
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # `columns.user=1` on a command line means the name "1"
    elif tp is Any:
        return value
    raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and mistyped values."""
    where = prefix.rstrip(".") or "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            raise ConfigError(
                f"unknown key '{prefix}{key}'{nearest(str(key), list(fields))} "
                f"(valid keys under {where}: {', '.join(fields)})"
            )
    kwargs = {name: _coerce(hints[name], data[name], prefix + name) for name in data}
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        if isinstance(e, ConfigError):
            raise
        text = str(e)
        # the checks name their keys ("split.seed must be >= 0"): no second "split: " before them
        named = prefix and text.startswith((where + ".", where + ":", where + " "))
        raise ConfigError(text if named else f"{where}: {text}") from None


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'split.mode=time' -> (['split', 'mode'], 'time'); the value is read as YAML, so
    `a=3`, `a=null`, `a=[x, y]` and `a=true` get their natural types."""
    if "=" not in text:
        raise ConfigError(f"{text}: an override must look like key=value (for example split.mode=time)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"{text}: empty key (an override looks like key=value)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and raw.strip()[:1] in ("|", ">"):
        value = raw  # a YAML block-scalar sign: on a command line it is the character itself
    return key.split("."), value


def merge(base: dict, update: dict) -> dict:
    """Deep-merge `update` into a copy of `base` (mappings merge, everything else replaces)."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid UTF-8 YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def _with_overrides(data: dict, overrides) -> dict:
    for keys, value in overrides:
        nested: Any = value
        for key in reversed(keys):
            nested = {key: nested}
        data = merge(data, nested)
    return data


def _error(cls: type, data: dict) -> str | None:
    try:
        from_dict(cls, data)
    except ConfigError as e:
        return str(e)
    return None


def load_config(
    cls: type,
    path: str | Path | None = None,
    overrides: list[str] = (),
    base: dict | None = None,
) -> Any:
    """Defaults of `cls` <- `base` (e.g. from CLI flags) <- YAML file <- `key=value` overrides.

    A bad value is blamed on where it came from: `FILE.yaml: ...` for the file, `command line:
    key=value: ...` for the first override that brings the error in."""
    flags: dict = dict(base or {})
    data = merge(flags, read_yaml(path)) if path is not None else flags
    parsed = []
    for text in overrides:
        try:
            parsed.append(parse_override(text))
        except ConfigError as e:
            raise ConfigError(f"command line: {e}") from None
    try:
        return from_dict(cls, _with_overrides(data, parsed))
    except ConfigError as e:
        message = str(e)
    # blame the first source after which the final error appears: the defaults (a key nobody
    # set), the flags, the file, or one override
    stages = [("", {}), ("command line: ", flags)] + ([(f"{path}: ", data)] if path is not None else [])
    stages += [(f"command line: {text}: ", _with_overrides(data, parsed[:n + 1])) for n, text in enumerate(overrides)]
    blame = next((where for where, stage in stages if _error(cls, stage) == message), "")
    raise ConfigError(f"{blame}{message}") from None


def save_config(cfg: Any, path: str | Path) -> None:
    write_atomic(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))


def help_text(cls: type, prefix: str = "") -> list[str]:
    """One line per key: `dotted.key (type, default): help`, for `distrec <verb> --help-config`."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines += help_text(tp, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        lines.append(f"{prefix}{f.name} ({_type_name(tp)}; default {default!r}): {f.metadata.get('help', '')}")
    return lines
