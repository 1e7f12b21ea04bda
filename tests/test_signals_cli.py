"""A job scheduler's SIGTERM outside the training loop, sent to the real ``convscale`` process: it ends like Ctrl-C
(``Interrupted.``, exit 130), with no traceback and nothing half-written.

The in-process tests (tests/test_faults.py) send the signal at chosen points of the pipeline; this one checks what a
user sees from the console script while the run is still compiling.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _command(out: Path) -> list[str]:
    args = ["pretrain", "--model", "nfnet-test", "--dataset", "shapes", "--steps", "4", "--batch-size", "8"]
    return [sys.executable, "-m", "convscale_cli", *args, "--out", str(out)]


@pytest.mark.slow
def test_sigterm_during_start_up_exits_130_and_writes_nothing_half(tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.Popen(_command(out), env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    header = proc.stdout.readline()  # printed before anything compiles
    assert header.startswith("pretrain nfnet-test on shapes"), header
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, header + stderr[-3000:]
    assert stderr.strip().endswith("Interrupted.") and "Traceback" not in stderr, stderr[-3000:]
    leftovers = [p.name for p in (out / "checkpoints").iterdir()] if (out / "checkpoints").exists() else []
    assert not [name for name in leftovers if "tmp" in name] and not (out / "summary.json").exists()
    # The run directory stays this run's: the same command resumes it (tests/test_faults.py trains the rerun).
    metrics = out / "metrics.jsonl"
    assert (out / "config.json").is_file() and (not metrics.exists() or not metrics.read_text().strip())
