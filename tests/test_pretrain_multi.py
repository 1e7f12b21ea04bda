"""Pre-training across processes and device counts: SIGKILL-resume exactness, 1 vs 4 devices, 2 processes.

Each run is a subprocess of ``tests/_engine_helpers.py`` (tiny CNN, 8 px, fp32) with its own ``XLA_FLAGS``, since the
device count is fixed when jax starts.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _engine_helpers as helpers
import numpy as np
import pytest

pytestmark = pytest.mark.slow
SCRIPT = Path(helpers.__file__)


def _env(devices: int, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **extra)
    return env


def _args(out: Path, **overrides: Any) -> list[str]:
    return [sys.executable, str(SCRIPT), str(out), *(f"{k}={json.dumps(v)}" for k, v in overrides.items())]


def _run(out: Path, devices: int = 1, **overrides: Any) -> dict[str, Any]:
    proc = subprocess.run(_args(out, **overrides), env=_env(devices), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _train_losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


def _logged_step(out: Path) -> int:
    try:
        return max(_train_losses(out), default=0)
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def test_sigkill_at_random_points_then_resume_is_bitwise_exact(tmp_path: Path) -> None:
    settings = dict(steps=30, log_every=1, checkpoint_every=3)
    reference = tmp_path / "reference"
    assert _run(reference, **settings)["status"] == "finished"
    out = tmp_path / "killed"
    rng = random.Random(5)
    kills = []
    for low, high in ((3, 12), (14, 25)):
        target = rng.randint(low, high)
        proc = subprocess.Popen(
            _args(out, **settings), env=_env(1, CONVSCALE_TEST_STEP_DELAY="0.15"),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 240
        while _logged_step(out) < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, f"run ended before the kill at step {target}: {proc.stderr.read()[-2000:]}"
        time.sleep(rng.uniform(0.0, 0.3))  # anywhere in the step, possibly mid-save
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills.append(_logged_step(out))
    assert all(k < 30 for k in kills), kills  # each kill landed before the end of the run
    summary = _run(out, **settings)
    assert summary == {"status": "finished", "steps": 30}
    expected, got = helpers.final_params(reference), helpers.final_params(out)
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        np.testing.assert_array_equal(got[key], value, err_msg=f"{key} after kills at steps {kills}")
    ledger = json.loads((out / "summary.json").read_text())["ledger"]
    assert ledger["device_seconds"]["lost"] > 0  # the work between the last checkpoint and each kill is charged
    assert ledger["examples"] == 30 * 16


def test_four_devices_with_fsdp_match_one_device_and_resume_on_another_count(tmp_path: Path) -> None:
    settings: dict[str, Any] = dict(steps=12, log_every=1, model_options={"width": 32})
    one = tmp_path / "one"
    _run(one, devices=1, **settings)
    four = tmp_path / "four"
    per_step = 6 * helpers.count_tiny(8, 4).macs * 16
    stopped = _run(four, devices=4, fsdp=True, budget=f"{5.5 * per_step}-flops", **settings)
    assert stopped["status"] == "budget" and 0 < stopped["steps"] < 12
    # Resume the 4-device FSDP checkpoint on 1 device (replicated) and finish the run.
    assert _run(four, devices=1, **settings) == {"status": "finished", "steps": 12}
    reference, resumed = _train_losses(one), _train_losses(four)
    assert sorted(resumed) == list(range(1, 13))
    np.testing.assert_allclose([resumed[s] for s in range(1, 13)], [reference[s] for s in range(1, 13)], rtol=2e-4)
    ref_summary = json.loads((one / "summary.json").read_text())
    summary = json.loads((four / "summary.json").read_text())
    assert summary["final"]["eval_loss"] == pytest.approx(ref_summary["final"]["eval_loss"], rel=2e-4)


def test_indivisible_batch_on_four_devices_is_a_usage_error(tmp_path: Path) -> None:
    proc = subprocess.run(
        _args(tmp_path / "bad", batch_size=6), env=_env(4), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2
    assert "batch size 6 is not divisible by 4 devices" in proc.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_processes(out: Path, **overrides: Any) -> list[dict[str, Any]]:
    port = _free_port()
    # Output goes to files, not pipes: a process whose pipe nobody drains while the test waits on the other one would
    # block mid-run and leave its peer waiting at a collective.
    logs = [(tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")) for _ in range(2)]
    procs = [
        subprocess.Popen(
            _args(out, coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=i, **overrides),
            env=_env(1),
            stdout=stdout,
            stderr=stderr,
            text=True,
        )  # fmt: skip
        for i, (stdout, stderr) in enumerate(logs)
    ]
    for proc in procs:
        proc.wait(timeout=300)
    outputs = []
    for files in logs:
        for f in files:
            f.seek(0)
        outputs.append(tuple(f.read() for f in files))
        for f in files:
            f.close()
    failed = [f"process {i}: {outputs[i][1][-2000:]}" for i, proc in enumerate(procs) if proc.returncode]
    assert not failed, "\n".join(failed)
    return [json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in outputs]


def test_two_processes_train_checkpoint_and_resume(tmp_path: Path) -> None:
    out = tmp_path / "two"
    per_step = 6 * helpers.count_tiny(8, 4).macs * 16
    first = _run_two_processes(out, budget=f"{5.5 * per_step}-flops")
    assert [r["status"] for r in first] == ["budget", "budget"] and first[0]["steps"] == 6
    assert _run_two_processes(out) == [{"status": "finished", "steps": 12}] * 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ledger"]["num_devices"] == 2 and summary["examples_seen"] == 192
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)  # one writer (process 0), no duplicated records
