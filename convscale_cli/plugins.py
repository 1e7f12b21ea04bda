"""Loading plugins from the ``convscale`` entry-point group and building the registry from their hooks.

Built-in plugins are entry points of the ``convscale`` distribution itself, so they go through exactly the code path a
third-party package does. A plugin that fails to import or to register (its import or a hook raises, even
``SystemExit``; it registers something that is not a spec) is skipped whole with a warning and reported by
``convscale plugins``. A spec is left out alone when another plugin registered its name first, when it breaks the
contract of docs/plugins.md (:mod:`convscale_cli.spec_checks`: a ``build`` that does not accept the documented keyword
arguments, an incomplete dataset spec), or (third-party plugins) when its ``count`` fails or is not positive and finite
at its default resolution. A name in ``CONVSCALE_PLUGINS`` that no installed plugin provides is reported the same way.
Strict mode turns each of these into an error; otherwise the rest of the CLI keeps working.

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
from convscale_cli.errors import ConvscaleError, DuplicateRegistrationError, PluginError, did_you_mean
from convscale_cli.registry import ArchitectureSpec, DatasetSpec, ModelCount, Registry, TrackerSpec
from convscale_cli.spec_checks import architecture_problem, count_problem, dataset_problem

ENTRY_POINT_GROUP = "convscale"
BUILTIN_DISTRIBUTION = "convscale"
ALLOWLIST_ENV = "CONVSCALE_PLUGINS"
STRICT_ENV = "CONVSCALE_STRICT_PLUGINS"

# hook name -> (registry table attribute, the spec type its ``register`` accepts)
_HOOKS: dict[str, tuple[str, type]] = {
    "register_architectures": ("architectures", ArchitectureSpec),
    "register_datasets": ("datasets", DatasetSpec),
    "register_trackers": ("trackers", TrackerSpec),
}
# What a plugin's import, hooks or callables may raise that must not take the CLI down: a module calling sys.exit()
# at import included. KeyboardInterrupt (and GeneratorExit) still propagate.
_PLUGIN_FAILURES = (Exception, SystemExit)


class PluginWarning(UserWarning):
    """A plugin (or one of its models) was skipped because it failed to load or register."""


class ModelCountError(PluginError):
    """A plugin's ``ArchitectureSpec.count`` raised; names the model, the plugin and the call."""

    def __init__(self, plugin: str, model: str, reason: str) -> None:
        self.plugin, self.model, self.reason = plugin, model, reason
        super().__init__(f"plugin {plugin!r}: model {model!r} {reason}")


@dataclasses.dataclass(frozen=True)
class _CheckedCount:
    """A plugin's ``count`` whose unexpected exceptions become :class:`ModelCountError` (a one-line error, exit 2)."""

    count: Callable[[int, int], ModelCount]
    plugin: str
    model: str

    def __call__(self, resolution: int, num_classes: int) -> ModelCount:
        call = f"count({resolution}, {num_classes})"
        try:
            result = self.count(resolution, num_classes)
        except ConvscaleError:
            raise  # already a one-line error on purpose (e.g. a resolution the model refuses)
        except _PLUGIN_FAILURES as exc:
            raise ModelCountError(self.plugin, self.model, f"{call} raised {_describe(exc)}") from exc
        problem = count_problem(result)
        if problem:  # zero MACs divide by zero in the planner; negative ones plan negative costs
            raise ModelCountError(self.plugin, self.model, f"{call} {problem}")
        return result


class ModelBuildError(PluginError):
    """A third-party plugin's ``ArchitectureSpec.build`` raised something other than a convscale error."""

    def __init__(self, plugin: str, model: str, reason: str) -> None:
        self.plugin, self.model, self.reason = plugin, model, reason
        super().__init__(f"plugin {plugin!r}: model {model!r} failed to build: {reason}")


@dataclasses.dataclass(frozen=True)
class _CheckedBuild:
    """A third-party ``build`` whose unexpected exceptions become :class:`ModelBuildError` (one line, exit 2).

    Every command that makes a model (pretrain, sweep, tune-lr, finetune, eval, export, import-weights) calls
    ``spec.build``, so the plugin's bug is named once here instead of in each caller.
    """

    build: Callable[..., Any]
    plugin: str
    model: str

    def __call__(self, **kwargs: Any) -> Any:
        try:
            module = self.build(**kwargs)
        except ConvscaleError:
            raise  # the plugin's own one-line error (an option it refuses, say)
        except _PLUGIN_FAILURES as exc:
            raise ModelBuildError(self.plugin, self.model, _describe(exc)) from exc
        return _checked_module(module, self.plugin, self.model)


class ModelRunError(PluginError):
    """A third-party model's ``init`` or ``apply`` raised something other than a convscale error."""

    def __init__(self, plugin: str, model: str, method: str, reason: str) -> None:
        self.plugin, self.model, self.method, self.reason = plugin, model, method, reason
        super().__init__(f"plugin {plugin!r}: model {model!r} failed in {method}: {reason}")


