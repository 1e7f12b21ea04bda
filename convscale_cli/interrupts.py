"""A Ctrl-C or SIGTERM that cannot get lost, and never cuts a checkpoint save short.

Python raises ``KeyboardInterrupt`` wherever the main thread is when SIGINT arrives. Raised inside a garbage-collection
callback (JAX frees device buffers in one) it is printed as "Exception ignored in ..." and dropped, and a sweep or the
quickstart went on to its end and exited 0. While :func:`latched` is active SIGINT and SIGTERM both raise
``KeyboardInterrupt`` (so a job scheduler's SIGTERM during start-up or the final evaluation ends the command with
exit code 130 instead of killing it mid-write) and are remembered: :func:`check` raises again between units of work
(each trial of a sweep, each step of the quickstart), and the training loop, which takes the signals over to save and
stop cleanly, stops at its first step if one arrived before it. Inside :func:`deferred` (a checkpoint being written)
a signal is only remembered. A signal the process inherited as ignored (``nohup``, a background job of a script)
stays ignored throughout.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)

_received: str | None = None
_deferring = False


def _handle(signum: int, frame: Any) -> None:
    global _received
    _received = signal.Signals(signum).name
    if not _deferring:
        raise KeyboardInterrupt


def taken(sig: signal.Signals) -> bool:
    """Whether convscale may handle ``sig``: not when the process was started with it ignored."""
    return signal.getsignal(sig) is not signal.SIG_IGN


@contextlib.contextmanager
def latched() -> Iterator[None]:
    """Remember SIGINT and SIGTERM for :func:`check` while the block runs (main thread only, and only the signals
    the process does not ignore)."""
    global _received
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _received = None
    previous = {sig: signal.signal(sig, _handle) for sig in SIGNALS if taken(sig)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _received = None


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
