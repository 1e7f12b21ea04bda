"""The one reader of a runs directory: its status, kind and depth filters, and the commands that share it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from convscale_cli.errors import UsageError
from convscale_cli.report.runs import load_runs as report_runs
from convscale_cli.runs_dir import COMPLETE, FINISHED, RunWarning, infer_dataset, load_runs, scan_runs
from convscale_cli.sweep import study_compute


def _write(root: Path, name: str, **extra: Any) -> None:
    """A ``summary.json`` with the fields both the report and the two-trial rule read."""
    summary = {
        "kind": "pretrain", "status": "finished", "model": "f0", "family": "nfnet", "dataset": "jft", "epochs": 1.0,
        "lr": 1.6, "batch_size": 64, "seed": 0, "params": 1000, "macs_per_image": 10000, "train_resolution": 32,
        "num_classes": 10, "examples_seen": 1000, "final": {"eval_loss": 2.0, "eval_top1": 0.5},
        "ledger": {"train_flops": 6e7, "core_hours": 1e-9}, **extra,
    }  # fmt: skip
    run = root / name
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps(summary))


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    """A finished run, a budget-stopped run, a nested run, a paused trunk, a failed run, a fine-tune, a deep run."""
    root = tmp_path / "runs"
    _write(root, "done")
    _write(root, "stopped", status="budget", epochs=0.5)
    _write(root, "sweep/nested", model="f1")
    _write(root, "trunks/f0-e4-lr1.6", status="paused")
    _write(root, "failed", status="failed")
    _write(root, "ft", kind="finetune", pretrain={"run": "done", "core_hours": 1e-9})
    _write(root, "a/b/c/deep", model="f3")  # four levels down
    (root / "crashed").mkdir()
    (root / "crashed" / "config.json").write_text("{}")
    return root


def _names(root: Path, **filters: Any) -> list[str]:
    return [run.name for run in scan_runs(root, **filters)[0]]


def test_each_filter_keeps_the_documented_runs(runs: Path) -> None:
    assert _names(runs, statuses=FINISHED, kinds=("pretrain",), max_depth=1) == ["done"]
    assert _names(runs, statuses=COMPLETE, kinds=("pretrain",), max_depth=1) == ["done", "stopped"]
    assert _names(runs, kinds=("pretrain",)) == ["done", "stopped", "sweep/nested"]  # COMPLETE, three levels
    assert _names(runs) == ["done", "ft", "stopped", "sweep/nested"]
    assert _names(runs, max_depth=4) == ["a/b/c/deep", "done", "ft", "stopped", "sweep/nested"]
    assert _names(runs, statuses=None, max_depth=2) == ["done", "failed", "ft", "stopped", "sweep/nested",
                                                        "trunks/f0-e4-lr1.6"]  # fmt: skip
    # Another status and a directory without a summary are listed with the reason; a paused trunk is not.
    skipped = {s.path: s.reason for s in scan_runs(runs, statuses=FINISHED)[1]}
    assert skipped == {
        "crashed": "no summary.json (unfinished or crashed run)",
        "failed": "status 'failed' is not one of finished",
        "stopped": "status 'budget' is not one of finished",
    }


def test_the_reader_refuses_what_is_no_runs_directory(runs: Path) -> None:
    with pytest.raises(UsageError, match="single run directory"):
        scan_runs(runs / "done")
    with pytest.raises(UsageError, match="does not exist"):
        scan_runs(runs / "nothing")
    with pytest.raises(UsageError, match="`max_depth` must be >= 1"):
        scan_runs(runs, max_depth=0)


def test_report_tuning_and_the_sweep_read_the_same_runs(runs: Path) -> None:
    """``report``/``plan --from`` and ``tune-lr``/``sweep``/the quickstart once disagreed on this directory (three
    pre-training runs against one: finished only, one level)."""
    reported, skipped = report_runs(runs)
    pretrain = sorted(r.name for r in reported if r.kind == "pretrain")
    tuned = sorted(r.path.relative_to(runs).as_posix() for r in load_runs(runs))
    assert pretrain == tuned == ["done", "stopped", "sweep/nested"]
    assert {s.path for s in skipped} == {"crashed", "failed"}
    assert infer_dataset(runs) == "jft"
    (runs / "broken").mkdir()
    (runs / "broken" / "summary.json").write_text("{half a summ")  # a summary being written by another worker
    with pytest.warns(RunWarning, match="broken: summary.json is not valid JSON"):
        assert len(load_runs(runs)) == 3
    # The sweep's compute counts every run with a summary, of any status, each trunk once.
    spent = study_compute(runs)
    assert (spent.runs, spent.trunks) == (6, 1)
