"""Typed YAML configs with command-line overrides.

Every phase script declares one dataclass; each field carries ``metadata={"help": ...}`` and may
carry ``metadata={"choices": [...]}`` or a ``check`` (a predicate plus the sentence that describes
what it accepts). :func:`load_config` reads a YAML file onto that dataclass, applies command-line
overrides, and refuses an unknown key, a wrong type or a bad value with one line that names the
file, the key and what is allowed.

Example::

    @dataclass
    class Cfg:
        lr: float = field(default=1e-4, metadata={"help": "Learning rate.", "check": (positive, "> 0")})

    cfg = load_config(Cfg, "configs/cpu/sft.yaml", ["--lr", "3e-4"])
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, Sequence, TypeVar

import yaml

T = TypeVar("T")


class UserError(Exception):
    """An error caused by the user's input: printed as one line, without a traceback."""


class ConfigError(UserError):
    """A config file or flag that does not fit the config's dataclass."""


# ----------------------------------------------------------------------------- checks used by fields
def positive(x) -> bool:
    return x is not None and x > 0


def non_negative(x) -> bool:
    return x is not None and x >= 0


def fraction(x) -> bool:
    return x is not None and 0.0 <= x < 1.0


def probability(x) -> bool:
    return x is not None and 0.0 <= x <= 1.0


def fld(default: Any = dataclasses.MISSING, help: str = "", *, choices: Sequence | None = None,
        check: tuple[Callable[[Any], bool], str] | None = None, default_factory: Any = dataclasses.MISSING,
        const: Any = None):
    """A dataclass field with help text and an optional value check.

    ``check`` is ``(predicate, description)``; the description finishes the sentence
    "expected ...", e.g. ``(positive, "a number > 0")``. ``const`` is the value the flag takes when
    given without one (``--resume`` alone meaning ``--resume auto``).
    """
    meta = {"help": help}
    if const is not None:
        meta["const"] = const
    if choices is not None:
        meta["choices"] = list(choices)
    if check is not None:
        meta["check"] = check
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# ----------------------------------------------------------------------------- type coercion
def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(tp) or (Any,)
        return f"a list of {_type_name(inner)}"
    if origin is dict:
        k, v = typing.get_args(tp) or (Any, Any)
        return f"a mapping of {_type_name(k)} to {_type_name(v)}"
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a finite number", str: "a string", bool: "true or false"}.get(tp, str(tp))


class _Mismatch(Exception):
    pass


