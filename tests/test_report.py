"""``convscale report`` end to end on fabricated run directories, and every kind of bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from convscale_cli.cli import main
from convscale_cli.errors import UsageError
from convscale_cli.report import build_report
from convscale_cli.report.analysis import Cell, backtest, best_cells, frontier
from convscale_cli.report.runs import load_runs, select_dataset

MODELS = {"f0": (7.1e7, 9.6e9), "f1": (1.3e8, 1.75e10), "f3": (2.5e8, 3.3e10)}
PER_EPOCH = 1.0e6
CORE_HOUR_PER_FLOP = 1e-18  # any fixed conversion: the report reads core_hours as written


def summary(
    model: str = "f0",
    epochs: float = 1.0,
    lr: float = 1.6,
    *,
    family: str = "nfnet",
    dataset: str = "jft",
    **extra: Any,
) -> dict[str, Any]:
    """A summary.json as the engine writes it, with a loss following a known law and a quadratic lr penalty."""
    params, macs = MODELS[model.rsplit("-", 1)[-1]]
    examples = epochs * PER_EPOCH
    best_lr = 1.6 / 2 ** math.log2(epochs / 0.5) if epochs > 0.5 else 1.6
    loss = 1.8 + 80 / params**0.3 + 300 / examples**0.28 + 0.02 * math.log2(lr / best_lr) ** 2
    flops = 6 * macs * examples
    data = {
        "kind": "pretrain",
        "status": "finished",
        "model": model,
        "family": family,
        "dataset": dataset,
        "epochs": epochs,
        "lr": lr,
        "batch_size": 4096,
        "seed": 0,
        "params": params,
        "macs_per_image": macs,
        "train_resolution": 224,
        "eval_resolution": 256,
        "num_classes": 100,
        "examples_seen": examples,
        "steps": int(examples // 4096),
        "final": {"eval_loss": loss, "eval_top1": 0.5, "eval_top5": 0.8},
        "ledger": {"train_flops": flops, "core_hours": flops * CORE_HOUR_PER_FLOP},
        "config": {},
        "versions": {},
    }
    data.update(extra)
    return data


def write(root: Path, name: str, content: dict[str, Any] | str) -> Path:
    run = root / name
    run.mkdir(parents=True, exist_ok=True)
    (run / "summary.json").write_text(content if isinstance(content, str) else json.dumps(content))
    return run


def study(root: Path, *, family: str = "nfnet", dataset: str = "jft", prefix: str = "") -> Path:
    """3 models x 4 epoch budgets x 3 learning rates; ``prefix`` renames the models (a second family)."""
    for model in MODELS:
        for epochs in (0.5, 1.0, 2.0, 4.0):
            for lr in (0.4, 0.8, 1.6):
                write(
                    root,
                    f"{prefix}{model}-e{epochs}-lr{lr}",
                    summary(prefix + model, epochs, lr, family=family, dataset=dataset),
                )
    return root


def test_load_runs_skips_and_lists_bad_run_dirs(tmp_path: Path) -> None:
    write(tmp_path, "good", summary())
    write(tmp_path, "broken", "{not json")
    (tmp_path / "crashed").mkdir()
    (tmp_path / "crashed" / "config.json").write_text("{}")
    write(tmp_path, "failed", summary(status="failed"))
    incomplete = summary()
    del incomplete["final"]
    write(tmp_path, "incomplete", incomplete)
    write(tmp_path, "negative", summary(params=-1))
    runs, skipped = load_runs(tmp_path)
    assert [r.name for r in runs] == ["good"]
    reasons = {s.path: s.reason for s in skipped}
    assert set(reasons) == {"broken", "crashed", "failed", "incomplete", "negative"}
    assert "not valid JSON" in reasons["broken"]
    assert "no summary.json" in reasons["crashed"]
    assert "status 'failed'" in reasons["failed"]
    assert "final" in reasons["incomplete"]
    assert "params must be > 0" in reasons["negative"]


def test_load_runs_falls_back_to_train_flops(tmp_path: Path) -> None:
    from convscale_cli.budget import flops_to_core_hours

    data = summary()
    data["ledger"] = {"train_flops": 1e18}
    write(tmp_path, "sweep/nested", data)
    runs, _ = load_runs(tmp_path)
    assert runs[0].name == "sweep/nested"
    assert runs[0].core_hours == pytest.approx(flops_to_core_hours(1e18))


@pytest.mark.parametrize("layout", ["missing", "file", "empty", "foreign"])
def test_bad_runs_dir_is_a_usage_error(tmp_path: Path, layout: str, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "runs"
    if layout == "file":
        target.write_text("x")
    elif layout == "empty":
        target.mkdir()
    elif layout == "foreign":
        (target / "photos" / "2024").mkdir(parents=True)
        (target / "notes.txt").write_text("hello")
    with pytest.raises(UsageError):
        load_runs(target)
    code = main(["report", str(target), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("Error: ") and err.count("\n") == 1


def test_a_single_run_dir_is_a_usage_error(tmp_path: Path) -> None:
    run = write(tmp_path, "one", summary())
    with pytest.raises(UsageError, match="single run directory"):
        load_runs(run)


def test_only_broken_runs_is_a_usage_error(tmp_path: Path) -> None:
    write(tmp_path, "broken", "[]")
    with pytest.raises(UsageError, match="no usable runs .*not a JSON object"):
        build_report(tmp_path, tmp_path / "out")


def test_mixed_datasets_need_a_choice(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path, "a", summary(dataset="jft"))
    write(tmp_path, "b", summary(dataset="shapes"))
    write(tmp_path, "ft", summary(kind="finetune", dataset="digits", pretrain={"run": "b", "core_hours": 1.0}))
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "pick one with --dataset" in capsys.readouterr().err
    runs, _ = load_runs(tmp_path)
    chosen = select_dataset(runs, "shapes")
    assert sorted(r.name for r in chosen) == ["b", "ft"]  # the fine-tune follows its pre-training run
    with pytest.raises(UsageError, match="no pre-training runs on dataset 'shape': did you mean 'shapes'"):
        select_dataset(runs, "shape")
    with pytest.raises(UsageError, match="no pre-training runs on dataset 'digits': the runs are on jft, shapes"):
        select_dataset(runs, "digits")  # a registered dataset: only its runs are missing


def test_report_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = study(tmp_path / "runs")
    study(runs, family="vit", prefix="vit-")
    write(runs, "bad", "{")
    write(
        runs,
        "ft-f3",
        summary(
            "f3",
            4.0,
            kind="finetune",
            dataset="digits",
            pretrain={"run": "f3-e4.0-lr0.4", "core_hours": 5.0},
            final_ema={"eval_top1": 0.91},
        ),
    )
    decision = {
        "model": "f0",
        "dataset": "jft",
        "epochs": 1.0,
        "rule": "two-trial",
        "start_lr": 1.6,
        "source": "recipe default",
        "trials": [{"lr": 1.6}, {"lr": 0.8}],
        "best_lr": 0.8,
        "next_lr": 0.4,
    }
    (runs / "tuning.jsonl").write_text(json.dumps(decision) + "\n{broken\n")
    out = tmp_path / "out"
    code = main(["report", str(runs), "--out", str(out), "--bootstrap", "100", "--parametric-bootstrap", "3"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert str(out / "report.html") in printed and "(log_log_law)" in printed
    for name in (
        "report.md",
        "report.html",
        "fit.json",
        "loss_vs_compute.png",
        "compute_optimal.png",
        "lr_vs_epochs.png",
        "backtest.png",
        "finetune.png",
        "families.png",
    ):
        assert (out / name).stat().st_size > 0, name
    assert (out / "loss_vs_compute.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 6
    assert "http://" not in html and "https://" not in html and "<link" not in html and "<script" not in html
    assert "ViT-G/14" in html and "90.45" in html
    result = json.loads((out / "fit.json").read_text())
    findings = ["log_log_law", "scale_together", "lr_falls", "families_match"]
    assert [v["finding"] for v in result["verdicts"]] == findings
    assert result["verdicts"][2]["status"] == "supported"
    # Identical synthetic families: the ConvNet is within 5% of the ViT at every matched compute.
    assert result["verdicts"][3]["status"] == "supported" and "(families_match) supported: within" in printed
    assert result["skipped"] == [{"path": "bad", "reason": result["skipped"][0]["reason"]}]
    assert result["finetune"]["points"][0]["top1"] == pytest.approx(91.0)
    assert set(result["families"]["families"]) == {"nfnet", "vit"}
    assert result["families"]["matched"], "identical synthetic families overlap in compute"
    assert result["parametric"]["n"] == len(result["cells"]) == 24
    above_one = [c for c in result["frontier"] if c["epochs"] > 1]
    assert result["compute_optimal"]["epochs_above_one_from"] == above_one[0]["core_hours"]
    assert result["tuning"]["unreadable_lines"] == 1 and result["tuning"]["decisions"][0]["best_lr"] == 0.8
    markdown = (out / "report.md").read_text()
    assert "| run | kind |" in markdown and "| f0 | 1 | two-trial | 1.6 (recipe default) | 1.6, 0.8 | 0.8 |" in markdown
    assert "1 run directory skipped" in markdown


def test_report_json_flag_and_macs_axis(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    study(tmp_path / "runs")
    args = [
        "report",
        str(tmp_path / "runs"),
        "--json",
        "--size",
        "macs",
        "--bootstrap",
        "20",
        "--parametric-bootstrap",
        "0",
    ]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["parametric"]["size_axis"] == "macs"
    assert all(row["continuous_macs"] > 0 for row in result["compute_optimal"]["predicted"])
    assert Path(result["files"]["fit_json"]).parent == tmp_path / "runs" / "report"
    assert main([*args[:-6], "--size", "flops"]) == 2
    assert "unknown size axis 'flops'" in capsys.readouterr().err


def _exact_cells(fraction_noise: float = 0.0) -> list[Cell]:
    """Cells whose frontier is exactly L = 5 * C**-0.1 (one model per compute, so every cell is on the frontier)."""
    cells = []
    for i, compute in enumerate([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0]):
        cells.append(
            Cell(f"m{i}", "nfnet", 1.0, 1.6, 5.0 * compute**-0.1, compute, 1e6 * (i + 1), 1e9, 1e6 * compute, (1.6,), 1)
        )
    return cells


def test_backtest_predicts_held_out_cells_of_an_exact_law() -> None:
    cells = _exact_cells()
    assert frontier(cells) == cells
    result = backtest(cells, holdout_fraction=0.2)
    assert result["held_out"] == 2 and result["trained_on"] == 8
    assert result["threshold_core_hours"] == 256.0
    for row in result["rows"]:
        assert row["on_frontier"]
        assert row["power_law"] == pytest.approx(row["observed"], rel=1e-9)
    assert result["power_law_error"] == pytest.approx(0.0, abs=1e-9)
    assert result["parametric_error"] is not None


def test_backtest_error_measures_a_bend_in_the_law() -> None:
    cells = _exact_cells()
    bent = [*cells[:-2], *(Cell(**{**c.__dict__, "loss": c.loss * 1.1}) for c in cells[-2:])]
    result = backtest(bent, holdout_fraction=0.2)
    # Observed = 1.1 * law and the refit recovers the law exactly: relative error 0.1 / 1.1 on every held-out cell.
    assert result["power_law_error"] == pytest.approx(0.1 / 1.1, rel=1e-6)


def test_best_cells_pick_the_best_lr_and_average_seeds(tmp_path: Path) -> None:
    write(tmp_path, "a", summary("f0", 1.0, 0.8, seed=0))
    write(tmp_path, "b", summary("f0", 1.0, 0.8, seed=1, final={"eval_loss": 100.0}))
    write(tmp_path, "c", summary("f0", 1.0, 1.6))
    runs, _ = load_runs(tmp_path)
    (cell,) = best_cells(runs)
    assert cell.lr == 1.6 and cell.lrs == (0.8, 1.6) and cell.seeds == 1 and cell.lr_at_edge
