"""Fine-tuning from weights imported from timm: ``import-weights`` then ``finetune --from WEIGHTS``.

timm's ``vit_tiny_patch16_224`` with its own random initialisation (no download) is saved as safetensors, imported
as ``vit-ti/16`` with its 1000-way head, and fine-tuned on the tiny ``colours`` dataset at 16 px with evaluation at
32 px: the classifier is replaced by a 4-way one and the 14 x 14 position-embedding grid is resampled by the ViT
module to 1 x 1 for training and 2 x 2 for evaluation (the paper's train-low / evaluate-high recipe, §3). SAM is
off here only to halve the compile time of a 12-block model; SAM and EMA are covered by test_finetune*.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import _engine_helpers as helpers
import numpy as np
import pytest

from convscale_cli import plugins as plugin_loader
from convscale_cli.cli import main
from convscale_cli.errors import ExitCode

pytestmark = pytest.mark.slow


def test_finetune_from_imported_timm_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from _timm import import_timm
    from safetensors.numpy import save_file

    timm = import_timm()
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    file = tmp_path / "vit_tiny.safetensors"
    save_file({k: v.detach().numpy().copy() for k, v in model.state_dict().items()}, str(file))

    # The installed plugins (vit-ti/16 among them) plus the in-memory colours dataset.
    loaded = plugin_loader.load_plugins(extra=[("colours", helpers.TinyPlugin())])
    plugin_loader.use_plugins(loaded)
    weights = tmp_path / "weights"
    assert main(["import-weights", "timm", "vit_tiny_patch16_224", str(file), "--out", str(weights)]) == ExitCode.OK
    capsys.readouterr()

    out = tmp_path / "ft"
    argv = [
        "finetune", "--from", str(weights), "--model", "vit-ti/16", "--dataset", "colours", "--out", str(out),
        "--steps", "2", "--batch-size", "8", "--resolution", "16", "--eval-resolution", "32", "--precision", "fp32",
        "--lr", "0.001", "--sam-rho", "0", "--set", "progress=none", "--set", "tensorboard=false", "--json",
    ]  # fmt: skip
    code = main(argv)
    stdout, err = capsys.readouterr()
    assert code == ExitCode.OK, err
    summary: dict[str, Any] = json.loads(stdout)
    assert (summary["kind"], summary["model"], summary["num_classes"], summary["steps"]) == (
        "finetune", "vit-ti/16", helpers.CLASSES, 2)  # fmt: skip
    assert summary["pretrain"]["kind"] == "weights" and summary["pretrain"]["run"] is None
    assert summary["pretrain"]["num_classes"] == 1000 and summary["pretrain"]["core_hours"] is None
    assert summary["pretrain"]["source"]["kind"] == "timm"
    assert summary["pretrain"]["source"]["model"] == "vit_tiny_patch16_224"
    assert (summary["train_resolution"], summary["eval_resolution"]) == (16, 32)
    for block in (summary["final"], summary["final_ema"]):
        assert np.isfinite(block["eval_loss"]) and 0.0 <= block["eval_top1"] <= 1.0
    # The position-embedding table keeps its imported 14 x 14 (+ class token) grid; only its use is resampled.
    assert summary["config"]["model_options"]["resolution"] == 224
