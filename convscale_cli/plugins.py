"""Loading plugins from the ``convscale`` entry-point group and building the registry from their hooks.

Built-in plugins are entry points of the ``convscale`` distribution itself, so they go through exactly the code path a
third-party package does. A plugin that fails to import or to register is skipped with a warning and reported by
``convscale plugins`` (strict mode turns that into an error); the rest of the CLI keeps working.

Environment:
    CONVSCALE_PLUGINS: comma-separated allowlist of third-party plugin names; unset = all installed plugins,
        empty = built-ins only (for reproducible runs).
    CONVSCALE_STRICT_PLUGINS: ``1`` makes a plugin failure an error instead of a warning.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pluggy

from convscale_cli import hookspecs
from convscale_cli.errors import DuplicateRegistrationError, PluginError
from convscale_cli.registry import Registry

ENTRY_POINT_GROUP = "convscale"
BUILTIN_DISTRIBUTION = "convscale"
ALLOWLIST_ENV = "CONVSCALE_PLUGINS"
STRICT_ENV = "CONVSCALE_STRICT_PLUGINS"

# hook name -> (registry table attribute)
_HOOKS = {"register_architectures": "architectures", "register_datasets": "datasets"}


class PluginWarning(UserWarning):
    """A plugin was skipped because it failed to load or register."""


@dataclasses.dataclass
class PluginRecord:
    """What ``convscale plugins`` reports about one plugin."""

    name: str
    version: str
    source: str  # "built-in" or "entry point (<distribution>)" or "registered in code"
    hooks: list[str] = dataclasses.field(default_factory=list)
    registered: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    error: str | None = None

    @property
    def builtin(self) -> bool:
        return self.source == "built-in"


@dataclasses.dataclass
class Plugins:
    """The loaded plugin manager, one record per plugin, and the registry built from them."""

    manager: pluggy.PluginManager
    records: list[PluginRecord]
    registry: Registry


def _strict_default() -> bool:
    return os.environ.get(STRICT_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def _allowlist() -> set[str] | None:
    raw = os.environ.get(ALLOWLIST_ENV)
    if raw is None:
        return None
    return {name.strip() for name in raw.split(",") if name.strip()}


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _fail(record: PluginRecord, what: str, exc: BaseException, strict: bool) -> None:
    record.error = f"{what}: {_describe(exc)}"
    message = f"plugin {record.name!r} skipped ({record.error})"
    if strict:
        raise PluginError(message) from exc
    warnings.warn(message, PluginWarning, stacklevel=3)


def _entry_points() -> Iterable[importlib.metadata.EntryPoint]:
    return importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)


def load_plugins(
    extra: Sequence[tuple[str, Any]] = (),
    *,
    strict: bool | None = None,
    entry_points: Callable[[], Iterable[importlib.metadata.EntryPoint]] = _entry_points,
) -> Plugins:
    """Import every allowed plugin, call its hooks and return the populated registry.

    Args:
        extra: ``(name, plugin)`` pairs registered in code in addition to the entry points (tests, notebooks).
        strict: raise :class:`PluginError` on the first failing plugin instead of warning; default from
            ``CONVSCALE_STRICT_PLUGINS``.
        entry_points: where entry points come from (injectable for tests).

    Raises:
        DuplicateRegistrationError: two plugins registered the same name (always an error: which one is meant
            cannot be guessed).
    """
    strict = _strict_default() if strict is None else strict
    allow = _allowlist()
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    records: list[PluginRecord] = []

    seen: set[str] = set()
    found = [(ep, *_dist_info(ep)) for ep in _entry_points_safe(entry_points)]
    for ep, dist, version in sorted(found, key=lambda item: (item[1] != BUILTIN_DISTRIBUTION, item[0].name)):
        if ep.name in seen:  # the same distribution found twice on sys.path
            continue
        seen.add(ep.name)
        builtin = dist == BUILTIN_DISTRIBUTION
        if not builtin and allow is not None and ep.name not in allow:
            continue
        record = PluginRecord(
            name=ep.name,
            version=version,
            source="built-in" if builtin else f"entry point ({dist})",
        )
        records.append(record)
        try:
            module = ep.load()
            manager.register(module, name=ep.name)
        except Exception as exc:  # a broken plugin must not take the CLI down
            _fail(record, "import failed", exc, strict)
    for name, plugin in extra:
        record = PluginRecord(name=name, version=str(getattr(plugin, "__version__", "")), source="registered in code")
        records.append(record)
        try:
            manager.register(plugin, name=name)
        except Exception as exc:
            _fail(record, "registration failed", exc, strict)

    registry = Registry()
    by_name = {r.name: r for r in records}
    for hook_name, table_name in _HOOKS.items():
        table = getattr(registry, table_name)
        # One plugin at a time, so a failure is attributed to its plugin and leaves no partial registrations.
        for impl in getattr(manager.hook, hook_name).get_hookimpls():  # registration order
            record = by_name[impl.plugin_name]
            record.hooks.append(hook_name)
            specs: list[Any] = []
            try:
                impl.function(register=specs.append)
            except Exception as exc:
                _fail(record, f"{hook_name} raised", exc, strict)
                continue
            for spec in specs:
                table.add(spec, owner=impl.plugin_name)  # DuplicateRegistrationError propagates
            record.registered[table_name] = [spec.name for spec in specs]
    return Plugins(manager=manager, records=records, registry=registry)


def _entry_points_safe(
    source: Callable[[], Iterable[importlib.metadata.EntryPoint]],
) -> list[importlib.metadata.EntryPoint]:
    return list(source())


def _dist_info(ep: importlib.metadata.EntryPoint) -> tuple[str, str]:
    """Normalised name and version of the distribution publishing ``ep`` ("" for both when unknown)."""
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "", ""
    # `Distribution.metadata` parses METADATA (with the long description) on every access: read it once per plugin.
    metadata = dist.metadata
    return (metadata["Name"] or "").lower().replace("_", "-"), metadata["Version"] or ""


_CACHE: Plugins | None = None


def get_plugins() -> Plugins:
    """The process-wide plugins, loaded on first use."""
    global _CACHE
    if _CACHE is None:
        _CACHE = load_plugins()
    return _CACHE


def get_registry() -> Registry:
    """The process-wide registry of architectures and datasets."""
    return get_plugins().registry


def reset() -> None:
    """Forget the loaded plugins (tests; after installing a plugin in the same process)."""
    global _CACHE
    _CACHE = None


__all__ = [
    "DuplicateRegistrationError",
    "PluginRecord",
    "PluginWarning",
    "Plugins",
    "get_plugins",
    "get_registry",
    "load_plugins",
    "reset",
]
