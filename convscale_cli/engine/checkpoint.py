"""Orbax checkpoints of a run: asynchronous, atomic, the newest K kept, corrupt ones skipped on restore.

A checkpoint holds three items: ``state`` (params, optimiser state, EMA, base RNG, step: a sharded pytree every
process writes its shards of), ``data`` (the input iterator's JSON state) and ``ledger`` (the compute ledger). Orbax
writes each step into a temporary directory and renames it when complete, so a run killed mid-save leaves the
previous checkpoint as the newest complete one.
"""

from __future__ import annotations

import threading
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from convscale_cli.engine.ledger import Ledger
from convscale_cli.errors import CheckpointError

ITEMS = ("state", "data", "ledger")


class CheckpointWarning(UserWarning):
    """A checkpoint was unreadable and an older one was used instead."""


class Checkpoints:
    """The ``checkpoints/`` directory of a run.

    Args:
        directory: where step directories live (created if missing).
        keep: how many of the newest checkpoints to keep.
        use_async: save in a background thread (the training step goes on while the arrays are written).
    """

    def __init__(self, directory: str | Path, *, keep: int, use_async: bool = True) -> None:
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            cleanup_tmp_directories=True,  # remove what a killed save left behind
            enable_async_checkpointing=use_async,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
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
        """Block until pending saves are on disk.

        Raises:
            CheckpointError: an asynchronous save failed.
        """
        try:
            self._manager.wait_until_finished()
            self._manager.check_for_errors()
        except Exception as exc:
            raise self._failure(self._pending, exc) from exc
        finally:
            self._pending = None

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
                restored = self._manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state),
                        data=ocp.args.JsonRestore(),
                        ledger=ocp.args.JsonRestore(),
                    ),
                )
                Ledger.from_dict(dict(restored["ledger"] or {}))  # a ledger of the wrong schema: unusable too
            except Exception as exc:
                detail = " ".join(str(exc).split())[:200]
                errors.append(f"step {step}: {type(exc).__name__}: {detail}")
                warnings.warn(
                    f"checkpoint of step {step} in {self.directory} is unreadable ({type(exc).__name__}); "
                    "trying the previous one",
                    CheckpointWarning,
                    stacklevel=2,
                )
                continue
            self._set_aside(s for s in steps if s > step)
            return step, restored["state"], dict(restored["data"] or {}), dict(restored["ledger"] or {})
        if steps:
            raise CheckpointError(f"no readable checkpoint in {self.directory}: {'; '.join(errors)}")
        return None

    def _set_aside(self, steps: Any) -> None:
        # Unreadable newer checkpoints would block re-saving their step; keep them for inspection under a name the
        # manager ignores (only process 0 touches the shared directory).
        moved = False
        for step in steps:
            if jax.process_index() == 0:
                (self.directory / str(step)).rename(self.directory / f"unreadable-{step}-{int(time.time())}")
            moved = True
        if moved:
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices("convscale-set-aside-checkpoints")
            self._manager.reload()

    def close(self) -> None:
        """Finish pending saves and release the manager (and the threads of a failed save)."""
        try:
            self._manager.close()
        finally:
            if self._failed:
                release_stranded_threads()


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
