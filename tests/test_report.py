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
    write(tmp_path, "trunks/m-e4-lr0.4", summary(status="paused"))  # a branching sweep's trunk: no cell, no failure
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
    code = main(["report", str(runs), "--out", str(out), "--bootstrap", "60"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert str(out / "report.html") in printed and "(log_log_law)" in printed
    # The synthetic losses (> 6.2) are above ln 100: the runs never left the early transient, and the report says so.
    best = min(c["loss"] for c in json.loads((out / "fit.json").read_text())["cells"])
    regime = f"held-out loss {best:.3f} is {100 * best / math.log(100):.0f}% of chance (ln 100 = 4.61): the early"
    assert f"\n(regime) the best cell's {regime} transient" in printed
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
    assert result["family"] == "nfnet"  # findings (a)-(c) are judged on the ConvNets, (d) across families
    # Identical synthetic families: the ConvNet envelope equals the ViT one, so the gap is 0 with a narrow interval.
    assert result["families"]["gap"] == pytest.approx(0.0, abs=1e-9)
    assert result["skipped"] == [{"path": "bad", "reason": result["skipped"][0]["reason"]}]
    assert result["finetune"]["points"][0]["top1"] == pytest.approx(91.0)
    assert set(result["families"]["families"]) == {"nfnet", "vit"}
    assert result["parametric"]["n"] == len(result["cells"]) == 12  # the nfnet cells; the ViT cells are (d)'s
    above_one = [c for c in result["frontier"] if c["epochs"] > 1]
    assert result["compute_optimal"]["epochs_above_one_from"] == above_one[0]["core_hours"]
    assert result["tuning"]["unreadable_lines"] == 1 and result["tuning"]["decisions"][0]["best_lr"] == 0.8
    markdown = (out / "report.md").read_text()
    assert "| run | kind |" in markdown and "| f0 | 1 | two-trial | 1.6 (recipe default) | 1.6, 0.8 | 0.8 |" in markdown
    assert "1 run directory skipped" in markdown
    assert "converted from each run's training FLOPs at the calibrated MFU" in markdown


def test_report_json_flag_and_macs_axis(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    study(tmp_path / "runs")
    args = ["report", str(tmp_path / "runs"), "--json", "--size", "macs", "--bootstrap", "20"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["parametric"]["size_axis"] == "macs"
    assert all(row["predicted_loss"] > 0 for row in result["compute_optimal"]["predicted"])
    assert Path(result["files"]["fit_json"]).parent == tmp_path / "runs" / "report"
    assert main([*args[:-4], "--size", "flops"]) == 2
    assert "unknown size axis 'flops'" in capsys.readouterr().err


def test_runs_on_other_data_options_are_left_out_and_listed(tmp_path: Path) -> None:
    """One run on another ArrayRecord root must not join the study (it once flipped a verdict)."""
    from convscale_cli.report.build import analyse

    study(tmp_path, dataset="arrayrecord")
    for name in list(tmp_path.iterdir()):
        data = json.loads((name / "summary.json").read_text())
        data["config"] = {"data_options": {"root": "/data/a"}}
        (name / "summary.json").write_text(json.dumps(data))
    other = summary("f3", 8.0, 0.4, dataset="arrayrecord", config={"data_options": {"root": "/data/b"}})
    other["final"]["eval_loss"] = 0.5
    write(tmp_path, "stray", other)
    with pytest.raises(UsageError, match="runs span 2 data settings"):
        analyse(tmp_path, replicates=0)
    result = analyse(tmp_path, dataset="arrayrecord[root=/data/a] 224px 100cls", replicates=0)
    assert [r.name for r in result.other_data] == ["stray"]
    assert all("stray" != r.name for r in result.runs)


def test_cells_average_seeds_and_pick_the_best_lr(tmp_path: Path) -> None:
    from convscale_cli.report.build import analyse

    write(tmp_path, "a", summary("f0", 1.0, 0.8, seed=0, final={"eval_loss": 2.0}))
    write(tmp_path, "b", summary("f0", 1.0, 0.8, seed=1, final={"eval_loss": 2.2}))
    write(tmp_path, "c", summary("f0", 1.0, 1.6, seed=0, final={"eval_loss": 2.15}))
    (cell,) = analyse(tmp_path, replicates=0).cells
    # The mean over seeds decides (2.1 at 0.8 beats 2.15 at 1.6), never the luckiest seed.
    assert cell.lr == 0.8 and cell.loss == pytest.approx(2.1) and cell.seeds == 2
    assert cell.seed_sd == pytest.approx(math.sqrt(0.02)) and cell.lrs == (0.8, 1.6)


def test_main_jobs_of_several_seeds_pool_in_one_report(tmp_path: Path) -> None:
    """The README's pooled reading: `quickstart --seed S --out seeds/sS` for each seed, then `report seeds`. Each job
    names its runs alike (`seeds/s0/runs/f0-e1-lr0.8`, `seeds/s1/runs/f0-e1-lr0.8`); the report takes both seeds'
    runs, three levels down, as one cell's two seeds, and leaves the jobs' paused trunks, a level deeper, alone."""
    from convscale_cli.report.build import analyse

    root = tmp_path / "seeds"
    for seed, loss in ((0, 2.0), (1, 2.2)):
        write(root, f"s{seed}/runs/f0-e1-lr0.8", summary("f0", 1.0, 0.8, seed=seed, final={"eval_loss": loss}))
        write(root, f"s{seed}/runs/trunks/f0-e1-lr0.8", summary("f0", 1.0, 0.8, seed=seed, final={"eval_loss": 9.0}))
    (cell,) = analyse(root, replicates=0).cells
    assert cell.seeds == 2 and cell.loss == pytest.approx(2.1)


def test_diverged_trials_are_listed_with_the_rates_tried(tmp_path: Path) -> None:
    """A rate that diverged leaves no run directory; the report still names it where the cell's rates are listed."""
    runs = study(tmp_path / "runs")
    trials = [{"lr": 1.6, "status": "trained"}, {"lr": 3.2, "status": "failed", "eval_loss": None}]
    decision = {"model": "f0", "dataset": "jft", "epochs": 1.0, "rule": "grid", "trials": trials, "best_lr": 1.6}
    (runs / "tuning.jsonl").write_text(json.dumps(decision) + "\n")
    assert main(["report", str(runs), "--bootstrap", "0"]) == 0
    markdown = (runs / "report" / "report.md").read_text()
    assert "| f0 | 1 | 0.8 | " in markdown and "| 0.4, 0.8, 1.6, 3.2 (diverged) |" in markdown
    assert "| f0 | 0.5 | 1.6 | " in markdown and "| 0.4, 0.8, 1.6 | yes |" in markdown  # other cells unchanged
    assert "| f0 | 1 | grid | " in markdown and "| 1.6, 3.2 (diverged) | 1.6 |" in markdown
    assert "stopped at a non-finite loss" in markdown


@pytest.mark.parametrize(("classes", "early"), [(30_000, True), (1_000_000, False)])
def test_the_report_says_how_far_below_chance_the_best_cell_got(tmp_path: Path, classes: int, early: bool) -> None:
    """The best cell's loss as a fraction of ln K, and the early-transient warning exactly when it is above half."""
    runs = study(tmp_path / "runs")
    for path in runs.glob("*/summary.json"):
        path.write_text(json.dumps({**json.loads(path.read_text()), "num_classes": classes}))
    result = build_report(runs, tmp_path / "out", bootstrap=0)
    best = min(c["loss"] for c in result["cells"])
    chance = math.log(classes)
    assert result["regime"] == {
        "classes": classes,
        "chance_loss": pytest.approx(chance),
        "best_loss": best,
        "best_cell": {"model": "f3", "epochs": 4.0},
        "fraction_of_chance": pytest.approx(best / chance),
        "early_transient": best > chance / 2,
    }
    assert result["regime"]["early_transient"] is early  # 6.29 nats: 61% of ln 30k, 46% of ln 1M
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert f"reaches a held-out loss of {best:.3f}, {100 * best / chance:.0f}% of chance (ln {classes} = " in markdown
    assert ("early transient" in markdown) is early


def test_runs_that_do_not_record_their_classes_have_no_regime(tmp_path: Path) -> None:
    runs = study(tmp_path / "runs")
    for path in runs.glob("*/summary.json"):
        path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "num_classes"}))
    result = build_report(runs, tmp_path / "out", bootstrap=0)
    assert result["regime"] is None and "of chance" not in (tmp_path / "out" / "report.md").read_text()


def test_the_loss_plot_marks_half_of_chance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from matplotlib.axes import Axes

    levels: list[tuple[float, str]] = []
    axhline = Axes.axhline

    def spy(self: Axes, y: float = 0, *args: Any, **kwargs: Any) -> Any:
        levels.append((y, kwargs.get("label", "")))
        return axhline(self, y, *args, **kwargs)

    monkeypatch.setattr(Axes, "axhline", spy)
    runs = study(tmp_path / "runs")
    for path in runs.glob("*/summary.json"):
        path.write_text(json.dumps({**json.loads(path.read_text()), "num_classes": 30_000}))
    build_report(runs, tmp_path / "out", bootstrap=0)
    half = [y for y, label in levels if label.startswith("half of chance")]
    assert half == [pytest.approx(math.log(30_000) / 2)]
