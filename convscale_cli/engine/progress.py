"""What the user sees while a run trains: a Rich progress bar on a terminal, plain log lines elsewhere."""

from __future__ import annotations

import sys
import time
from typing import Any, Literal, TextIO

Mode = Literal["auto", "rich", "plain", "none"]


def _format(fields: dict[str, Any]) -> str:
    parts = []
    for key, value in fields.items():
        if isinstance(value, float):
            parts.append(f"{key} {value:.4g}")
        else:
            parts.append(f"{key} {value}")
    return "  ".join(parts)


class Progress:
    """Step / epoch progress with ETA and the latest metrics.

    Args:
        total_steps: steps of the whole run.
        start_step: steps already done (a resumed run).
        mode: ``rich`` (a live bar), ``plain`` (one line per update), ``none``, or ``auto`` (rich on a TTY).
        stream: where plain lines (and, when given, the live bar) go.
    """

    def __init__(self, total_steps: int, *, start_step: int = 0, mode: Mode = "auto", stream: TextIO | None = None):
        self.total = total_steps
        self._own_stream = stream is not None  # the live bar draws there too (else on Rich's console: stdout)
        self.stream = stream or sys.stdout
        if mode == "auto":
            mode = "rich" if self.stream.isatty() else "plain"
        self.mode = mode
        self._start_step = start_step
        self._start_time = time.monotonic()
        self._rich: Any = None
        self._task: Any = None

    def __enter__(self) -> Progress:
        self._start_time = time.monotonic()  # the ETA counts training only, not the compile before it
        if self.mode == "rich":
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress
            from rich.table import Column

            # Step counter and ETA first and never squeezed; the metrics take what is left of the line and are cut
            # with an ellipsis, so an 80-column terminal still shows where the run is and when it ends.
            self._rich = RichProgress(
                TextColumn("[bold]{task.description}", table_column=Column(no_wrap=True)),
                MofNCompleteColumn(table_column=Column(no_wrap=True, min_width=9)),
                TimeRemainingColumn(table_column=Column(no_wrap=True, min_width=7)),
                BarColumn(bar_width=16),
                TextColumn("{task.fields[info]}", table_column=Column(ratio=1, no_wrap=True, overflow="ellipsis")),
                transient=False,
                expand=True,
                **({"console": Console(file=self.stream)} if self._own_stream else {}),
            )
            self._rich.__enter__()
            self._task = self._rich.add_task("train", total=self.total, completed=self._start_step, info="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._rich is not None:
            self._rich.__exit__(None, None, None)
            self._rich = None

    def eta_seconds(self, step: int) -> float | None:
        """Seconds left at the pace since this process started (None before the first measured step)."""
        done = step - self._start_step
        if done <= 0:
            return None
        return (time.monotonic() - self._start_time) / done * (self.total - step)

    def update(self, step: int, fields: dict[str, Any]) -> None:
        """Show the run at ``step`` with ``fields`` (loss, img/s, MFU, compute used vs budget, ...)."""
        if self.mode == "rich" and self._rich is not None:
            self._rich.update(self._task, completed=step, info=_format(fields))
        elif self.mode == "plain":
            eta = self.eta_seconds(step)
            eta_text = f"  eta {eta:.0f}s" if eta is not None else ""
            print(f"step {step}/{self.total}{eta_text}  {_format(fields)}", file=self.stream, flush=True)

    def message(self, text: str) -> None:
        """A one-off line (eval results, checkpoint saved, resumed from ...)."""
        if self.mode == "rich" and self._rich is not None:
            self._rich.console.print(text, markup=False, highlight=False)
        elif self.mode != "none":
            print(text, file=self.stream, flush=True)
