"""``build_report``: runs directory in, ``fit.json`` + PNGs + ``report.md`` + ``report.html`` out.

Every number in the Markdown and HTML is read from the same dictionary that is written to ``fit.json``, so the
machine-readable and the human-readable report agree by construction.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from convscale_cli import __version__
from convscale_cli.errors import UsageError
from convscale_cli.report import analysis, plots, verdicts
from convscale_cli.report.document import build_document
from convscale_cli.report.fit import FitError, ParametricFit, PowerLawFit, fit_parametric, fit_power_law
from convscale_cli.report.render import to_html, to_markdown
from convscale_cli.report.runs import load_runs, load_tuning, select_dataset

SIZE_AXES = ("params", "macs")


def _json_safe(value: Any) -> Any:
    """NaN/inf are not JSON: write them as null so other tools can parse fit.json."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def build_report(
    runs_dir: str | Path,
    out_dir: str | Path,
    *,
    dataset: str | None = None,
    size_axis: str = "params",
    bootstrap: int = 1000,
    parametric_bootstrap: int = 100,
    holdout_fraction: float = 0.2,
    r2_threshold: float = verdicts.R2_THRESHOLD,
    seed: int = 0,
) -> dict[str, Any]:
    """Analyse the runs in ``runs_dir`` and write the report into ``out_dir``.

    Args:
        runs_dir: Directory of run directories with ``summary.json``.
        out_dir: Where ``report.md``, ``report.html``, ``fit.json`` and the PNGs go (created if missing).
        dataset: Pre-training dataset to report on, required when the runs span several.
        size_axis: Model size in the parametric law: "params" or "macs" (MACs per image).
        bootstrap: Bootstrap resamples of the power-law fits.
        parametric_bootstrap: Bootstrap resamples of the parametric fit (each is an L-BFGS run).
        holdout_fraction: Share of the largest-compute cells held out in the back-test.
        r2_threshold: R^2 above which the frontier counts as a log-log law.
        seed: Seed of every bootstrap.

    Returns:
        The content written to ``fit.json``.

    Raises:
        UsageError: Missing, empty or foreign runs directory, mixed datasets without ``dataset``, bad options.
    """
    if size_axis not in SIZE_AXES:
        from convscale_cli.errors import UnknownNameError

        raise UnknownNameError("size axis", size_axis, SIZE_AXES)
    if not 0.0 < holdout_fraction < 1.0:
        raise UsageError(f"holdout fraction must be in (0, 1), got {holdout_fraction}")
    if bootstrap < 0 or parametric_bootstrap < 0:
        raise UsageError(f"bootstrap counts must be >= 0, got {bootstrap} and {parametric_bootstrap}")
    runs_dir, out_dir = Path(runs_dir), Path(out_dir)
    all_runs, skipped = load_runs(runs_dir)
    if not all_runs:
        reasons = "; ".join(f"{s.path}: {s.reason}" for s in skipped[:3])
        raise UsageError(f"no usable runs in {str(runs_dir)!r} ({len(skipped)} skipped: {reasons})")
    runs = select_dataset(all_runs, dataset)
    dataset = runs[0].dataset
    cells = analysis.best_cells(runs)
    front = analysis.frontier(cells)

    result: dict[str, Any] = {
        "convscale_version": __version__,
        "runs_dir": str(runs_dir),
        "dataset": dataset,
        "size_axis": size_axis,
        "compute_unit": "TPU-v4 core-hours",
        "runs": [r.to_dict() for r in runs],
        "skipped": [s.to_dict() for s in skipped],
        "excluded_other_datasets": len(all_runs) - len(runs),
        "cells": [c.to_dict() for c in cells],
        "frontier": [c.to_dict() for c in front],
    }

    power: PowerLawFit | None = None
    try:
        power = fit_power_law([c.core_hours for c in front], [c.loss for c in front], bootstrap=bootstrap, seed=seed)
    except FitError as exc:
        result["power_law_error"] = str(exc)
    result["power_law"] = power.to_dict() if power else None

    parametric: ParametricFit | None = None
    try:
        parametric = fit_parametric(
            [c.size(size_axis) for c in cells],
            [c.examples for c in cells],
            [c.loss for c in cells],
            size_axis=size_axis,
            bootstrap=parametric_bootstrap,
            seed=seed,
        )
    except FitError as exc:
        result["parametric_error"] = str(exc)
    result["parametric"] = parametric.to_dict() if parametric else None
    result["compute_optimal"] = {
        "observed": [
            {"core_hours": c.core_hours, "model": c.model, "params": c.params, "epochs": c.epochs, "loss": c.loss}
            for c in front
        ],
        # Smith et al. (§2): the optimal epoch budget exceeded 1 above roughly 5k TPU-v4 core-hours on JFT-4B.
        "epochs_above_one_from": next((c.core_hours for c in front if c.epochs > 1), None),
        "predicted": (
            analysis.optimal_configs(parametric, cells, analysis.compute_grid(cells), size_axis) if parametric else []
        ),
    }
    lr_table = analysis.lr_by_epochs(cells)
    result["lr_by_epochs"] = lr_table
    decisions, unreadable = load_tuning(runs_dir, dataset)
    result["tuning"] = {"decisions": decisions, "unreadable_lines": unreadable}
    result["backtest"] = (
        analysis.backtest(cells, holdout_fraction=holdout_fraction, size_axis=size_axis) if len(cells) >= 3 else None
    )
    family_names = {c.family for c in cells}
    result["families"] = (
        analysis.family_comparison(cells, bootstrap=min(bootstrap, 200), seed=seed) if len(family_names) > 1 else None
    )
    result["finetune"] = {
        "points": analysis.finetune_points(runs),
        "references": [dict(r) for r in analysis.REFERENCE_POINTS],
    }
    result["verdicts"] = [
        v.to_dict()
        for v in (
            verdicts.log_log_law(power, len(front), r2_threshold),
            verdicts.scale_together(cells, front, parametric),
            verdicts.lr_falls(lr_table),
            verdicts.convnets_match_vits(result["families"]),
        )
        if v is not None
    ]

    out_dir.mkdir(parents=True, exist_ok=True)
    images = _write_plots(result, cells, front, power, out_dir)
    result["files"] = {
        "report_md": str(out_dir / "report.md"),
        "report_html": str(out_dir / "report.html"),
        "fit_json": str(out_dir / "fit.json"),
        "plots": {key: str(out_dir / name) for key, name in images.items()},
    }
    result = _json_safe(result)
    title = f"convscale scaling report: {dataset}"
    blocks = build_document(result, images)
    (out_dir / "report.md").write_text(to_markdown(title, blocks), encoding="utf-8")
    (out_dir / "report.html").write_text(to_html(title, blocks, out_dir), encoding="utf-8")
    (out_dir / "fit.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def _write_plots(
    result: dict[str, Any],
    cells: list[analysis.Cell],
    front: list[analysis.Cell],
    power: PowerLawFit | None,
    out_dir: Path,
) -> dict[str, str]:
    """Draw the plots the data supports; returns plot key -> file name inside ``out_dir``."""
    images = {"loss_vs_compute": "loss_vs_compute.png"}
    plots.loss_vs_compute(cells, front, power, out_dir / images["loss_vs_compute"])
    if len(front) >= 2 or result["compute_optimal"]["predicted"]:
        images["compute_optimal"] = "compute_optimal.png"
        plots.compute_optimal(front, result["compute_optimal"]["predicted"], out_dir / images["compute_optimal"])
    if result["lr_by_epochs"]:
        images["lr_vs_epochs"] = "lr_vs_epochs.png"
        plots.lr_vs_epochs(result["lr_by_epochs"], out_dir / images["lr_vs_epochs"])
    if result["backtest"] and result["backtest"]["rows"] and not _all_missing(result["backtest"]["rows"]):
        images["backtest"] = "backtest.png"
        plots.backtest(result["backtest"], out_dir / images["backtest"])
    if result["finetune"]["points"]:
        images["finetune"] = "finetune.png"
        plots.finetune(result["finetune"]["points"], out_dir / images["finetune"])
    if result["families"]:
        images["families"] = "families.png"
        plots.families(result["families"], cells, out_dir / images["families"])
    return images


def _all_missing(rows: list[dict[str, Any]]) -> bool:
    return all(r["parametric"] is None and (r["power_law"] is None or not r["on_frontier"]) for r in rows)
