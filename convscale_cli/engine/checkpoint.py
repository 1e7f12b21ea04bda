"""Orbax checkpoints of a run: asynchronous, atomic, the newest K kept, corrupt ones skipped on restore.

A checkpoint holds three items: ``state`` (params, optimiser state, EMA, base RNG, step: a sharded pytree every
process writes its shards of), ``data`` (the input iterator's JSON state) and ``ledger`` (the compute ledger). Orbax
writes each step into a temporary directory and renames it when complete, so a run killed mid-save leaves the
previous checkpoint as the newest complete one.

Corruption that still parses (a flipped bit in array data restores as a changed weight) is caught by a checksum: once
a save has committed, the CRC-32 and size of every file of the step are written to ``<step>/convscale-checksums.json``
and checked before the step is restored; a step that fails the check is skipped like an unreadable one. A step
without the file (a run killed between the commit and the checksum) is restored unchecked.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import warnings
import zlib
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from convscale_cli.engine.ledger import Ledger
from convscale_cli.errors import CheckpointError

ITEMS = ("state", "data", "ledger")
CHECKSUMS = "convscale-checksums.json"


def _crc(path: Path) -> str:
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}:{path.stat().st_size}"


def digest(step_dir: Path) -> dict[str, str]:
    """``relative path -> "crc32:size"`` of every file of a checkpoint step (the checksum file aside)."""
    return {
        str(path.relative_to(step_dir)): _crc(path)
        for path in sorted(step_dir.rglob("*"))
        if path.is_file() and not path.is_symlink() and path.name != CHECKSUMS
    }


def verify(step_dir: Path) -> str | None:
    """Why ``step_dir`` fails its checksums (a file changed or missing), or None (it passes, or has none)."""
    try:
        expected = json.loads((step_dir / CHECKSUMS).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"its {CHECKSUMS} is unreadable ({type(exc).__name__})"
    if not isinstance(expected, dict):
        return f"its {CHECKSUMS} is not a JSON object"
    for name, want in sorted(expected.items()):
        path = step_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if _crc(path) != want:
            return f"{name} fails its checksum"
    return None


class CheckpointWarning(UserWarning):
    """A checkpoint was unreadable and an older one was used instead."""


class CorruptCheckpoint(Exception):
    """A checkpoint step whose files no longer match the checksums written when it was saved."""


class Checkpoints:
    """The ``checkpoints/`` directory of a run.

    Args:
        directory: where step directories live (created if missing).
        keep: how many of the newest checkpoints to keep.
        use_async: save in a background thread (the training step goes on while the arrays are written).
        keep_steps: steps whose checkpoints are kept besides the newest ``keep`` (a trunk's branch points).
        read_only: only restore (another run's checkpoints, a branch's trunk): nothing is saved, deleted or cleaned.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        keep: int,
        use_async: bool = True,
        keep_steps: tuple[int, ...] = (),
        read_only: bool = False,
    ) -> None:
        self.directory = Path(directory).absolute()
        # Read-only use never saves, so nothing is ever deleted (Orbax's own read_only mode only adds log warnings).
        retention: dict[str, Any] = {"max_to_keep": None if read_only else keep}
        if keep_steps and not read_only:
            from orbax.checkpoint import checkpoint_managers as policies

            retention = {
                "preservation_policy": policies.AnyPreservationPolicy(
                    [policies.LatestN(keep), policies.CustomSteps(sorted(set(keep_steps)))]
                )
            }
        options = ocp.CheckpointManagerOptions(
            **retention,
            create=not read_only,
            cleanup_tmp_directories=not read_only,  # remove what a killed save left behind
            enable_async_checkpointing=use_async,
        )
        quiet_async_leftovers()
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
        self.read_only = read_only
        self._pending: int | None = None  # the step of the newest save not yet confirmed on disk
        self._failed = False  # a save failed: its stranded background threads are released on close()

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: Any, data_state: dict[str, Any], ledger: dict[str, Any]) -> None:
        """Start saving a checkpoint of ``step`` (returns once the arrays are copied off the devices).

        Raises:
            CheckpointError: this save, or a previous asynchronous one, failed (disk full, permissions); the
                newest complete checkpoint on disk is untouched.
        """
        if self.read_only:
            raise CheckpointError(f"{self.directory} is opened read-only (another run's checkpoints)")
        if self._pending is not None:
            # Orbax's finalize thread logs a background error and keeps it from check_for_errors; waiting for the
            # previous save (long done after N steps) is what surfaces it, named by its own step.
            self.wait()
        try:
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    data=ocp.args.JsonSave(data_state),
                    ledger=ocp.args.JsonSave(ledger),
                ),
                force=True,
            )
        except Exception as exc:
            raise self._failure(step, exc) from exc
        self._pending = step

    def check(self) -> None:
        """Raise if an asynchronous save failed since the last check.

        Raises:
            CheckpointError: naming the failure; the newest complete checkpoint on disk is untouched.
        """
        if self._pending is not None and not self._manager.is_saving_in_progress():
            # The save has finished: joining its finalize thread is instant and is the one reliable way to see its
            # error (Orbax's finalize thread takes it from check_for_errors and keeps it for the join).
            self.wait()
            return
        try:
            self._manager.check_for_errors()
        except Exception as exc:
            # Saves are serialised (save() waits for the previous one), so the failure is the pending save's.
            failed, self._pending = self._pending, None
            raise self._failure(failed, exc) from exc

    def wait(self) -> None:
        """Block until pending saves are on disk (and checksummed).

        Raises:
            CheckpointError: an asynchronous save failed.
        """
        step = self._pending
        try:
            self._manager.wait_until_finished()
            self._manager.check_for_errors()
        except Exception as exc:
            raise self._failure(self._pending, exc) from exc
        finally:
            self._pending = None
        if step is not None:
            self._seal(step)

    def _seal(self, step: int) -> None:
        """Write the checksums of a committed step (process 0; the directory is shared)."""
        step_dir = self.directory / str(step)
        if jax.process_index() != 0 or not step_dir.is_dir():
            return
        sums = digest(step_dir)
        fd, tmp = tempfile.mkstemp(prefix=f".{CHECKSUMS}.", suffix=".tmp", dir=step_dir)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(sums, f, indent=1)
            os.replace(tmp, step_dir / CHECKSUMS)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _failure(self, step: int | None, exc: BaseException) -> CheckpointError:
        self._failed = True
        what = f"at step {step}" if step is not None else "in the background"
        good = [s for s in self.steps() if s != step]
        kept = f"the checkpoint of step {good[-1]} is intact" if good else "no earlier checkpoint exists"
        detail = " ".join(str(exc).split()) or type(exc).__name__
        return CheckpointError(f"saving a checkpoint {what} failed ({type(exc).__name__}: {detail}); {kept}")

    def restore(self, abstract_state: Any) -> tuple[int, Any, dict[str, Any], dict[str, Any]] | None:
        """Restore the newest readable checkpoint into the layout of ``abstract_state``.

        ``abstract_state`` is a pytree of :class:`jax.ShapeDtypeStruct` with the *current* run's shardings, so a
        checkpoint written on N devices loads onto M devices. An unreadable newest checkpoint (truncated or corrupt)
        is reported with a warning and the previous one is tried.

        Returns:
            ``(step, state, data_state, ledger)``, or None when there is no checkpoint.

        Raises:
            CheckpointError: checkpoints exist but none can be read.
        """
        steps = self.steps()
        errors = []
        for step in reversed(steps):
            try:
                restored = self._restore_step(step, abstract_state)
            except Exception as exc:
                detail = describe_failure(exc)
                errors.append(f"step {step}: {type(exc).__name__}: {detail}")
                why = f"{detail}" if isinstance(exc, CorruptCheckpoint) else type(exc).__name__
                warnings.warn(
                    f"checkpoint of step {step} in {self.directory} is unreadable ({why}); trying the previous one",
                    CheckpointWarning,
                    stacklevel=2,
                )
                continue
            self.set_aside(s for s in steps if s > step)
            return step, restored["state"], dict(restored["data"] or {}), dict(restored["ledger"] or {})
        if steps:
            raise CheckpointError(f"no readable checkpoint in {self.directory}: {'; '.join(errors)}")
        return None

    def restore_step(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        """Restore the checkpoint of exactly ``step`` (a branch point): ``(state, data_state, ledger)``.

        Raises:
            CheckpointError: there is no complete checkpoint of ``step``, or it is unreadable or corrupt.
        """
        if step not in self.steps():
            have = ", ".join(map(str, self.steps())) or "none"
            raise CheckpointError(f"{self.directory} holds no checkpoint of step {step} (steps: {have})")
        try:
            restored = self._restore_step(step, abstract_state)
        except Exception as exc:
            detail = describe_failure(exc)
            raise CheckpointError(
                f"checkpoint of step {step} in {self.directory} is unreadable ({type(exc).__name__}: {detail})"
            ) from exc
        return restored["state"], dict(restored["data"] or {}), dict(restored["ledger"] or {})

    def _restore_step(self, step: int, abstract_state: Any) -> Any:
        corrupt = verify(self.directory / str(step))
        if corrupt is not None:
            raise CorruptCheckpoint(corrupt)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore(),
                ledger=ocp.args.JsonRestore(),
            ),
        )
        Ledger.from_dict(dict(restored["ledger"] or {}))  # a ledger of the wrong schema: unusable too
        return restored

    def set_aside(self, steps: Any) -> None:
        """Move checkpoints out of the manager's sight, kept for inspection as ``unreadable-<step>-<time>``.

        Unreadable newer checkpoints would block re-saving their step (only process 0 touches the shared directory).
        """
        moved = False
        for step in steps:
            if jax.process_index() == 0:
                target = self.directory / f"unreadable-{step}-{int(time.time())}"
                for n in range(1, 1000):  # a rerun within the same second sets the same step aside again
                    if not target.exists():
                        break
                    target = self.directory / f"unreadable-{step}-{int(time.time())}-{n}"
                (self.directory / str(step)).rename(target)
            moved = True
        if moved:
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices("convscale-set-aside-checkpoints")
            self._manager.reload()

    def close(self) -> None:
        """Finish pending saves and release the manager (and the threads of a failed save)."""
        step = self._pending
        try:
            try:
                self._manager.close()
            except Exception as exc:
                # After a failed save, closing re-raises pieces of that failure (its other writes hit the same full
                # disk); it has been reported already, and a raw OSError here would replace that one-line error.
                if not self._failed:
                    raise self._failure(step, exc) from exc
            if step is not None and not self._failed:
                self._seal(step)
        finally:
            if self._failed:
                release_stranded_threads()
                self._remove_failed_saves()

    def _remove_failed_saves(self) -> None:
        """Delete the temporary directories of failed saves (process 0), once their threads are stopped.

        Orbax removes them when the next run opens the directory; removing them now frees what a full disk holds
        and leaves nothing half-written next to the intact checkpoints.
        """
        if jax.process_index() != 0 or not self.directory.is_dir():
            return
        # TensorStore writes already issued may still land (recreating a directory) after the threads stop: remove
        # until the directory stays clean for a moment, for at most about two seconds.
        for _ in range(20):
            leftovers = list(self.directory.glob("*.orbax-checkpoint-tmp*"))
            for tmp in leftovers:
                shutil.rmtree(tmp, ignore_errors=True)
            time.sleep(0.1)
            if not leftovers and not list(self.directory.glob("*.orbax-checkpoint-tmp*")):
                return


