"""The run directory: its layout, the same-config check on restart, and the files process 0 writes.

Layout::

    RUN/config.json      resolved config (every default filled in)
    RUN/metrics.jsonl    one JSON object per log / eval point
    RUN/ledger.json      the live compute ledger (heartbeat; charges time lost to a crash on resume; ``error``:
                         why a run that diverged stopped)
    RUN/checkpoints/     Orbax checkpoints: <step>/{state,data,ledger}
    RUN/tb/              TensorBoard events (the default tensorboard tracker)
    RUN/summary.json     written when the run ends: status "finished", "budget" or "interrupted"

A run is resumed by running the same command again (big_vision: always resume from the workdir). ``config.json``
carries a ``convscale_run`` key that only convscale writes: a directory is reused, and ``--force`` clears it, only
when that key says it is a convscale run, so a directory that merely holds a ``config.json`` and a ``metrics.jsonl``
(a Hugging Face model directory, a project root) is never taken over.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shlex
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from convscale_cli.config import diff, option_word
from convscale_cli.data import IMAGENET
from convscale_cli.engine.config import MUTABLE_KEYS
from convscale_cli.engine.tracking import TrackerWarning, close_trackers
from convscale_cli.errors import CheckpointError, UsageError

# Settings of the held-out evaluation only: a trained run that differs in nothing else is evaluated with
# `convscale eval`, never retrained (training never reads them).
EVAL_KEYS = frozenset({"eval_resolution", "eval_examples", "eval_crop", "eval_crop_fraction"})
_RUN_FILES = ("config.json", "metrics.jsonl", "ledger.json", "summary.json")
_RUN_DIRS = ("checkpoints", "tb")
MARKER = "convscale_run"  # the config.json key that marks a directory as a convscale run


def write_text(path: Path, text: str) -> None:
    """Write a file atomically: a fresh temporary file beside it (``O_EXCL``, so a planted symlink or file is never
    followed or reused), then a rename, so a crash never leaves half a file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (see :func:`write_text`)."""
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def _marker(kind: str) -> dict[str, str]:
    try:
        version = importlib.metadata.version("convscale")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return {"kind": kind, "version": version}


def is_run_config(config: dict[str, Any] | None) -> bool:
    """Whether a ``config.json``'s contents were written by convscale (they carry its marker key)."""
    return isinstance(config, dict) and isinstance(config.get(MARKER), dict) and "kind" in config[MARKER]


def as_json(value: Any) -> Any:
    """``value`` as a JSON file stores it (tuples become lists, other objects strings), for comparing with one."""
    return json.loads(json.dumps(value, default=str))


