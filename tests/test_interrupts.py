"""A signal that arrives where Python cannot raise (a gc callback, a ``__del__``) is neither printed nor lost."""

from __future__ import annotations

import gc
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest

from convscale_cli import interrupts


@pytest.fixture
def unraisable(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """What Python would print as "Exception ignored in ...": collected instead."""
    seen: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    return seen


def _wait_for_the_interrupt(seconds: float = 2.0) -> None:
    """Python code running on after the signal: a re-delivered signal interrupts it."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.001)


def _signal_in_gc_callback(sig: signal.Signals) -> Callable[[], None]:
    def trigger() -> None:
        armed = [True]

        def callback(phase: str, info: dict[str, int]) -> None:
            if phase == "start" and armed:
                armed.clear()
                signal.raise_signal(sig)

        gc.callbacks.append(callback)
        try:
            gc.collect()
        finally:
            gc.callbacks.remove(callback)

    return trigger


def _signal_in_del(sig: signal.Signals) -> Callable[[], None]:
    class Freed:
        def __del__(self) -> None:
            signal.raise_signal(sig)

    def trigger() -> None:
        Freed()  # freed at once: __del__ runs here

    return trigger


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("where", [_signal_in_gc_callback, _signal_in_del], ids=["gc-callback", "__del__"])
def test_a_signal_where_python_cannot_raise_is_raised_after_it(
    terminal_signals: None, unraisable: list[Any], sig: signal.Signals, where: Any
) -> None:
    trigger = where(sig)
    with pytest.raises(KeyboardInterrupt), interrupts.latched():
        trigger()
        assert interrupts.received() == sig.name  # remembered at once, for check() and the training loop
        _wait_for_the_interrupt()
    assert unraisable == []


def test_a_signal_raised_in_plain_code_interrupts_at_once(terminal_signals: None, unraisable: list[Any]) -> None:
    with pytest.raises(KeyboardInterrupt), interrupts.latched():
        signal.raise_signal(signal.SIGTERM)
        pytest.fail("the signal did not interrupt")  # pragma: no cover
    assert unraisable == []


def test_a_signal_remembered_in_a_gc_callback_is_not_redelivered_after_the_latch(
    terminal_signals: None, unraisable: list[Any]
) -> None:
    """The work ended (check() raised) before the re-delivery: the process must not then die of SIG_DFL."""
    trigger = _signal_in_gc_callback(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), interrupts.latched():
        trigger()
        interrupts.check()
    _wait_for_the_interrupt(0.2)  # still alive: the re-delivery saw the latch closed
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and unraisable == []


def test_deferred_only_remembers(terminal_signals: None) -> None:
    with interrupts.latched():
        with interrupts.deferred():
            signal.raise_signal(signal.SIGTERM)
        assert interrupts.received() == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            interrupts.check()
    assert interrupts.received() is None
