"""The main job: a complete small scaling study on the embedded data, on a laptop CPU, in minutes.

``convscale quickstart`` chains the commands a user would run by hand, in one process so that compiled programs are
shared:

1. ``convscale sweep`` over the packaged study (``convscale_cli/studies/quickstart.toml``): a few rungs of the tiny
   NFNet ladder x a few epoch budgets on ``shapes``, each cell's learning rate tuned by the two-trial rule;
2. ``convscale finetune`` of the lowest-loss pre-trained run on the real ``digits`` data, and of the same architecture
   from a random initialisation with the same recipe and compute (``--scratch``), the baseline pre-training must beat;
3. ``convscale report`` over the runs (scaling-law fits, verdicts on the paper's findings, HTML with plots);
4. ``convscale plan --from`` for a budget 10x the study's largest run.

It ends with a short summary: runs used by the rule vs a full grid, the verdicts, the digits top-1 with and without
pre-training, and where the report is. Each step's own output (live tables, progress) is printed as it runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from convscale_cli import interrupts
from convscale_cli.errors import ConvscaleError, ExitCode, UsageError
from convscale_cli.tuning import RunRecord, load_runs

STUDY = "quickstart.toml"
FINETUNE_DATASET = "digits"
PLAN_BUDGET_FACTOR = 10.0


def default_study() -> Path:
    """The packaged quickstart study file."""
    return Path(str(resources.files("convscale_cli.studies").joinpath(STUDY)))


@dataclasses.dataclass(frozen=True)
class FinetuneSettings:
    """How the best pre-trained run is fine-tuned on ``digits`` (small, so the whole job stays within minutes)."""

    # 10 epochs: from scratch the model is still short of converged (95-97% on digits), so the comparison shows what
    # pre-training buys; at 30 epochs both sides reach ~98.5% and the gap is within one or two images.
    epochs: float = 10.0
    batch_size: int = 64
    # alpha at batch 4096, scaled linearly (25.6 x 64 / 4096 = 0.4), the alpha the study keeps for its best cells;
    # on digits at 30 epochs alpha 6.4, 12.8 and 25.6 all reached 98.1% (one seed, an earlier study run).
    lr: float = 25.6
    sam_rho: float = 0.05
    ema_decay: float = 0.999
    # Augmentation and the evaluation crop are digits' own defaults (no flips or crops: a mirrored 2 is no digit).

    def argv(self, source: Path, out: Path, *, scratch: bool = False) -> list[str]:
        """The ``convscale finetune`` command line: ``source`` fine-tuned (or, with ``scratch``, its architecture
        trained from a random initialisation) on the quickstart's dataset into ``out``."""
        return [
            "finetune", "--from", str(source), "--dataset", FINETUNE_DATASET,
            "--epochs", f"{self.epochs:g}", "--batch-size", str(self.batch_size), "--lr", f"{self.lr:g}",
            "--sam-rho", f"{self.sam_rho:g}", "--ema-decay", f"{self.ema_decay:g}", "--precision", "fp32",
            *(["--scratch"] if scratch else []), "--out", str(out),
        ]  # fmt: skip


def _call(run_command: Callable[[Sequence[str]], int], args: list[str]) -> None:
    interrupts.check()
    code = run_command(args)
    interrupts.check()
    if code != ExitCode.OK:
        raise QuickstartFailed(f"`convscale {' '.join(args)}` failed with exit code {code}", code)


