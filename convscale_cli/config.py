"""Typed run configs: frozen dataclasses filled from TOML files and ``key=value`` overrides.

Unknown keys and wrong types are rejected with the key named and close matches suggested (nanoGPT's configurator,
without ``exec``). The resolved config, as a plain dict, is what every run saves beside its results.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from convscale_cli.errors import ConfigError, did_you_mean

T = TypeVar("T")


MAX_CONFIG_BYTES = 1 << 20  # a run or study config is a few KiB; more is the wrong file (or /dev/zero)


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file; a missing, oversized, malformed or too deeply nested file is a one-line ConfigError.

    Only regular files are read (a FIFO would block, ``/dev/zero`` never ends), at most :data:`MAX_CONFIG_BYTES`; a
    UTF-8 byte-order mark (Windows editors write one) is skipped.
    """
    path = Path(path).expanduser()
    try:
        if path.is_dir():
            raise ConfigError(f"config path {str(path)!r} is a directory, expected a .toml file")
        if not path.exists():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        if not path.is_file():
            raise ConfigError(f"config path {str(path)!r} is not a regular file, expected a .toml file")
        with path.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc.strerror or exc}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {str(path)!r} is over {MAX_CONFIG_BYTES >> 20} MiB: not a run config")
    try:
        return tomllib.loads(raw.decode("utf-8-sig"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"malformed TOML in {str(path)!r}: {exc}") from None
    except RecursionError:
        raise ConfigError(f"config file {str(path)!r} nests tables or arrays too deeply to be a config") from None


def config_table(data: Mapping[str, Any], name: str, path: str | Path, *, default: Any = None) -> dict[str, Any]:
    """The ``[name]`` table of a loaded config file (``default`` when absent; the whole file if that is None).

    Raises:
        ConfigError: ``name`` is present but not a table (``pretrain = 5``).
    """
    if name not in data:
        return dict(data if default is None else default)
    value = data[name]
    if not isinstance(value, Mapping):
        raise ConfigError(f"{name} = {value!r} in {str(path)!r} has the wrong type: expected a table ([{name}])")
    return dict(value)


SEED_LIMIT = 2**32  # seeds feed numpy and Grain, which take unsigned 32-bit values


def check_seed(seed: int, key: str = "seed") -> int:
    """Return ``seed`` if it is an integer in [0, 2**32); raise ConfigError naming the value otherwise."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise ConfigError(f"{key} = {seed!r} must be an integer in [0, 2**32)")
    return seed


def _type_name(tp: Any) -> str:
    """``tp`` in words, without Python's typing syntax: ``float or a table``, ``a list of str``, ``one of 'a', 'b'``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args if a is not type(None))
    if origin in (tuple, list):
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        if origin is tuple and args:
            return f"a list of {len(args)} items ({', '.join(_type_name(a) for a in args)})"
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin in (dict, Mapping) or tp in (dict, Mapping) or dataclasses.is_dataclass(tp):
        return "a table"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp``; convert the lossless cases (int->float, list->tuple)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is typing.Literal:
        if value in args:
            return value
        hint = did_you_mean(str(value), [str(a) for a in args], n=1)
        extra = f"; {hint}" if hint else ""
        raise ConfigError(f"{key} = {value!r} is not one of {', '.join(repr(a) for a in args)}{extra}")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [arg for arg in args if arg is not type(None)]
        if len(options) == 1:  # Optional[X]: X's own message (a Literal's "is not one of ...; did you mean")
            return _coerce(value, options[0], key)
        for arg in options:
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key} = {value!r} has the wrong type: expected {_type_name(tp)}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} = {value!r} has the wrong type: expected {_type_name(tp)}")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            items = [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
        elif origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(f"{key} = {value!r} must have {len(args)} items")
            items = [_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))]
        else:
            items = [_coerce(v, args[0], f"{key}[{i}]") if args else v for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping) or tp in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} = {value!r} has the wrong type: expected a table")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} = {value!r} has the wrong type: expected a table")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{key} = {value!r} has the wrong type: expected {_type_name(tp)}, got {type(value).__name__}")


