"""A Ctrl-C or SIGTERM that cannot get lost, and never cuts a checkpoint save short.

Python raises ``KeyboardInterrupt`` wherever the main thread is when SIGINT arrives. Raised inside a garbage-collection
callback (JAX frees device buffers in one) or a ``__del__``, it is printed as "Exception ignored in ..." and dropped.
While :func:`latched` is active SIGINT and SIGTERM both raise ``KeyboardInterrupt`` (so a job scheduler's SIGTERM during
start-up or the final evaluation ends the command with exit code 130 instead of killing it mid-write) and are
remembered: :func:`check` raises again between units of work (each trial of a sweep, each step of the quickstart), and
the training loop, which takes the signals over to save and stop cleanly, stops at its first step if one arrived before
it. A signal that lands where an exception cannot propagate is remembered and delivered again a moment later
(``_thread.interrupt_main``, from a watcher thread the handler wakes through a pipe: writing a byte takes no lock a
signal handler could deadlock on), so it raises once the main thread is back in ordinary code. Inside
:func:`deferred` (a checkpoint being written) a signal is only remembered. A signal the process inherited as ignored
(``nohup``, a background job of a script) stays ignored throughout.
"""

from __future__ import annotations

import _thread
import contextlib
import gc
import os
import signal
import threading
import time
import weakref
from collections.abc import Iterator
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)

_received: str | None = None
_deferring = False
_closing = False  # the latch is being undone: a re-delivered signal is only remembered
_wake_fd: int | None = None  # the write end of the open latch's redelivery pipe
_owner = 0  # the process whose watcher reads that pipe (a forked child inherits the pipe, not the thread)

# Frames an exception cannot leave: Python reports it through sys.unraisablehook and carries on.
_FINALIZER_CODE = (weakref.finalize.__call__.__code__,)


def _unraisable(frame: FrameType | None) -> bool:
    """Whether ``frame`` runs inside a gc callback, a ``__del__`` or a weakref finalizer."""
    callbacks = {getattr(cb, "__code__", None) for cb in gc.callbacks}
    while frame is not None:
        code = frame.f_code
        if code.co_name == "__del__" or code in callbacks or code in _FINALIZER_CODE:
            return True
        frame = frame.f_back
    return False


def _handle(signum: int, frame: FrameType | None) -> None:
    global _received
    _received = signal.Signals(signum).name
    if _deferring or _closing:
        return
    if _unraisable(frame):
        if _wake_fd is not None and os.getpid() == _owner:
            os.write(_wake_fd, bytes([signum]))  # async-signal-safe: no lock to deadlock on
        return
    raise KeyboardInterrupt


def _redeliver(read_fd: int) -> None:
    """The watcher: each byte is a signal to deliver to the main thread again; 0 ends the latch."""
    while (signum := os.read(read_fd, 1)[0]) != 0:
        time.sleep(0.001)  # let the main thread leave the finalizer instead of spinning inside it
        _thread.interrupt_main(signum)  # a no-op once the signal's handler is no longer Python's


def taken(sig: signal.Signals) -> bool:
    """Whether convscale may handle ``sig``: not when the process was started with it ignored."""
    return signal.getsignal(sig) is not signal.SIG_IGN


@contextlib.contextmanager
def latched() -> Iterator[None]:
    """Remember SIGINT and SIGTERM for :func:`check` while the block runs (main thread only, and only the signals
    the process does not ignore)."""
    global _received, _closing, _wake_fd, _owner
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _received, _closing = None, False
    read_fd, _wake_fd = os.pipe()
    _owner = os.getpid()
    watcher = threading.Thread(target=_redeliver, args=(read_fd,), name="convscale-signals", daemon=True)
    watcher.start()
    previous = {sig: signal.signal(sig, _handle) for sig in SIGNALS if taken(sig)}
    try:
        yield
    finally:
        _closing = True  # from here a re-delivery, already on its way or not, is absorbed by _handle
        os.write(_wake_fd, b"\0")
        watcher.join()
        for sig, handler in previous.items():
            signal.signal(sig, handler)  # runs any pending handler first, while _handle is still installed
        os.close(read_fd)
        os.close(_wake_fd)
        _received, _closing, _wake_fd = None, False, None


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Within :func:`latched`: a signal arriving in the block is remembered (see :func:`received`), not raised, so
    the block (a checkpoint save) completes."""
    global _deferring
    outer, _deferring = _deferring, True
    try:
        yield
    finally:
        _deferring = outer


def received() -> str | None:
    """The name of the signal that arrived inside :func:`latched` (even if its ``KeyboardInterrupt`` was swallowed)."""
    return _received


def check() -> None:
    """Raise ``KeyboardInterrupt`` if a signal arrived, so a swallowed Ctrl-C still stops the work."""
    if _received:
        raise KeyboardInterrupt