def describe_failure(exc: BaseException) -> str:
    """An Orbax/TensorStore failure in one line for the user, without the repr of a TensorStore method that Orbax
    appends ("See full TensorStore details: <bound method pybind11_...>")."""
    text = " ".join(str(exc).split())
    text = re.sub(r"\s*See full TensorStore details:.*", "", text)
    return re.sub(r"<bound method [^>]*>", "<...>", text)[:200]


def _is_closed_loop_callback(args: Any) -> bool:
    """Whether an unraisable exception is a callback scheduled onto an asyncio loop that had already closed, or the
    failure of an Orbax read coroutine abandoned with that loop (reported as "Exception ignored in <coroutine>")."""
    exc, tb = args.exc_value, args.exc_traceback
    code = getattr(args.object, "cr_code", None)
    if code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename:
        return True
    if args.object is not None or not isinstance(exc, RuntimeError) or str(exc) != "Event loop is closed":
        return False
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    return frames[:1] == ["call_soon_threadsafe"]  # raised by the loop itself, from no Python caller (native code)


class _OrbaxTaskLeftovers(logging.Filter):
    """Drops asyncio's "exception was never retrieved" for Orbax's tasks (see :func:`quiet_async_leftovers`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        # "Task exception ...", "_GatheringFuture exception ..." (a gather of writes cancelled with its loop)
        if "exception was never retrieved" not in str(record.msg).split("\n", 1)[0] or not record.exc_info:
            return True
        tb = record.exc_info[2]
        while tb is not None:
            if f"{os.sep}orbax{os.sep}" in tb.tb_frame.f_code.co_filename:
                return False
            tb = tb.tb_next
        return True


def quiet_async_leftovers() -> None:
    """Stop reporting what a failed Orbax operation leaves behind on its event loop (once per process; idempotent).

    Orbax awaits TensorStore reads and writes on an asyncio loop it closes as soon as the operation fails. Reads or
    writes still in flight then complete on TensorStore's threads, whose callback into the closed loop raises
    ``RuntimeError: Event loop is closed`` through :data:`sys.unraisablehook`; and its other tasks that failed too
    are logged as "Task exception was never retrieved" when collected. Both came as dozens of tracebacks after a
    restore fell back or a save failed, at random points of the rest of the run, repeating what the caller reports
    in one line. Every other unraisable exception and asyncio error is reported as before.
    """
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _OrbaxTaskLeftovers) for f in asyncio_log.filters):
        asyncio_log.addFilter(_OrbaxTaskLeftovers())
    previous = sys.unraisablehook
    if getattr(previous, "_convscale_quiet", False):
        return

    def hook(args: Any) -> None:
        if not _is_closed_loop_callback(args):
            previous(args)

    hook._convscale_quiet = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def release_stranded_threads() -> int:
    """Wake the background threads of a failed asynchronous save so the process can exit; return how many.

    Orbax runs each part of an asynchronous save in a non-daemon thread that first waits for a signal (the step's
    temporary directory exists) for up to five minutes. When creating the directory fails, the signal never comes and
    the interpreter waits for those threads at exit: a batch job held its allocation until wall time. Each thread is
    cancelled, then its awaited signal is set, so it wakes, sees the cancellation and returns without writing.
    """
    try:
        from orbax.checkpoint._src.futures import future
    except ImportError:  # another Orbax layout: nothing known to release
        return 0
    thread_type = getattr(future, "_SignalingThread", None)
    if thread_type is None:
        return 0
    released = 0
    for thread in threading.enumerate():
        if not isinstance(thread, thread_type) or not thread.is_alive():
            continue
        try:
            thread.cancel()
            future.set_signals(thread._receive_signals, operation_id=thread._operation_id)
        except Exception:  # noqa: BLE001 - best effort on an error path; the error itself is already reported
            continue
        released += 1
    for thread in threading.enumerate():
        if isinstance(thread, thread_type):
            # The base join: Orbax's own raises the cancellation this function caused.
            threading.Thread.join(thread, timeout=5.0)
    return released