def _checked_module(module: Any, plugin: str, model: str) -> Any:
    """``module`` as an instance of a subclass whose ``init`` and ``apply`` turn the plugin's exceptions into
    :class:`ModelRunError`.

    A model's own bugs surface only when it is traced (in ``init``, in the training or evaluation step), far from
    ``build``; every caller (the engine, fine-tuning, ``load_model``, ``import-weights``) goes through these two
    methods. Parameter names are unchanged: a Flax module's class does not appear in its parameter tree. Anything
    that is not a Flax module is returned as it is.
    """
    import flax.linen as nn

    if not isinstance(module, nn.Module) or getattr(module, "_convscale_checked", False):
        return module
    base = type(module)
    # One checked subclass per class, plugin and model, kept on the class (and freed with it), so that two builds of
    # one model stay equal: the compiled-program cache keys on the module, and Flax modules compare by class.
    made = base.__dict__.get("_convscale_checked_classes")
    if made is None:
        made = {}
        type.__setattr__(base, "_convscale_checked_classes", made)
    checked = made.get((plugin, model))
    if checked is None:

        def run(method: str) -> Callable[..., Any]:
            def call(self: Any, *args: Any, **kwargs: Any) -> Any:
                try:
                    return getattr(base, method)(self, *args, **kwargs)
                except ConvscaleError:
                    raise
                except Exception as exc:
                    if type(exc).__name__ in _RUNTIME_ERRORS:
                        raise  # the device failed (out of memory, say), not the plugin's code
                    raise ModelRunError(plugin, model, method, _describe(exc)) from exc

            call.__name__ = call.__qualname__ = method
            return call

        namespace = {
            "__module__": base.__module__,
            "__qualname__": base.__qualname__,
            "_convscale_checked": True,
            "init": run("init"),
            "apply": run("apply"),
        }
        checked = made[(plugin, model)] = type(base.__name__, (base,), namespace)
    fields = {f.name: getattr(module, f.name) for f in dataclasses.fields(module) if f.init}
    return checked(**fields)


# Errors raised while a compiled program runs on the device, which no plugin code causes.
_RUNTIME_ERRORS = frozenset({"XlaRuntimeError", "JaxRuntimeError"})


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


def strict_mode() -> bool:
    """Whether plugin failures are errors (``--strict`` or ``CONVSCALE_STRICT_PLUGINS=1``)."""
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
    """The whole plugin failed: record it, then raise (strict) or warn that it is skipped."""
    record.error = f"{what}: {_describe(exc)}"
    if strict:
        raise PluginError(f"plugin {record.name!r} failed to load ({record.error})") from exc
    warnings.warn(f"plugin {record.name!r} skipped ({record.error})", PluginWarning, stacklevel=3)


def _fail_model(
    record: PluginRecord, kind: str, name: str, reason: str, strict: bool, error: type[PluginError] = PluginError
) -> None:
    """One spec of the plugin failed: record it, then raise (strict) or warn that this spec is left out."""
    what = f"{kind} {name!r}: {reason}"
    record.error = f"{record.error}; {what}" if record.error else what
    if strict:
        raise error(f"plugin {record.name!r} failed to load ({what})")
    warnings.warn(f"plugin {record.name!r}: {kind} {name!r} left out ({reason})", PluginWarning, stacklevel=3)


def warn_left_out(error: ModelCountError, *, strict: bool | None = None) -> None:
    """Report a model whose count failed in a listing: raise ``error`` in strict mode, else warn it is left out."""
    if strict_mode() if strict is None else strict:
        raise error
    message = f"plugin {error.plugin!r}: model {error.model!r} left out ({error.reason})"
    warnings.warn(message, PluginWarning, stacklevel=2)


def _problem(spec: ArchitectureSpec | DatasetSpec | TrackerSpec, builtin: bool) -> str | None:
    """How ``spec`` breaks the plugin contract, or None (no plugin code runs; counts are probed separately).

    Built-in specs skip the signature checks: the test suite runs them, which keeps every command's start-up free of
    a hundred ``inspect.signature`` calls.
    """
    if isinstance(spec, ArchitectureSpec):
        return architecture_problem(spec, signatures=not builtin)
    if isinstance(spec, TrackerSpec):
        return None if callable(spec.open) else "open is not callable"
    return dataset_problem(spec, signatures=not builtin)