class QuickstartFailed(ConvscaleError):
    """A step of the quickstart failed (its own error was printed above)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.exit_code = ExitCode(code) if code in ExitCode._value2member_map_ else ExitCode.INTERNAL_ERROR


def best_pretrain_run(runs_dir: Path) -> RunRecord:
    """The finished pre-training run with the lowest held-out loss (the fine-tuning source)."""
    runs = [r for r in load_runs(runs_dir) if math.isfinite(r.eval_loss)]
    if not runs:
        raise UsageError(f"no finished pre-training run in {str(runs_dir)!r} to fine-tune")
    return min(runs, key=lambda r: r.eval_loss)


def _top1(summary: dict[str, Any]) -> dict[str, float | None]:
    """Held-out top-1 of a fine-tuning summary, raw and EMA weights."""
    return {
        "top1": (summary.get("final") or {}).get("eval_top1"),
        "top1_ema": (summary.get("final_ema") or {}).get("eval_top1"),
    }


def _percent(top1: dict[str, float | None]) -> str:
    raw, ema = top1["top1"], top1["top1_ema"]
    text = f"{100 * raw:.1f}%" if raw is not None else "n/a"
    return text + (f" (EMA {100 * ema:.1f}%)" if ema is not None else "")


def largest_flops(runs_dir: Path) -> float:
    """Training FLOPs of the largest finished pre-training run (the plan's budget is a multiple of it)."""
    return max((r.train_flops for r in load_runs(runs_dir)), default=0.0)


def run(
    out: Path,
    run_command: Callable[[Sequence[str]], int],
    *,
    study: Path | None = None,
    finetune: FinetuneSettings = FinetuneSettings(),
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the whole job into ``out`` (``out/runs``, ``out/report``) and return the summary it prints.

    Args:
        out: output directory; rerunning with the same ``out`` resumes (finished runs are skipped).
        run_command: ``run_command(argv) -> exit code``, the ``convscale`` entry point (in-process).
        study: a study TOML to use instead of the packaged one.
        finetune: fine-tuning settings.
        echo: where section headers and the summary go.
    """
    from convscale_cli.plugins import get_registry
    from convscale_cli.sweep import load_study, plan_cells

    study_path = Path(study) if study is not None else default_study()
    runs_dir, report_dir = out / "runs", out / "report"
    loaded = load_study(study_path, {"out": str(runs_dir)})  # validates the study before anything runs
    plan_cells(loaded, get_registry())  # and its model and dataset names, in one line of their own

    echo(
        f"[1/4] pre-training: {len(loaded.models)} models x {len(loaded.epochs)} epoch budgets on {loaded.dataset}, "
        "learning rates tuned by the two-trial rule"
    )
    _call(run_command, ["sweep", str(study_path), "--set", f"out={runs_dir}"])

    best = best_pretrain_run(runs_dir)
    best_dir = best.path
    ft_dir = runs_dir / f"finetune-{FINETUNE_DATASET}"
    scratch_dir = runs_dir / f"scratch-{FINETUNE_DATASET}"
    echo(
        f"[2/4] fine-tuning the lowest-loss run ({best_dir.name}, held-out loss {best.eval_loss:.4f}) on the "
        f"real {FINETUNE_DATASET} data"
    )
    _call(run_command, finetune.argv(best_dir, ft_dir))
    echo(f"      baseline: the same {best.model} from a random initialisation, same recipe and fine-tuning compute")
    _call(run_command, finetune.argv(best_dir, scratch_dir, scratch=True))
    ft = json.loads((ft_dir / "summary.json").read_text())
    scratch = json.loads((scratch_dir / "summary.json").read_text())

    echo("[3/4] fitting scaling laws and writing the report")
    _call(run_command, ["report", str(runs_dir), "--out", str(report_dir), "--dataset", loaded.dataset])
    fit = json.loads((report_dir / "fit.json").read_text())

    budget_flops = PLAN_BUDGET_FACTOR * largest_flops(runs_dir)
    echo(
        f"[4/4] planning a budget {PLAN_BUDGET_FACTOR:g}x the largest run ({budget_flops:.3g} FLOPs) from the "
        "fitted runs"
    )
    size = loaded.data_options.get("size")
    plan_args = [
        "plan",
        "--budget",
        f"{budget_flops:.4g}-flops",
        "--from",
        str(runs_dir),
        "--dataset",
        loaded.dataset,
        "--hardware",
        "cpu",
        "--resolution",
        str(loaded.resolution or 32),
    ]
    if size:
        plan_args += ["--dataset-size", str(size)]
    if loaded.batch_size:
        plan_args += ["--batch-size", str(loaded.batch_size)]
    _call(run_command, plan_args)

    tuning = [json.loads(line) for line in (runs_dir / "tuning.jsonl").read_text().splitlines() if line.strip()]
    runs_used = len({t["run"] for cell in tuning for t in cell["trials"]})
    grid = len(tuning) * 6
    top1 = _top1(ft)
    top1_scratch = _top1(scratch)
    summary = {
        "cells": len(tuning),
        "runs_used": runs_used,
        "full_grid_runs": grid,
        "verdicts": fit.get("verdicts", []),
        "best_pretrain_run": best_dir.name,
        "finetune": {
            "dataset": FINETUNE_DATASET,
            "epochs": finetune.epochs,
            **top1,
            "run": str(ft_dir),
            "scratch": {**top1_scratch, "run": str(scratch_dir)},
        },
        "report": str(report_dir / "report.html"),
    }
    echo("")
    echo("Quickstart summary")
    echo(f"  two-trial rule: {runs_used} runs for {len(tuning)} cells (a full 6-point lr grid needs {grid})")
    for verdict in summary["verdicts"]:
        echo(f"  {verdict.get('claim') or verdict.get('finding')}: {verdict.get('text')}")
    echo(
        f"  {FINETUNE_DATASET} top-1 on the held-out split after {finetune.epochs:g} epochs: "
        f"{_percent(top1)} fine-tuned from {best_dir.name}, {_percent(top1_scratch)} from scratch (same fine-tuning "
        "compute)"
    )
    echo(f"  report: {summary['report']}")
    return summary
