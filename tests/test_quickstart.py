"""The main job's pieces that can be checked in seconds (the job itself is the README's first command)."""

from __future__ import annotations

import json
from pathlib import Path

from convscale_cli import quickstart
from convscale_cli.sweep import load_study

REPO = Path(__file__).resolve().parents[1]


def test_the_packaged_study_is_the_documented_example() -> None:
    assert quickstart.default_study().read_text() == (REPO / "examples" / "quickstart.toml").read_text()


def test_the_packaged_study_is_a_valid_ladder_study() -> None:
    study = load_study(quickstart.default_study())
    assert study.dataset == "shapes" and study.rule == "two-trial"
    assert len(study.models) >= 3 and len(study.epochs) >= 3


def _summary(root: Path, name: str, kind: str, loss: float, flops: float, status: str = "finished") -> None:
    run = root / name
    run.mkdir(parents=True)
    doc = {
        "kind": kind, "status": status, "model": "nfnet-tiny-l0", "family": "nfnet", "dataset": "shapes",
        "epochs": 1.0, "lr": 1.6, "batch_size": 64, "params": 1, "macs_per_image": 1, "train_resolution": 32,
        "num_classes": 420, "examples_seen": 1, "final": {"eval_loss": loss}, "ledger": {"train_flops": flops},
    }  # fmt: skip
    (run / "summary.json").write_text(json.dumps(doc))


def test_best_run_and_largest_compute_are_read_from_the_summaries(tmp_path: Path) -> None:
    _summary(tmp_path, "a", "pretrain", 5.0, 1e9)
    _summary(tmp_path, "b", "pretrain", 4.0, 3e9)
    _summary(tmp_path, "c", "pretrain", 3.0, 5e9, status="budget")  # not finished: neither source nor budget base
    _summary(tmp_path, "d", "finetune", 0.1, 9e9)
    best = quickstart._best_pretrain_run(tmp_path)
    assert best.path.name == "b" and best.eval_loss == 4.0
    assert quickstart._largest_flops(tmp_path) == 3e9  # finished pre-training runs only
