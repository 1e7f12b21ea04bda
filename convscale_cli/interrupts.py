"""A Ctrl-C that cannot get lost between the runs of a study.

Python raises ``KeyboardInterrupt`` wherever the main thread is when SIGINT arrives. Raised inside a garbage-collection
callback (JAX frees device buffers in one) it is printed as "Exception ignored in ..." and dropped, and a sweep or the
quickstart went on to its end and exited 0. While :func:`latched` is active the signal is also remembered:
:func:`check` raises it again between units of work (each trial of a sweep, each step of the quickstart), and the
training loop, which takes SIGINT over to save and stop cleanly, stops at its first step if one arrived before it.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

_received = False


def _handle(signum: int, frame: Any) -> None:
    global _received
    _received = True
    raise KeyboardInterrupt


@contextlib.contextmanager
def latched() -> Iterator[None]:
    """Remember SIGINT for :func:`check` while the block runs (main thread only, and only where SIGINT is handled)."""
    global _received
    # A process told to ignore SIGINT (nohup, a background job of a script) keeps ignoring it.
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        yield
        return
    _received = False
    previous = signal.signal(signal.SIGINT, _handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _received = False


def received() -> bool:
    """Whether SIGINT arrived inside :func:`latched` (even if its ``KeyboardInterrupt`` was swallowed)."""
    return _received


def check() -> None:
    """Raise ``KeyboardInterrupt`` if SIGINT arrived, so a swallowed Ctrl-C still stops the work."""
    if _received:
        raise KeyboardInterrupt