def _coerce(value, tp):
    """Return ``value`` as type ``tp`` or raise _Mismatch. Strings from the command line are parsed
    as YAML scalars first, so ``--lr 3e-4`` and ``--lr: 3e-4`` in a file mean the same."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise _Mismatch
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):  # on the command line: comma-separated, or YAML's [a, b] as in the file
            if value.strip().startswith("["):
                try:
                    value = yaml.safe_load(value)
                except yaml.YAMLError as e:
                    raise _Mismatch from e
            else:
                value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise _Mismatch
        return [_coerce(v, inner) for v in value]
    if origin is dict:
        k, v = typing.get_args(tp) or (Any, Any)
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError as e:
                raise _Mismatch from e
        if not isinstance(value, dict):
            raise _Mismatch
        return {_coerce(kk, k): _coerce(vv, v) for kk, vv in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise _Mismatch
    if tp is int:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError as e:
                raise _Mismatch from e
        raise _Mismatch
    if tp is float:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError as e:
                raise _Mismatch from e
        # nan and inf (.nan, .inf in YAML) pass every `> 0` check yet break training in silence
        if isinstance(value, (int, float)) and math.isfinite(value):
            return float(value)
        raise _Mismatch
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise _Mismatch
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise _Mismatch


def _fields(cls) -> dict[str, dataclasses.Field]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        f.type = hints[f.name]
        out[f.name] = f
    return out


def _describe(f: dataclasses.Field) -> str:
    if "choices" in f.metadata:
        return "one of " + ", ".join(str(c) for c in f.metadata["choices"])
    if "check" in f.metadata:
        return f.metadata["check"][1]
    return _type_name(f.type)


def _set(cfg: dict, f: dataclasses.Field, raw, where: str) -> None:
    try:
        value = _coerce(raw, f.type)
    except _Mismatch:
        raise ConfigError(f"{where}: key '{f.name}' = {raw!r}: expected {_describe(f)}") from None
    if "choices" in f.metadata and value is not None:
        bad = [v for v in (value if isinstance(value, list) else [value]) if v not in f.metadata["choices"]]
        if bad:
            raise ConfigError(f"{where}: key '{f.name}' = {bad[0]!r}: expected one of "
                              + ", ".join(str(c) for c in f.metadata["choices"]))
    if "check" in f.metadata and value is not None:
        pred, desc = f.metadata["check"]
        if not pred(value):
            raise ConfigError(f"{where}: key '{f.name}' = {value!r}: expected {desc}")
    cfg[f.name] = value


def _unknown(key: str, fields: dict, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(fields), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"{where}: unknown key '{key}'{hint}; valid keys: {', '.join(sorted(fields))}")


def build_parser(cls, description: str | None = None, prog: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with ``--config`` and one ``--flag`` per dataclass field (dashes or underscores)."""
    p = argparse.ArgumentParser(description=description, prog=prog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML recipe to read (flags below override its keys)")
    for name, f in _fields(cls).items():
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        help_text = f"{f.metadata.get('help', '')} [{_describe(f)}; default: {json.dumps(default)}]"
        flags = [f"--{name.replace('_', '-')}"] + ([f"--{name}"] if "_" in name else [])
        if f.type is bool:
            # --flag / --no-flag as well as --flag true|false
            p.add_argument(*flags, dest=name, nargs="?", const="true", default=None,
                           help=help_text.replace("%", "%%"), metavar="BOOL")
            p.add_argument(f"--no-{name.replace('_', '-')}", dest=name, action="store_const",
                           const="false", help=argparse.SUPPRESS)
        elif "const" in f.metadata:
            p.add_argument(*flags, dest=name, nargs="?", const=f.metadata["const"], default=None,
                           help=help_text.replace("%", "%%"), metavar="VALUE")
        else:
            p.add_argument(*flags, dest=name, default=None, help=help_text.replace("%", "%%"), metavar="VALUE")
    return p


def load_config(cls: type[T], path: str | Path | None = None, overrides: dict | None = None) -> T:
    """Build ``cls`` from a YAML file, then apply ``overrides`` (flag values, already keyed by field)."""
    fields = _fields(cls)
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        where = str(path)
        if not path.is_file():
            raise ConfigError(f"{where}: config file not found")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{where}: not valid YAML{at}: {getattr(e, 'problem', e)}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{where}: not UTF-8 text") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a mapping of keys to values at the top level, "
                              f"found {type(data).__name__}")
        for key, raw in data.items():
            if key not in fields:
                raise _unknown(str(key), fields, where)
            _set(values, fields[key], raw, where)
    for key, raw in (overrides or {}).items():
        if raw is None:
            continue
        if key not in fields:
            raise _unknown(key, fields, "command line")
        _set(values, fields[key], raw, f"command line --{key.replace('_', '-')}")
    missing = [n for n, f in fields.items() if n not in values and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{path or 'command line'}: missing required key '{missing[0]}' "
                          f"({fields[missing[0]].metadata.get('help', '')})")
    try:
        cfg = cls(**values)
    except (ValueError, TypeError) as e:  # cross-field checks in __post_init__
        raise ConfigError(f"{path or 'command line'}: {e}") from None
    return cfg


def parse_args(cls: type[T], argv: Sequence[str] | None = None, description: str | None = None,
               prog: str | None = None) -> T:
    """Parse ``--config FILE`` plus field flags into a config instance."""
    parser = build_parser(cls, description, prog)
    ns = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(ns).items() if k != "config"}
    return load_config(cls, ns.config, overrides)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg, path: str | Path) -> None:
    """Write the resolved config next to a run's outputs, so the run can be reproduced."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True), encoding="utf-8")