def with_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved run config with the values implied by keys it predates: a run that records no input normalisation
    was trained with ImageNet's."""
    if "normalization" in saved:
        return saved
    return {**saved, "normalization": IMAGENET.to_json()}


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
        kind: the kind of run (``pretrain``, ``finetune``), recorded in the marker of ``config.json``.
    """

    def __init__(self, path: str | Path, *, primary: bool = True, kind: str = "pretrain") -> None:
        self.path = Path(path).expanduser()  # as --from and import-weights do: never a directory named "~"
        self.primary = primary
        self.kind = kind
        if self.path.exists() and not self.path.is_dir():
            raise UsageError(f"`out` {str(self.path)!r} is a file, expected a run directory")
        for parent in self.path.absolute().parents:  # a run's checkpoints are rotated and --force clears tb/
            if parent.name in _RUN_DIRS and is_run_config(read_json(parent.parent / "config.json")):
                raise UsageError(
                    f"`out` {str(self.path)!r} is inside {str(parent)!r}, which the run in {str(parent.parent)!r} "
                    "manages and deletes from; choose a directory outside it"
                )

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    def summary(self) -> dict[str, Any] | None:
        """The summary of a run that ended, or None."""
        return read_json(self.path / "summary.json")

    def saved_config(self) -> dict[str, Any] | None:
        """The resolved config of the trained convscale run this directory holds (it has a checkpoint or a summary),
        or None: none, not one of ours, or one that never trained (a new config simply replaces it)."""
        saved = read_json(self.path / "config.json")
        return saved if is_run_config(saved) and self.trained() else None

    def live_ledger(self) -> dict[str, Any] | None:
        """The last ledger heartbeat, or None."""
        return read_json(self.path / "ledger.json")

    def prepare(self, resolved: dict[str, Any], *, force: bool) -> bool:
        """Check the directory against this run's resolved config and claim it.

        Only a directory that is empty, missing, or marked as a convscale run (see the module docstring) is used. A
        run that never saved a checkpoint nor finished has nothing to resume: a new config replaces its own (so a
        run refused by a check after the claim reruns once the input is fixed). One that has trained is only resumed
        when its config matches; ``--force`` starts it over.

        Returns:
            True when the directory holds the same run (resume), False when it starts fresh.

        Raises:
            CheckpointError: the directory holds a trained run with a different config and ``force`` is off (the
                message names the differing keys), or it is not a convscale run (``force`` does not change that).
        """
        config = self.path / "config.json"
        saved = read_json(config)
        if saved is not None and not is_run_config(saved) and not self._changed(saved, resolved):
            saved = {MARKER: _marker(self.kind), **saved}  # written before the marker: identical, so provably ours
        if not is_run_config(saved):
            if self.primary and self.path.is_dir() and any(self.path.iterdir()):
                raise CheckpointError(self._not_a_run(saved))
            saved = None
        else:
            saved = {k: v for k, v in saved.items() if k != MARKER}
            changed = self._changed(saved, resolved)
            if changed and set(changed) <= EVAL_KEYS and self.trained() and not force:
                raise CheckpointError(self._evaluate_instead(changed, saved, resolved))
            if changed and self.trained() and not force:
                shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
                raise CheckpointError(
                    f"{str(self.path)!r} holds a run with a different config "
                    f"({shown} {'differs' if len(changed) == 1 else 'differ'}); "
                    "choose another `out` or pass `force` to start over"
                )
            if changed:
                self.clear()
                saved = None
        if self.primary:
            self.path.mkdir(parents=True, exist_ok=True)
            if saved != as_json(resolved):  # a rerun of the same run writes nothing
                try:
                    write_json(config, {MARKER: _marker(self.kind), **resolved})
                except OSError:
                    if saved is None:
                        raise
                    # The same run, differing only in settings a rerun may change (read-only storage of a finished
                    # run): the saved config stays; whatever must be written later reports its own error.
        return saved is not None

    @staticmethod
    def _changed(saved: dict[str, Any], resolved: dict[str, Any]) -> list[str]:
        changed = [k for k in diff(with_defaults(saved), resolved) if k.split(".")[0] not in MUTABLE_KEYS]
        # Derived values (total steps, peak lr) only name the difference when no given value explains it.
        return [k for k in changed if not k.startswith("derived.")] or changed

    def _evaluate_instead(self, changed: list[str], saved: dict[str, Any], resolved: dict[str, Any]) -> str:
        """The refusal for a run that differs only in how it is evaluated: an eval command, never ``--force``."""
        command = [f"convscale eval {shlex.quote(str(self.path))} --dataset {resolved.get('dataset')}"]
        if "eval_resolution" in changed:
            command.append(f"--resolution {resolved['eval_resolution']}")
        for key in ("eval_crop", "eval_crop_fraction"):
            if key in changed and resolved.get(key) is not None:
                command.append(f"--eval-crop {resolved[key]:g}")
        command += [f"--data-option {option_word(k, v)}" for k, v in (resolved.get("data_options") or {}).items()]
        settings = ", ".join(f"{key} {saved.get(key)} in the run, {resolved.get(key)} now" for key in changed)
        return (
            f"{str(self.path)!r} holds a trained run that differs only in how it is evaluated ({settings}), which "
            f"does not change training: to continue it keep its settings; to evaluate it: {' '.join(command)}"
        )

    def _not_a_run(self, saved: dict[str, Any] | None) -> str:
        config = self.path / "config.json"
        if saved is not None:
            what = f"its config.json was not written by convscale (no {MARKER!r} key)"
        elif config.exists() or config.is_symlink():
            what = "its config.json is not a readable convscale run config"
        elif self.checkpoints.exists():
            what = "it holds checkpoints but no config.json"
        else:
            what = "it is not a convscale run"
        return (
            f"`out` {str(self.path)!r} is a non-empty directory and {what}; convscale only writes into a new or "
            "empty directory or one of its own runs (`force` included), so choose another `out` or empty it yourself"
        )

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
        write_text(self.metrics, "".join(line + "\n" for line in kept))

    def write_summary(self, summary: dict[str, Any]) -> None:
        if self.primary:
            write_json(self.path / "summary.json", summary)

    def remove_summary(self) -> None:
        if self.primary:
            (self.path / "summary.json").unlink(missing_ok=True)

    def write_live_ledger(self, ledger: dict[str, Any]) -> None:
        if self.primary:
            write_json(self.path / "ledger.json", ledger)

    def record_failure(self, error: str) -> None:
        """Note in the live ledger why training stopped without a summary (a non-finite loss): a runs directory's
        listing then says so instead of "unfinished or crashed". The next heartbeat of a rerun drops the note."""
        if self.primary:
            live = self.live_ledger() or {}
            write_json(self.path / "ledger.json", {**live, "error": error})


def _append(path: Path) -> Any:
    """Open ``path`` for appending without following a symlink planted in its place (closed by the caller)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as exc:
        if path.is_symlink():
            raise CheckpointError(f"{str(path)!r} is a symlink; convscale does not write through links") from exc
        raise
    return os.fdopen(fd, "a", encoding="utf-8")


class MetricsLog:
    """Appends records to ``metrics.jsonl`` and sends their scalars to the run's open trackers.

    A tracker that fails while logging is closed and dropped with a warning: training goes on, and ``metrics.jsonl``
    stays the complete record.
    """

    def __init__(self, run: RunDir, *, trackers: Sequence[tuple[str, Any]] = ()) -> None:
        self.run = run
        self._file = _append(run.metrics) if run.primary else None
        self._trackers = list(trackers) if run.primary else []

    def write(self, record: dict[str, Any]) -> None:
        """One record: must hold ``step`` and ``split`` (``train`` or ``eval``)."""
        if self._file is None:
            return
        self._file.write(json.dumps(record, default=float) + "\n")
        self._file.flush()
        scalars = {k: v for k, v in record.items() if k not in ("step", "split") and isinstance(v, (int, float))}
        for name, tracker in list(self._trackers):
            try:
                tracker.log_metrics(int(record["step"]), str(record["split"]), scalars)
            except Exception as exc:  # never lose a run to its tracker
                warnings.warn(f"tracker {name!r} dropped: {type(exc).__name__}: {exc}", TrackerWarning, stacklevel=2)
                self._trackers.remove((name, tracker))
                close_trackers([(name, tracker)])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        close_trackers(self._trackers)
        self._trackers = []
