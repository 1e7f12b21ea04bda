"""SIGKILL a fine-tuning run with SAM, EMA, MixUp/CutMix, dropout and repeated augmentation, rerun the command, and
get bitwise the parameters, EMA and optimiser state of an uninterrupted run (fp32).

Runs are subprocesses of this file (``python tests/test_finetune_resume.py OUT FROM key=json ...``), so the kill is
a real SIGKILL of a process that may be anywhere in a step or a checkpoint save.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _engine_helpers as helpers
import numpy as np
import pytest

pytestmark = pytest.mark.slow
SETTINGS: dict[str, Any] = dict(
    steps=14, batch_size=8, precision="fp32", sam_rho=0.1, sam_fraction=0.5, ema_decay=0.9, drop_rate=0.2,
    mixup=0.2, cutmix=1.0, label_smoothing=0.1, repeat_aug=2, log_every=1, checkpoint_every=2, checkpoint_minutes=0.0,
    progress="none", tensorboard=False,
)  # fmt: skip


def _args(out: Path, pre: Path) -> list[str]:
    return [sys.executable, __file__, str(out), str(pre), *(f"{k}={json.dumps(v)}" for k, v in SETTINGS.items())]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1", **extra)
    return env


def _logged_step(out: Path) -> int:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
        return max((json.loads(line)["step"] for line in lines), default=0)
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def _state(out: Path) -> dict[str, np.ndarray]:
    import jax
    import orbax.checkpoint as ocp

    step = max(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    tree = ocp.PyTreeCheckpointer().restore(out / "checkpoints" / str(step) / "state")
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat}


def test_sigkill_then_rerun_is_bitwise_exact(tmp_path: Path) -> None:
    from convscale_cli.engine.api import pretrain

    pre = tmp_path / "pre"
    pretrain(helpers.config(pre, steps=4), helpers.registry())
    reference = tmp_path / "reference"
    done = subprocess.run(_args(reference, pre), env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    out = tmp_path / "killed"
    proc = subprocess.Popen(
        _args(out, pre),
        env=_env(CONVSCALE_TEST_STEP_DELAY="0.2"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    while _logged_step(out) < 7 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, f"run ended before the kill: {proc.stderr.read()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = _logged_step(out)
    assert 7 <= killed_at < SETTINGS["steps"] and not (out / "summary.json").exists()

    resumed = subprocess.run(_args(out, pre), env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads(resumed.stdout.strip().splitlines()[-1]) == {"status": "finished", "steps": SETTINGS["steps"]}
    expected, got = _state(reference), _state(out)
    assert any("['ema']" in key for key in expected) and set(got) == set(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(got[key], value, err_msg=f"{key} after a kill at step {killed_at}")
    summary = json.loads((out / "summary.json").read_text())
    reference_summary = json.loads((reference / "summary.json").read_text())
    assert summary["final_ema"] == reference_summary["final_ema"] and summary["final"] == reference_summary["final"]
    assert summary["ledger"]["examples"] == SETTINGS["steps"] * SETTINGS["batch_size"]


def main(argv: list[str]) -> int:
    """Script entry: fine-tune ``argv[1]`` (the pre-training run) into ``argv[0]`` with ``key=json`` settings."""
    from convscale_cli.finetune.api import finetune
    from convscale_cli.finetune.config import FinetuneConfig

    settings = {k: json.loads(v) for k, v in (a.split("=", 1) for a in argv[2:])}
    config = FinetuneConfig(pretrained=argv[1], dataset="colours", out=argv[0], **settings)
    return helpers.run_child(lambda registry, pipeline: finetune(config, registry, pipeline=pipeline))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
