"""Scaling-law fits, plots and the HTML report over a runs directory.

``convscale_cli.report.fit`` (the fits) and ``convscale_cli.report.runs`` (loading run directories) are light and safe
to import from the planner; :func:`build_report` pulls in the analysis and plotting modules only when called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from convscale_cli.report.build import build_report

__all__ = ["build_report"]


def __getattr__(name: str) -> Any:
    # Lazy so that `from convscale_cli.report.fit import ...` does not import the whole report stack.
    if name == "build_report":
        from convscale_cli.report.build import build_report

        return build_report
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
