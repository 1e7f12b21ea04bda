"""Shared output helpers: JSON to stdout, Rich tables for people."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator, Sequence
from typing import Any


def print_json(data: Any) -> None:
    """Machine-readable output: plain JSON on stdout, nothing else."""
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def progress_to_stderr(enabled: bool) -> Iterator[None]:
    """While ``enabled`` (``--json`` was given), everything printed goes to stderr, so stdout holds the JSON alone.

    Progress bars and lines, evaluation results and notices are written to ``sys.stdout`` as resolved at the time of
    writing (Rich's console and :class:`~convscale_cli.engine.progress.Progress` both do), so redirecting it covers
    them all.
    """
    if not enabled:
        yield
        return
    with contextlib.redirect_stdout(sys.stderr):
        yield


def print_table(
    title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]], *, right: Sequence[str] = ()
) -> None:
    """A Rich table on stdout (plain text when not a terminal)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, header_style="bold", box=None, pad_edge=False)
    for column in columns:
        table.add_column(column, justify="right" if column in right else "left", no_wrap=True)
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row))
    console = Console()
    if not console.is_terminal:  # piped or captured: never squash columns into ellipses
        console = Console(width=1000)
    console.print(table)


def err(message: str) -> None:
    """One line on stderr."""
    print(message, file=sys.stderr)
