"""Typed stage configs: defaults in dataclasses, values from YAML, overrides from the command line.

Every stage owns one ``@dataclass(kw_only=True)`` whose fields carry their help text in
``field(metadata={"help": ...})``; that dataclass is the single place a default is written.
:func:`parse_config` builds the argparse parser from it, so a new field is a new flag.

Precedence: dataclass default < YAML file (``--config``) < command-line flag.
A YAML file may be flat (``max_new_tokens: 64``) or hold one section per stage
(``regenerate: {max_new_tokens: 64}``); ``run_pipeline.py`` uses the sectioned form.
Unknown keys and values of the wrong type fail before any work starts, naming the file and key.

A config may group its fields in sections: a field whose type is itself such a dataclass
(``optimizer: OptimizerOptions = section(OptimizerOptions, "...")``). The leaf names stay unique
across sections, so flags stay flat (``--lr``) and a YAML file may give a leaf either flat
(``lr: 0.001``, as before sections existed) or in its section (``optimizer: {lr: 0.001}``), not
both. :func:`leaf_values` is the flat view; :func:`config_hash` hashes it, so grouping fields
into sections does not change a config's identity.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from pipeline.core.dtypes import AUTO, DTYPES, DtypeError, long_name, parse_dtype

C = TypeVar("C")


class ConfigError(ValueError):
    """A config value or file is wrong; the message names where and why."""


def opt(default: Any, help: str, **extra: Any) -> Any:
    """A documented config field: ``max_new_tokens: int = opt(512, "tokens generated per turn")``."""
    meta = {"help": help, **extra}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def section(cls: type, help: str) -> Any:
    """A field holding a section of options (a dataclass whose fields all have defaults)."""
    return dataclasses.field(default_factory=cls, metadata={"help": help, "section": True})


def _is_section(f: dataclasses.Field) -> bool:
    return bool(f.metadata.get("section"))


def leaf_fields(cls: type) -> dict[str, tuple[str | None, dataclasses.Field]]:
    """Leaf name -> (its section or None, its field), over all sections of ``cls``."""
    out: dict[str, tuple[str | None, dataclasses.Field]] = {}
    for f in _fields(cls).values():
        items = ([(name, (f.name, leaf)) for name, (_, leaf) in leaf_fields(f.type).items()] if _is_section(f)
                 else [(f.name, (None, f))])
        for name, where in items:
            if name in out:
                raise TypeError(f"{cls.__name__}: option {name!r} is in two sections")
            out[name] = where
    return out


def leaf_values(cfg: Any) -> dict[str, Any]:
    """The flat view of a (sectioned) config: leaf name -> value."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        out.update(leaf_values(value) if f.metadata.get("section") else {f.name: value})
    return out


def flat_options(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """A stored config of ``cls`` (``to_dict`` of it, or a flat one of a release before its sections)
    as leaf name -> value, each in today's form where a field reads its own spellings (a JSON string
    of a mapping); otherwise unchecked: old files may hold options that no longer exist."""
    sections = {name for name, f in _fields(cls).items() if _is_section(f)}
    leaves = leaf_fields(cls)
    out: dict[str, Any] = {}
    for key, value in values.items():
        out.update(value if key in sections and isinstance(value, dict) else {key: value})
    for key, value in out.items():
        parse = leaves[key][1].metadata.get("parse") if key in leaves else None
        if parse is not None:
            try:
                out[key] = parse(value, key)
            except ValueError:
                pass  # shown as it was stored
    return out


def nest(cls: type, values: dict[str, Any], where: str) -> dict[str, Any]:
    """``values`` (flat leaves, sections, or both) as section -> mapping; unknown keys and a leaf
    given twice fail naming ``where``."""
    leaves = leaf_fields(cls)
    sections = {name for name, f in _fields(cls).items() if _is_section(f)}
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name in sections:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: section {key!r} must be a mapping of option: value")
            items = [(k.replace("-", "_"), v) for k, v in value.items()]
            bad = [k for k, _ in items if leaves.get(k, (None,))[0] != name]
            if bad:
                known = ", ".join(k for k, (s, _) in leaves.items() if s == name)
                raise ConfigError(f"{where}: unknown option {bad[0]!r} in section {key!r} (known options: {known})")
        elif name in leaves:
            items = [(name, value)]
        else:
            known = ", ".join(sorted([*sections, *(k for k, (s, _) in leaves.items() if s is None)]))
            raise ConfigError(f"{where}: unknown option {key!r} (known options and sections: {known}; the flat "
                              "name of any option of a section works too)")
        for leaf, v in items:
            sec = leaves[leaf][0]
            target = out.setdefault(sec, {}) if sec else out
            if leaf in target:
                raise ConfigError(f"{where}: option {leaf!r} is given twice (flat and in section {sec!r})")
            target[leaf] = v
    return out


def dtype_opt(default: str, help: str, allowed: tuple[str, ...] = (*DTYPES, AUTO), hashed_long: bool = False) -> Any:
    """A dtype field in the one spelling of :mod:`pipeline.core.dtypes` (old long spellings are converted
    with a warning when read from YAML or flags). ``hashed_long``: :func:`config_hash` hashes the long
    name, as releases before this spelling did, so their outputs still resume."""
    extra = {"hash": long_name} if hashed_long else {}
    return opt(default, f"{help}; one of {', '.join(allowed)}",
               parse=lambda v, where: parse_dtype(v, where, allowed), **extra)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check and convert one value to the field's declared type."""
    inner, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: null is not allowed here (expected {_type_name(tp)})")
    origin = get_origin(inner)
    if origin is Literal:
        choices = get_args(inner)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}")
        return value
    if origin in (list, tuple):
        (item_tp,) = get_args(inner)[:1] or (Any,)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v != ""]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or inner is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if inner is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if inner is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
        if not as_float.is_integer():
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(as_float)
    if inner is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if inner is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        f.type = hints[f.name]
        out[f.name] = f
    return out


