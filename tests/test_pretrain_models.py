"""The built-in tiny NFNet and ViT pre-train on `shapes` with the engine and their family recipes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from convscale_cli.engine.api import pretrain
from convscale_cli.engine.config import PretrainConfig


@pytest.mark.slow  # 128 steps of 64 images and 8 evaluations of 512, per model
@pytest.mark.parametrize(("model", "lr"), [("nfnet-test", 51.2), ("vit-test", 0.1)])
def test_tiny_models_lower_the_held_out_loss_on_shapes(model: str, lr: float, tmp_path: Path) -> None:
    config = PretrainConfig(
        model=model,
        dataset="shapes",
        out=str(tmp_path / model),
        data_options={"size": 4096, "eval_size": 512, "clutter": 0.0},
        augment={"min_area": 0.35},
        epochs=2.0,
        batch_size=64,
        lr=lr,  # alpha at batch 4096 (AdamW for the ViT, SGD + AGC for the NFNet)
        precision="fp32",
        eval_every=64,
        progress="none",
    )
    summary = pretrain(config)
    assert summary["status"] == "finished" and summary["steps"] == 128
    records = [json.loads(line) for line in (tmp_path / model / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    chance = math.log(420)
    assert len(evals) >= 2 and evals[-1] < evals[0] < chance, f"{model}: held-out losses {evals} (chance {chance:.3f})"
    assert summary["ledger"]["train_flops"] > 0 and summary["ledger"]["core_hours"] > 0
