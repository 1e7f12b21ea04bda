"""Reliability under faults: a failed save ends the process, a foreign directory is never taken over, labels outside
the classifier are refused, writes never follow planted symlinks.

Training uses the engine tests' tiny setup (a small CNN on in-memory colours, 8 px); the processes that must exit
on their own run as subprocesses of ``tests/_engine_helpers.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    return env


def test_a_failed_checkpoint_save_ends_the_process(tmp_path: Path) -> None:
    # The step-8 save cannot create its directory (as a read-only checkpoints/ does; root ignores chmod, so the
    # failure is injected where Orbax creates it). Orbax's save threads then wait five minutes for a signal that
    # never comes, and the interpreter used to wait for them at exit.
    child = textwrap.dedent(
        f"""
        import os, sys
        sys.path.insert(0, {str(TESTS)!r})
        real = os.makedirs
        def makedirs(name, *args, **kwargs):
            if os.path.basename(str(name)).startswith("8.orbax-checkpoint-tmp"):
                raise PermissionError(13, "Permission denied", str(name))
            return real(name, *args, **kwargs)
        os.makedirs = makedirs
        import _engine_helpers
        sys.exit(_engine_helpers.main([{str(tmp_path / "run")!r}]))
        """
    )
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", child], env=_env(), capture_output=True, text=True, timeout=240
    )  # without the fix: no exit for 300 s after the error, so TimeoutExpired
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "saving a checkpoint at step 8 failed (PermissionError" in proc.stderr
    assert "the checkpoint of step 4 is intact" in proc.stderr
    assert time.monotonic() - start < 200
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["4"]
