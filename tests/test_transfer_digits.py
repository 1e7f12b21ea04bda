"""The fine-tuning demonstration, as the quickstart runs it: pre-training on `shapes` helps the real digits.

One quickstart study run (nfnet-tiny-l2, one pass over 16,384 `shapes` images, the study's own engine settings) is
fine-tuned on scikit-learn's handwritten digits with the quickstart's fine-tuning settings, and the same architecture
is trained on digits from a random initialisation with the same recipe and compute. The pre-trained model must reach
97% top-1 on the held-out split and beat the one trained from scratch (seeds 0-2 are in docs/benchmarks.md, "Transfer
to digits"). It runs in a child process on one CPU device, as the quickstart does on a laptop: the suite's four
emulated devices would make it half again as slow. About 100 s on the 2-core CI machine with an empty compile cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

MODEL = "nfnet-tiny-l2"  # the quickstart's lowest-loss run
EPOCHS = 1.0
ALPHA = 25.6  # the alpha the two-trial rule keeps for this cell


def demonstrate(out: Path) -> dict[str, float]:
    """Pre-train the quickstart's best cell, then the quickstart's own fine-tune and from-scratch runs."""
    from convscale_cli import quickstart
    from convscale_cli.finetune.api import finetune
    from convscale_cli.sweep import load_study, trainer_options
    from convscale_cli.tuning import engine_trainer

    study = load_study(quickstart.default_study())
    options = trainer_options(study) | {"eval_examples": 256, "checkpoint_every": 0, "progress": "none"}
    engine_trainer(MODEL, study.dataset, EPOCHS, ALPHA, out / "pre", **options)
    top1 = {}
    for name in ("ft", "scratch"):
        summary = finetune(quickstart.FinetuneSettings().config(out / "pre", out / name, scratch=name == "scratch"))
        top1[name] = float(summary["final"]["eval_top1"])
    return top1


def test_shapes_pretraining_beats_scratch_on_digits(tmp_path: Path) -> None:
    env: dict[str, Any] = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    child = subprocess.run(
        [sys.executable, __file__, str(tmp_path)], env=env, capture_output=True, text=True, timeout=900, check=False
    )
    assert child.returncode == 0, child.stderr[-3000:]
    top1 = json.loads(child.stdout.splitlines()[-1])
    ft, scratch = top1["ft"], top1["scratch"]
    assert ft >= 0.97, f"fine-tuned {ft:.2%} on digits, below 97%"
    assert ft > scratch, f"fine-tuned {ft:.2%} is no better than {scratch:.2%} from scratch"


if __name__ == "__main__":
    print(json.dumps(demonstrate(Path(sys.argv[1]))))