def from_dict(cls: type[C], values: dict[str, Any], where: str) -> C:
    """Build a config from a mapping (flat or sectioned), rejecting unknown keys and wrong types."""
    fields = _fields(cls)
    kwargs: dict[str, Any] = {}
    for name, value in nest(cls, values, where).items():
        f = fields[name]
        if _is_section(f):
            kwargs[name] = from_dict(f.type, value, f"{where}: {name}")
        elif f.metadata.get("parse") is not None:  # a field that reads its own spellings (dtype, JSON)
            try:
                kwargs[name] = f.metadata["parse"](value, f"{where}: {name}")
            except (DtypeError, ValueError) as err:
                raise ConfigError(str(err)) from None
        else:
            kwargs[name] = _coerce(value, f.type, f"{where}: {name}")
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def read_yaml_section(path: str | Path, section: str | None, cls: type | None = None) -> dict[str, Any]:
    """The mapping for ``section`` in a YAML file (the whole file when it is a stage's own file).

    A file without that section is a stage's own file unless it holds mappings that are not
    options of ``cls`` (its sections, mapping-valued options): then it is a pipeline file whose
    other stages are configured and this one takes the defaults."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of option: value")
    if section is not None and section in data:
        sub = data[section]
        if not isinstance(sub, dict):
            raise ConfigError(f"{path}: section {section!r} must be a mapping")
        return sub
    own = set() if cls is None else {*leaf_fields(cls), *_fields(cls)}
    if section is not None and any(isinstance(v, dict) and k.replace("-", "_") not in own for k, v in data.items()):
        return {}  # a sectioned (pipeline) file with nothing for this stage: all defaults
    return data


def _add_field_flag(parser: argparse.ArgumentParser, f: dataclasses.Field) -> None:
    flag = "--" + f.name.replace("_", "-")
    help_text = f.metadata.get("help", "")
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    help_text = f"{help_text} (default: {default!r})" if help_text else f"default: {default!r}"
    inner, _ = _unwrap_optional(f.type)
    # argparse %-formats help strings: a literal % (e.g. "<1%") must be doubled
    kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text.replace("%", "%%")}
    if inner is bool:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        return
    if get_origin(inner) is Literal:
        kwargs["choices"] = list(get_args(inner))
    if get_origin(inner) in (list, tuple) and f.metadata.get("repeatable"):
        kwargs["action"] = "append"
    parser.add_argument(flag, **kwargs)


def build_parser(cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--config", default=None, help="YAML file with option values (flags override it)")
    _add_flags(parser, cls)
    return parser


def _add_flags(parser: Any, cls: type) -> None:
    """One flat flag per leaf; a section's flags under its own heading in ``--help``."""
    for f in _fields(cls).values():
        if _is_section(f):
            _add_flags(parser.add_argument_group(f"{f.name} (YAML section {f.name}:)", f.metadata["help"]), f.type)
        else:
            _add_field_flag(parser, f)


def parse_config(
    cls: type[C], argv: list[str] | None, *, prog: str, description: str, section: str | None = None
) -> C:
    """Parse ``argv`` into ``cls``: defaults, then ``--config`` YAML, then flags."""
    parser = build_parser(cls, prog, description)
    args = vars(parser.parse_args(argv))
    config_path = args.pop("config")
    values: dict[str, Any] = {}
    if config_path:
        try:
            values = nest(cls, read_yaml_section(config_path, section, cls), config_path)
        except ConfigError as err:
            parser.error(str(err))
    where = f"{config_path or 'command line'}"
    flags = {}
    fields = {name: f for name, (_, f) in leaf_fields(cls).items()}
    for name, value in args.items():
        # a repeatable list flag arrives as a list of comma-joined strings (unless its items are
        # sentences: ``opt(..., repeatable=True, comma_split=False)``)
        if (isinstance(value, list) and all(isinstance(v, str) for v in value)
                and fields[name].metadata.get("comma_split", True)):
            value = [p for v in value for p in v.split(",") if p]
        flags[name] = value
    for key, value in nest(cls, flags, "command line").items():  # flags win over the file, leaf by leaf
        if isinstance(value, dict) and isinstance(values.get(key), dict):
            values[key] = {**values[key], **value}
        else:
            values[key] = value
    try:
        return from_dict(cls, values, where)
    except ConfigError as err:
        parser.error(str(err))
        raise  # unreachable: parser.error exits


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_hash(cfg: Any, exclude: tuple[str, ...] = ()) -> str:
    """Stable short hash of the options that decide a stage's output: of the flat leaves, so that
    moving options into sections keeps it; a leaf may say how it hashes (``metadata["hash"]``)."""
    hashers = {f.name: f.metadata.get("hash") for _, f in leaf_fields(type(cfg)).values()}
    values = {k: (hashers[k](v) if hashers.get(k) else v) for k, v in leaf_values(cfg).items() if k not in exclude}
    blob = json.dumps(values, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def require(cond: bool, message: str) -> None:
    """Validation helper for ``__post_init__``: raise a ConfigError with ``message`` unless ``cond``."""
    if not cond:
        raise ConfigError(message)
