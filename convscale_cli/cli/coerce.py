"""Typer parameter coercion without pydantic where pydantic cannot change the value (start-up latency).

typer >= 0.29 coerces every non-flag parameter through a pydantic ``TypeAdapter`` built on first use, so
``convscale models`` imported pydantic (~145 ms of a 0.5 s budget) only to pass ``None`` defaults through unchanged.
:func:`install` makes typer build a lazy runtime parameter instead: ``None`` (which typer returns before consulting the
adapter anyway), a ``str`` for a ``str`` option, an ``int``/``float`` already of the option's type and plain decimal
numerals for ``int``/``float`` options are taken as they are; everything else — enums, paths, files, ranges, custom
parsers, lists, malformed numbers and their error messages — goes to typer's own runtime parameter, built only then.
``tests/test_cli.py`` checks each fast case against typer's result. If typer's internals change, :func:`install` does
nothing and the CLI is merely slower (the no-pydantic test then fails and says so).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

UNDECIDED = object()  # fast_value's answer when only typer's own adapter can coerce the value
# Plain decimal numerals only: pydantic's lax parsing also accepts "1_000", " 7 ", "0x1f" or "1.0" for an int; those
# (and every error) are left to it so the accepted values and the messages stay exactly typer's.
_INT = re.compile(r"-?(?:0|[1-9][0-9]{0,17})")
_FLOAT = re.compile(r"-?[0-9]{1,15}(?:\.[0-9]{1,15})?(?:[eE]-?[0-9]{1,2})?")


def fast_value(annotation: Any, parameter_info: Any, file_annotation: Any, value: Any) -> Any:
    """The value typer would produce for ``value``, or ``UNDECIDED`` when only typer's adapter can tell."""
    if file_annotation is not None or parameter_info.parser is not None:
        return UNDECIDED
    if annotation is str:
        return value if type(value) is str else UNDECIDED
    if annotation not in (int, float):
        return UNDECIDED
    if parameter_info.min is not None or parameter_info.max is not None or parameter_info.clamp:
        return UNDECIDED
    if type(value) is annotation:
        return value
    if type(value) is str:
        pattern = _INT if annotation is int else _FLOAT
        if pattern.fullmatch(value):
            return annotation(value)
    return UNDECIDED


def install() -> bool:
    """Make typer coerce parameters lazily (idempotent); returns whether the fast path is active."""
    try:
        import typer.core
        from typer._coercion import RuntimeParam
    except ImportError:
        return False
    build = getattr(typer.core, "build_runtime_param", None)
    if build is None or not hasattr(typer.core._TyperParameter, "get_runtime_param"):
        return False
    if getattr(build, "_convscale_lazy", False):
        return True

    @dataclasses.dataclass(frozen=True)
    class LazyRuntimeParam(RuntimeParam):
        descriptor: Any = None
        full: list[Any] = dataclasses.field(default_factory=list)  # typer's own runtime parameter, once needed

        def _coerce_value(self, value: Any, param: Any, ctx: Any) -> Any:
            result = fast_value(self.annotation, self.parameter_info, self.descriptor.file_annotation, value)
            if result is not UNDECIDED:
                return result
            if not self.full:
                self.full.append(build(self.descriptor))
            return self.full[0]._coerce_value(value, param=param, ctx=ctx)

    def build_lazy(descriptor: Any) -> Any:
        return LazyRuntimeParam(
            parameter_info=descriptor.parameter_info, annotation=descriptor.annotation, descriptor=descriptor
        )

    build_lazy._convscale_lazy = True  # type: ignore[attr-defined]
    typer.core.build_runtime_param = build_lazy
    return True