def from_dict(cls: type[T], data: Mapping[str, Any], *, prefix: str = "", source: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys, wrong types and missing required keys.

    ``source`` (a file name) starts the missing-keys message, which is about the file rather than one value.

    Raises:
        ConfigError: naming the first bad key (with close matches for unknown keys), every missing required key, or
            an invalid value.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            hint = did_you_mean(key, fields, prefix=prefix)
            hint = f"; {hint}" if hint else ""
            raise ConfigError(f"unknown config key {prefix + key!r}{hint}")
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    missing = [
        prefix + name
        for name, f in fields.items()
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        where = f"{source}: " if source else ""
        raise ConfigError(f"{where}missing {'key' if len(missing) == 1 else 'keys'} {', '.join(missing)}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid config{' ' + prefix.rstrip('.') if prefix else ''}: {exc}") from None


# The deepest key a config has is three levels (a study's ``engine.recipe.weight_decay``); the longest a few dozen
# characters. A key past either is a mistake, and a 100k-level one built a 100k-deep table that plugins' own checks
# then failed to print (RecursionError).
MAX_KEY_DEPTH = 8
MAX_KEY_LENGTH = 200


def check_options(what: str, given: Mapping[str, Any], defaults: Mapping[str, Any]) -> None:
    """Check plugin options (a dataset's ``data_options``, a model's ``model_options``) against their defaults.

    A plugin declares its options with their defaults; each given value must have its default's type, as every other
    config key must (``multi_label = "maybe"`` is not a bool, ``clutter = "x"`` not a float). A default of None
    declares no type.

    Args:
        what: the options in words for messages, e.g. ``"shapes data option"``.
        given: the options as given.
        defaults: the declared options and their defaults.

    Raises:
        UnknownNameError: an option the plugin does not declare (close matches suggested).
        ConfigError: a value of another type than its default's.
    """
    from convscale_cli.errors import UnknownNameError

    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise UnknownNameError(what, unknown[0], defaults)
    for key, value in given.items():
        default = defaults[key]
        if default is None:
            continue
        try:
            _coerce(value, type(default), key)
        except ConfigError as exc:
            raise ConfigError(f"{what} {exc}") from None


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``key=value`` (value in TOML syntax, bare words taken as strings) into ``("key", value)``.

    Raises:
        ConfigError: no ``=``; a key of more than :data:`MAX_KEY_DEPTH` dotted levels or :data:`MAX_KEY_LENGTH`
            characters; a value nesting arrays or tables too deeply for the TOML parser.
    """
    if "=" not in text:
        raise ConfigError(f"override {_clip(text)!r} must look like key=value")
    key, raw = (part.strip() for part in text.split("=", 1))
    levels = key.count(".") + 1
    if levels > MAX_KEY_DEPTH:
        raise ConfigError(f"override key {_clip(key)!r} has {levels} levels; at most {MAX_KEY_DEPTH} (a.b.c)")
    if len(key) > MAX_KEY_LENGTH:
        raise ConfigError(f"override key {_clip(key)!r} is {len(key)} characters long; at most {MAX_KEY_LENGTH}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # bare word: a string
    except RecursionError:
        raise ConfigError(f"the value of {key} nests arrays or tables too deeply to be a setting") from None
    return key, value


def parse_overrides(pairs: list[str] | None, prefix: str = "") -> dict[str, Any]:
    """Repeated ``key=value`` options (``--set``, ``--data-option``) as one mapping, each key under ``prefix``.

    Raises:
        ConfigError: a pair :func:`parse_override` refuses.
    """
    out: dict[str, Any] = {}
    for text in pairs or []:
        key, value = parse_override(text)
        out[prefix + key] = value
    return out


def nested_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """Repeated ``key=value`` options as a nested mapping: dotted keys (``data_options.size=4096``) become tables,
    as in a TOML file.

    Raises:
        ConfigError: a pair :func:`parse_override` refuses.
    """
    return merge({}, parse_overrides(pairs))


def _clip(text: str, n: int = 40) -> str:
    """``text`` cut to ``n`` characters for an error message."""
    return text if len(text) <= n else text[:n] + "..."


def option_word(key: str, value: Any) -> str:
    """``key=value`` as one shell word that :func:`parse_override` (``--data-option``, ``--set``) reads back as
    ``value``: TOML syntax, bare words for strings, quotes where a string would read as a number or a boolean."""
    import json
    import shlex

    text = json.dumps(value) if isinstance(value, (bool, int, float)) else str(value)
    if parse_override(f"{key}={text}")[1] != value:
        text = json.dumps(str(value))
    return shlex.quote(f"{key}={text}")


def merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Overlay ``overrides`` (dotted keys allowed: ``recipe.lr``) onto a nested mapping."""
    out: dict[str, Any] = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in base.items()}
    for key, value in overrides.items():
        node = out
        *parents, leaf = key.split(".")
        for parent in parents:
            child = node.get(parent)
            node[parent] = child = dict(child) if isinstance(child, Mapping) else {}
            node = child
        node[leaf] = value
    return out


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    section: str | None = None,
) -> T:
    """Resolve a config: TOML file (optionally one ``[section]`` of it), then overrides on top."""
    data: dict[str, Any] = {}
    if path is not None:
        data = load_toml(path)
        if section is not None:
            data = config_table(data, section, path, default={})
    source = "" if path is None else str(path) + (f" [{section}]" if section else "")
    return from_dict(cls, merge(data, overrides or {}), source=source)


DURATION_KEYS = ("epochs", "steps", "examples")


def command_config(
    cls: type[T],
    section: str,
    path: str | Path | None,
    flags: Mapping[str, Any],
    *,
    data_options: list[str] | None = None,
    sets: list[str] | None = None,
) -> T:
    """A run config as a command builds it: the TOML file at ``path`` (its ``[section]`` table, or the whole file),
    then ``flags`` (those not None; a duration among them replaces the file's, one duration per run), then the
    ``key=value`` pairs of ``data_options`` (under ``data_options.``) and of ``sets``.

    Raises:
        ConfigError: an unreadable file, a bad pair, an unknown key or a value of the wrong type.
    """
    overrides = {k: v for k, v in flags.items() if v is not None}
    data: dict[str, Any] = {}
    if path is not None:
        data = config_table(load_toml(path), section, path)
    if any(k in overrides for k in DURATION_KEYS):
        for key in DURATION_KEYS:
            data.pop(key, None)
    overrides.update(parse_overrides(data_options, prefix="data_options."))
    overrides.update(parse_overrides(sets))
    return from_dict(cls, merge(data, overrides))


def to_dict(config: Any) -> dict[str, Any]:
    """The resolved config as plain data (tuples become lists), ready for JSON."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, Mapping):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(config)


def diff(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two resolved configs (to refuse reusing a run dir)."""
    keys = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            keys += diff(va, vb, prefix=f"{prefix}{key}.")
        elif va != vb:
            keys.append(prefix + key)
    return keys