def _checked(spec: Any, expected: type, plugin: str, builtin: bool) -> Any:
    """``spec`` if it is a valid ``expected``, its ``count`` (and a third party's ``build``) guarded.

    A built-in ``build`` is left as it is: an exception from it is convscale's own bug and keeps its traceback.

    Raises:
        TypeError, ValueError: ``spec`` is not an ``expected`` with a name.
    """
    if not isinstance(spec, expected):
        raise TypeError(f"register() takes {expected.__name__} objects, got {type(spec).__name__} {spec!r:.40}")
    if not isinstance(spec.name, str) or not spec.name:
        raise ValueError(f"register() got a {expected.__name__} without a name")
    if isinstance(spec, ArchitectureSpec) and not isinstance(spec.count, _CheckedCount):
        spec = dataclasses.replace(spec, count=_CheckedCount(spec.count, plugin, spec.name))
    if isinstance(spec, ArchitectureSpec) and not builtin and not isinstance(spec.build, _CheckedBuild):
        spec = dataclasses.replace(spec, build=_CheckedBuild(spec.build, plugin, spec.name))
    return spec


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
        PluginError: in strict mode, the first plugin that fails (:class:`DuplicateRegistrationError` when it
            registers a name an earlier plugin registered). Otherwise each failure is a :class:`PluginWarning`, the
            failing plugin (or, for a taken name or a failing count, the failing spec) is left out, and the earlier
            plugin keeps a contested name.
    """
    strict = strict_mode() if strict is None else strict
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
        except _PLUGIN_FAILURES as exc:  # a broken plugin must not take the CLI down
            _fail(record, "import failed", exc, strict)
    if allow:
        _unknown_allowed(allow, seen, records, strict)
    for name, plugin in extra:
        record = PluginRecord(name=name, version=str(getattr(plugin, "__version__", "")), source="registered in code")
        records.append(record)
        try:
            manager.register(plugin, name=name)
        except _PLUGIN_FAILURES as exc:
            _fail(record, "registration failed", exc, strict)

    registry = Registry()
    by_name = {r.name: r for r in records}
    for hook_name, (table_name, spec_type) in _HOOKS.items():
        table = getattr(registry, table_name)
        # One plugin at a time, so a failure is attributed to its plugin: a hook that raises registers nothing; a
        # taken name or a broken count leaves out that spec alone.
        for impl in getattr(manager.hook, hook_name).get_hookimpls():  # registration order
            record = by_name[impl.plugin_name]
            record.hooks.append(hook_name)
            specs: list[tuple[Any, str | None]] = []

            def register(
                spec: Any,
                _specs: list[tuple[Any, str | None]] = specs,
                _type: type = spec_type,
                _plugin: str = impl.plugin_name,
                _builtin: bool = record.builtin,
            ) -> None:
                checked = _checked(spec, _type, _plugin, _builtin)
                _specs.append((checked, _problem(spec, _builtin)))

            try:
                impl.function(register=register)
            except _PLUGIN_FAILURES as exc:
                _fail(record, f"{hook_name} raised", exc, strict)
                continue
            registered = []
            for spec, problem in specs:
                if spec.name in table:  # the first plugin keeps the name (built-ins load first)
                    reason = f"already registered by plugin {table.owner(spec.name)!r}"
                    _fail_model(record, table.kind, spec.name, reason, strict, DuplicateRegistrationError)
                    continue
                if problem:
                    _fail_model(record, table.kind, spec.name, f"{problem}; see docs/plugins.md", strict)
                    continue
                if not record.builtin and isinstance(spec, ArchitectureSpec):
                    # Probe third-party counts once so a broken one is reported here instead of crashing `models` or
                    # `plan`; built-ins are covered by the test suite, which keeps `plan` start-up free of 48 counts.
                    try:
                        spec.count(spec.eval_resolution, spec.default_num_classes)
                    except ConvscaleError as exc:  # a UsageError at its own default resolution is broken too
                        reason = exc.reason if isinstance(exc, ModelCountError) else f"count raised {_describe(exc)}"
                        _fail_model(record, table.kind, spec.name, reason, strict)
                        continue
                table.add(spec, owner=record.name)
                registered.append(spec.name)
            record.registered[table_name] = registered
    return Plugins(manager=manager, records=records, registry=registry)


def _unknown_allowed(allow: set[str], installed: set[str], records: list[PluginRecord], strict: bool) -> None:
    """Report each ``CONVSCALE_PLUGINS`` name no installed plugin provides (a typo would silently load nothing)."""
    for name in sorted(allow - installed):
        hint = did_you_mean(name, sorted(installed))
        reason = f"named in {ALLOWLIST_ENV} but not installed" + (f"; {hint}" if hint else "")
        record = PluginRecord(name=name, version="", source=ALLOWLIST_ENV, error=reason)
        records.append(record)
        if strict:
            raise PluginError(f"plugin {name!r} failed to load ({reason})")
        warnings.warn(f"plugin {name!r} skipped ({reason})", PluginWarning, stacklevel=3)


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


def use_plugins(plugins: Plugins | None) -> None:
    """Make ``plugins`` the process-wide plugins that commands look names up in (``None``: load them again on next use).

    A notebook or a test that built its own set with :func:`load_plugins` (say with ``extra=`` in-code plugins) can
    then drive the CLI's commands with it.
    """
    global _CACHE
    _CACHE = plugins


def reset() -> None:
    """Forget the loaded plugins (tests; after installing a plugin in the same process)."""
    use_plugins(None)


__all__ = [
    "DuplicateRegistrationError",
    "ModelBuildError",
    "ModelCountError",
    "ModelRunError",
    "PluginRecord",
    "PluginWarning",
    "Plugins",
    "get_plugins",
    "get_registry",
    "load_plugins",
    "reset",
    "strict_mode",
    "use_plugins",
    "warn_left_out",
]
