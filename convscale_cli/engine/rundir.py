"""The run directory: its layout, the same-config check on restart, and the files process 0 writes.

Layout::

    RUN/config.json      resolved config (every default filled in)
    RUN/metrics.jsonl    one JSON object per log / eval point
    RUN/ledger.json      the live compute ledger (heartbeat; charges time lost to a crash on resume)
    RUN/checkpoints/     Orbax checkpoints: <step>/{state,data,ledger}
    RUN/tb/              TensorBoard events (when tensorboardX is installed)
    RUN/summary.json     written when the run ends: status "finished", "budget" or "interrupted"

A run is resumed by running the same command again (big_vision: always resume from the workdir).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from convscale_cli.config import diff
from convscale_cli.engine.config import MUTABLE_KEYS
from convscale_cli.errors import CheckpointError, UsageError

_RUN_FILES = ("config.json", "metrics.jsonl", "ledger.json", "summary.json")
_RUN_DIRS = ("checkpoints", "tb")


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temporary file + rename), so a crash never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    """Read a JSON file, or None if it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


class RunDir:
    """One run directory.

    Args:
        path: the directory (created if missing).
        primary: whether this process writes logs and summaries (process 0 only).
    """

    def __init__(self, path: str | Path, *, primary: bool = True) -> None:
        self.path = Path(path)
        self.primary = primary
        if self.path.exists() and not self.path.is_dir():
            raise UsageError(f"--out {str(self.path)!r} is a file, expected a run directory")

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    def summary(self) -> dict[str, Any] | None:
        """The summary of a run that ended, or None."""
        return read_json(self.path / "summary.json")

    def live_ledger(self) -> dict[str, Any] | None:
        """The last ledger heartbeat, or None."""
        return read_json(self.path / "ledger.json")

    def prepare(self, resolved: dict[str, Any], *, force: bool) -> bool:
        """Check the directory against this run's resolved config and claim it.

        Returns:
            True when the directory holds the same run (resume), False when it starts fresh.

        Raises:
            CheckpointError: the directory holds a run with a different config and ``force`` is off; the message
                names the differing keys.
        """
        saved = read_json(self.path / "config.json")
        if saved is not None:
            changed = [k for k in diff(saved, resolved) if k.split(".")[0] not in MUTABLE_KEYS]
            # Derived values (total steps, peak lr) only name the difference when no given value explains it.
            changed = [k for k in changed if not k.startswith("derived.")] or changed
            if changed and not force:
                shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
                raise CheckpointError(
                    f"{str(self.path)!r} holds a run with a different config "
                    f"({shown} {'differs' if len(changed) == 1 else 'differ'}); "
                    "choose another --out or pass --force to start over"
                )
            if changed:
                self.clear()
                saved = None
        elif self.path.is_dir() and any(self.path.iterdir()) and not (self.checkpoints.exists() or force):
            raise CheckpointError(
                f"--out {str(self.path)!r} is a non-empty directory that is not a convscale run; "
                "choose another --out or pass --force"
            )
        if self.primary:
            self.path.mkdir(parents=True, exist_ok=True)
            write_json(self.path / "config.json", resolved)
        return saved is not None

    def clear(self) -> None:
        """Remove this run's files (``--force``); files convscale did not write are left alone."""
        if not self.primary:
            return
        for name in _RUN_FILES:
            (self.path / name).unlink(missing_ok=True)
        for name in _RUN_DIRS:
            shutil.rmtree(self.path / name, ignore_errors=True)

    def truncate_metrics(self, step: int) -> None:
        """Drop metric records written after ``step`` (they belong to steps a resumed run will redo)."""
        if not self.primary or not self.metrics.exists():
            return
        kept = []
        for line in self.metrics.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            if int(record.get("step", 0)) <= step:
                kept.append(line)
        tmp = self.metrics.with_name("metrics.jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.metrics)

    def write_summary(self, summary: dict[str, Any]) -> None:
        if self.primary:
            write_json(self.path / "summary.json", summary)

    def remove_summary(self) -> None:
        if self.primary:
            (self.path / "summary.json").unlink(missing_ok=True)

    def write_live_ledger(self, ledger: dict[str, Any]) -> None:
        if self.primary:
            write_json(self.path / "ledger.json", ledger)


class MetricsLog:
    """Appends records to ``metrics.jsonl`` and, when tensorboardX is importable, TensorBoard scalars."""

    def __init__(self, run: RunDir, *, tensorboard: bool) -> None:
        self.run = run
        self._file = open(run.metrics, "a") if run.primary else None  # noqa: SIM115  (closed in close())
        self._tb: Any = None
        if run.primary and tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                pass
            else:
                self._tb = SummaryWriter(str(run.path / "tb"))

    def write(self, record: dict[str, Any]) -> None:
        """One record: must hold ``step`` and ``split`` (``train`` or ``eval``)."""
        if self._file is None:
            return
        self._file.write(json.dumps(record, default=float) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key not in ("step", "split") and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"{record['split']}/{key}", value, record["step"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
