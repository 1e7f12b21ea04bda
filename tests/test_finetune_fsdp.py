"""Fine-tuning on the shared engine's FSDP layout: 4 devices with sharded parameters match 1 device, step by step.

Each run is a subprocess (the device count is fixed when jax starts) of this file: a tiny CNN (width 32, so its
convolution kernels are large enough to be sharded) is pre-trained once, then fine-tuned with SAM on the whole batch
(the ascent rows then do not depend on the device count), EMA, MixUp/CutMix, dropout and label smoothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import _engine_helpers as helpers
import numpy as np
import pytest

pytestmark = pytest.mark.slow
SETTINGS: dict[str, Any] = dict(
    steps=6, batch_size=8, precision="fp32", sam_rho=0.1, sam_fraction=1.0, ema_decay=0.9, drop_rate=0.2,
    mixup=0.2, cutmix=1.0, label_smoothing=0.1, log_every=1, checkpoint_every=3, checkpoint_minutes=0.0,
    progress="none", tensorboard=False,
)  # fmt: skip


def _env(devices: int) -> dict[str, str]:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def _child(args: list[str], devices: int) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, *args], env=_env(devices), capture_output=True, text=True, timeout=600
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


def test_fsdp_on_four_devices_matches_one_device(tmp_path: Path) -> None:
    pre = tmp_path / "pre"
    assert _child([helpers.__file__, str(pre), "steps=4", 'model_options={"width": 32}'], 1)["status"] == "finished"
    one, four = tmp_path / "one", tmp_path / "four"
    assert _child([__file__, str(one), str(pre), "fsdp=false"], 1) == {"status": "finished", "steps": 6, "sharded": 0}
    fsdp = _child([__file__, str(four), str(pre), "fsdp=true"], 4)
    assert fsdp["status"] == "finished" and fsdp["sharded"] > 0  # some parameters really are split over devices
    reference, sharded = _losses(one), _losses(four)
    assert sorted(sharded) == list(range(1, 7))
    np.testing.assert_allclose([sharded[s] for s in range(1, 7)], [reference[s] for s in range(1, 7)], rtol=2e-4)
    ref_summary, summary = (json.loads((out / "summary.json").read_text()) for out in (one, four))
    assert summary["config"]["fsdp"] is True and summary["ledger"]["num_devices"] == 4
    for key in ("final", "final_ema"):
        assert summary[key]["eval_loss"] == pytest.approx(ref_summary[key]["eval_loss"], rel=2e-4)


def main(argv: list[str]) -> int:
    """Child: fine-tune the run ``argv[1]`` into ``argv[0]`` with ``key=value`` (JSON values) overrides; print the
    status, the steps and how many parameter arrays the engine laid out split over devices."""
    import jax

    from convscale_cli.engine import trainer
    from convscale_cli.finetune.api import finetune
    from convscale_cli.finetune.config import FinetuneConfig

    overrides = {k: json.loads(v) for k, v in (a.split("=", 1) for a in argv[2:])}
    config = FinetuneConfig(pretrained=argv[1], dataset="colours", out=argv[0], **SETTINGS, **overrides)
    sharded: list[int] = []
    build = trainer.build

    def recording_build(run: Any, **kwargs: Any) -> Any:
        built = build(run, **kwargs)
        specs = [s.spec for s in jax.tree_util.tree_leaves(built.shardings.params)]
        sharded.append(sum(1 for spec in specs if any(axis is not None for axis in spec)))
        return built

    trainer.build = recording_build
    summary = finetune(config, helpers.registry())
    print(json.dumps({"status": summary["status"], "steps": summary["steps"], "sharded": sharded[0]}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
