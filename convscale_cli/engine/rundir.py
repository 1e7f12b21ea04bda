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


def as_json(value: Any) -> Any:
    """``value`` as a JSON file stores it (tuples become lists, other objects strings), for comparing with one."""
    return json.loads(json.dumps(value, default=str))


def read_json(path: Path) -> dict[str, Any] | None:
    """Read a JSON object, or None if the file is missing, unreadable, not JSON or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


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

        A directory whose run never saved a checkpoint nor finished has nothing to resume: a new config replaces its
        own (so a run refused by a check after the claim reruns once the input is fixed). One that has trained is only
        resumed when its ``config.json`` is readable and matches.

        Returns:
            True when the directory holds the same run (resume), False when it starts fresh.

        Raises:
            CheckpointError: the directory holds a trained run with a different or unreadable config, or files that
                are not a convscale run's, and ``force`` is off; the message names the differing keys.
        """
        config = self.path / "config.json"
        saved = read_json(config)
        if saved is not None:
            changed = [k for k in diff(saved, resolved) if k.split(".")[0] not in MUTABLE_KEYS]
            # Derived values (total steps, peak lr) only name the difference when no given value explains it.
            changed = [k for k in changed if not k.startswith("derived.")] or changed
            if changed and self.trained() and not force:
                shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
                raise CheckpointError(
                    f"{str(self.path)!r} holds a run with a different config "
                    f"({shown} {'differs' if len(changed) == 1 else 'differ'}); "
                    "choose another --out or pass --force to start over"
                )
            if changed:
                self.clear()
                saved = None
        elif self.primary and (config.exists() or config.is_symlink()):
            if not force:
                raise CheckpointError(
                    f"{str(config)!r} is not a readable run config, so the run in {str(self.path)!r} cannot be "
                    "checked against this one; choose another --out or pass --force to start over"
                )
            self.clear()
        elif self.primary and self.path.is_dir() and any(self.path.iterdir()) and not force:
            what = "holds checkpoints but no config.json" if self.checkpoints.exists() else "is not a convscale run"
            raise CheckpointError(
                f"--out {str(self.path)!r} is a non-empty directory that {what}; choose another --out or pass "
                "--force to start over"
            )
        elif self.primary and force:
            self.clear()
        if self.primary:
            self.path.mkdir(parents=True, exist_ok=True)
            if saved != as_json(resolved):  # a rerun of the same run writes nothing
                write_json(config, resolved)
        return saved is not None

    def trained(self) -> bool:
        """Whether the directory holds a checkpoint or a summary: something a new config would throw away."""
        steps = self.checkpoints.is_dir() and any(p.is_dir() for p in self.checkpoints.iterdir())
        return steps or (self.path / "summary.json").exists()

    def clear(self) -> None:
        """Remove this run's files (``--force``); files convscale did not write are left alone."""
        if not self.primary:
            return
        for name in (*_RUN_FILES, *_RUN_DIRS):
            path = self.path / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    def truncate_metrics(self, step: int) -> None:
        """Drop metric records written after ``step`` (they belong to steps a resumed run will redo)."""
        if not self.primary or not self.metrics.exists():
            return
        kept = []
        for line in self.metrics.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                keep = int(json.loads(line).get("step", 0)) <= step
            except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
                continue  # a line cut short by a crash, or not a record of ours
            if keep:
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
