"""``analyse`` and ``build_report``: runs directory in, estimates with intervals, verdicts, ``fit.json`` and HTML out.

:func:`analyse` is the one analysis behind ``convscale report`` and ``convscale plan --from`` (so the two agree on
the same runs directory by construction) and behind the calibration harness. :func:`build_report` renders it: every
number in the Markdown and HTML is read from the same dictionary that is written to ``fit.json``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from convscale_cli import __version__
from convscale_cli.errors import UnknownNameError, UsageError
from convscale_cli.report import analysis, plots, verdicts
from convscale_cli.report.document import build_document
from convscale_cli.report.estimates import Estimates, RunPoint, StudyDesign, estimate, summary
from convscale_cli.report.fit import ParametricFit, PowerLawFit, make_fit
from convscale_cli.report.inference import DEFAULT_REPLICATES, LEVEL, Bootstrap, Noise, bootstrap, measure_noise
from convscale_cli.report.render import to_html, to_markdown
from convscale_cli.report.runs import Run, Skipped, load_runs, load_tuning, select_dataset

SIZE_AXES = ("params", "macs")
# The paper's held-out losses on JFT-4B run from about 3.0 to 2.4 (Smith et al. 2023, Fig. 2) against a chance level
# of ln 30k = 10.3: 23-29% of chance. A study whose best cell is still above half of its chance level trains in the
# early transient, where the loss falls faster than any power law and the findings on allocation and learning rate
# cannot show.
EARLY_TRANSIENT = 0.5
COMPUTE_NOTE = (
    "TPU-v4 core-hours (the paper's axis), converted from each run's training FLOPs at the calibrated MFU "
    "(convscale plan's TPU-v4 calibration)"
)


@dataclass(frozen=True)
class Analysis:
    """Everything the report and the planner know about one study.

    Attributes:
        runs: The runs of the chosen data setting (pre-training and the fine-tunes that started from them).
        skipped: Run directories that could not be used.
        other_data: Usable pre-training runs left out because they were trained on other data.
        family: The family the scaling findings (a)-(c) are judged on (the ConvNets when ViTs are present too).
        design: That family's study design.
        estimates: Point estimates on the observed losses.
        noise: Measured run noise.
        boot: Bootstrap replicates through the whole pipeline.
        parametric: The parametric law with its bootstrap draws (None with fewer than 6 cells).
        power_law: The frontier's power law with bootstrap intervals (None with fewer than 2 frontier points).
        cells: One row per cell.
        verdicts: The findings' verdicts.
        size_axis: "params" (without the classifier head) or "macs".
        families: The all-family comparison, when the runs hold ViTs and another family.
    """

    runs: list[Run]
    skipped: list[Skipped]
    other_data: list[Run]
    family: str
    design: StudyDesign
    estimates: Estimates
    noise: Noise
    boot: Bootstrap
    parametric: ParametricFit | None
    power_law: PowerLawFit | None
    cells: list[analysis.Cell]
    verdicts: list[verdicts.Verdict]
    size_axis: str
    families: dict[str, Any] | None

    @property
    def data_key(self) -> str:
        """The data setting every analysed run was trained on."""
        return next(r.data_key for r in self.runs if r.kind == "pretrain")


def _points(runs: list[Run], size_axis: str) -> list[RunPoint]:
    return [
        RunPoint(
            model=r.model,
            family=r.family,
            epochs=r.epochs,
            lr=r.lr,
            size=r.params_body if size_axis == "params" else r.macs_per_image,
            examples=r.examples_seen,
            compute=r.core_hours,
            loss=r.eval_loss,
        )
        for r in runs
        if r.kind == "pretrain"
    ]


def _main_family(runs: list[Run]) -> str:
    """The family the scaling findings are judged on: the ConvNet family with most runs (ViT alone otherwise)."""
    counts: dict[str, int] = {}
    for r in runs:
        if r.kind == "pretrain":
            counts[r.family] = counts.get(r.family, 0) + 1
    convnets = {f: n for f, n in counts.items() if f != verdicts.VIT_FAMILY}
    pool = convnets or counts
    return max(sorted(pool), key=lambda f: pool[f])


def _power_law(est: Estimates, boot: Bootstrap, design: StudyDesign) -> PowerLawFit | None:
    front = est.frontier
    if front.sum() < 2 or not math.isfinite(est.b):
        return None
    x, y = np.log(est.cells.compute[front]), np.log(est.cells.loss[front])
    residual = y - (est.log_a - est.b * x)
    total = float(np.sum((y - y.mean()) ** 2))
    b_ci = boot.interval("b", est.b)
    a_ci = boot.interval("log_a", est.log_a)
    samples = np.zeros((0, 2))
    if boot.replicates:
        pairs = np.stack([boot.draws["log_a"], boot.draws["b"]], axis=1)
        samples = pairs[np.all(np.isfinite(pairs), axis=1)]
    return PowerLawFit(
        a=math.exp(est.log_a),
        b=est.b,
        r2=1.0 - float(np.sum(residual**2)) / total if total > 0 else 1.0,
        n=int(front.sum()),
        level=boot.level,
        a_interval=(math.exp(a_ci[0]), math.exp(a_ci[1])) if a_ci else None,
        b_interval=b_ci,
        compute_range=(float(np.exp(x.min())), float(np.exp(x.max()))),
        samples=samples,
    )


def analyse(
    runs_dir: str | Path,
    *,
    dataset: str | None = None,
    family: str | None = None,
    size_axis: str = "params",
    replicates: int = DEFAULT_REPLICATES,
    level: float = LEVEL,
    seed: int = 0,
) -> Analysis:
    """Read the runs, estimate everything, bootstrap it over runs and judge the findings.

    Args:
        runs_dir: Directory of run directories with ``summary.json``.
        dataset: Data setting to analyse, required when the runs span several (a dataset name or a setting label).
        family: Family the findings (a)-(c) and the law are fitted to (default: the ConvNet family with most runs).
        size_axis: Model size N: "params" (parameters without the classifier head) or "macs" (MACs per image).
        replicates: Bootstrap replicates (each recomputes the whole pipeline); 0 disables intervals and verdicts
            that need them.
        level: Confidence level of every interval.
        seed: Bootstrap seed (reports are reproducible).

    Raises:
        UsageError: Missing, empty or foreign runs directory, mixed data without ``dataset``, bad options.
    """
    if size_axis not in SIZE_AXES:
        raise UnknownNameError("size axis", size_axis, SIZE_AXES)
    if replicates < 0:
        raise UsageError(f"bootstrap replicates must be >= 0, got {replicates}")
    if not 0.0 < level < 1.0:
        raise UsageError(f"confidence level must be in (0, 1), got {level}")
    runs_dir = Path(runs_dir)
    all_runs, skipped = load_runs(runs_dir)
    if not all_runs:
        reasons = "; ".join(f"{s.path}: {s.reason}" for s in skipped[:3])
        raise UsageError(f"no usable runs in {str(runs_dir)!r} ({len(skipped)} skipped: {reasons})")
    runs = select_dataset(all_runs, dataset)
    chosen = {id(r) for r in runs}
    other = [r for r in all_runs if r.kind == "pretrain" and id(r) not in chosen]
    if family is None:
        family = _main_family(runs)
    elif not any(r.family == family and r.kind == "pretrain" for r in runs):
        raise UsageError(f"no {family} pre-training runs on {runs[0].data_key!r}")
    mine = [r for r in runs if r.kind != "pretrain" or r.family == family]
    design = StudyDesign.from_points(_points(mine, size_axis))
    noise = measure_noise(design, estimate(design, design.loss))
    # The law keeps only the terms the data support at the measured noise, in the observed fit and in every replicate.
    est = estimate(design, design.loss, run_noise=noise.sigma if noise.known else None)
    boot = bootstrap(design, noise, replicates=replicates, level=level, seed=seed)
    cells = analysis.cell_table(design, est, mine)
    fit = None
    if est.parametric is not None:
        fit = make_fit(
            est.parametric,
            design.size[design.cell_model],
            est.cells.examples,
            size_axis=size_axis,
            samples=boot.parametric,
            level=level,
        )
    found = verdicts.all_verdicts(est, boot, noise, design)
    comparison = _families(runs, size_axis, replicates, level, seed)
    if comparison is not None:
        found.append(comparison.pop("verdict"))
    return Analysis(
        runs=runs,
        skipped=skipped,
        other_data=other,
        family=family,
        design=design,
        estimates=est,
        noise=noise,
        boot=boot,
        parametric=fit,
        power_law=_power_law(est, boot, design),
        cells=cells,
        verdicts=found,
        size_axis=size_axis,
        families=comparison,
    )


def _families(runs: list[Run], size_axis: str, replicates: int, level: float, seed: int) -> dict[str, Any] | None:
    """ConvNets against ViTs on the envelope of each family, with the comparison's verdict."""
    points = _points(runs, size_axis)
    if len({p.family for p in points}) < 2 or verdicts.VIT_FAMILY not in {p.family for p in points}:
        return None
    design = StudyDesign.from_points(points)
    sides = verdicts.families_of(design)
    est = estimate(design, design.loss, parametric=False, families=sides)
    cells = analysis.cell_table(design, est, runs)
    out: dict[str, Any] = {"families": {}, "gap": est.family_gap}
    pooled = []
    for name in sorted(set(design.families)):
        members = [c for c in cells if c.family == name]
        # A family's own frontier: its cells that no other model of the same family beats at their compute.
        own = StudyDesign.from_points([p for p in points if p.family == name])
        own_est = estimate(own, own.loss)
        pooled.append(measure_noise(own, own_est))
        front = analysis.cell_table(own, own_est, [r for r in runs if r.family == name])
        out["families"][name] = {
            "cells": [c.to_dict() for c in members],
            "frontier": [c.to_dict() for c in front if c.on_frontier],
            "b": own_est.b,
            "log_a": own_est.log_a,
        }
    # Each family's noise is measured on its own (seeds, lr response or its own law's residuals) and pooled.
    known = [n for n in pooled if n.known]
    dof = sum(n.df for n in known)
    noise = (
        Noise(math.sqrt(sum(n.df * n.sigma**2 for n in known) / dof), dof, "+".join(sorted({n.source for n in known})))
        if known
        else Noise(math.nan, 0, "none")
    )
    boot = bootstrap(design, noise, replicates=replicates, level=level, seed=seed, parametric=False, families=sides)
    out["noise"] = noise.to_dict()
    out["verdict"] = verdicts.convnets_match_vits(est, boot, noise, design)
    return out


def _json_safe(value: Any) -> Any:
    """NaN/inf are not JSON: write them as null so other tools can parse fit.json."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, np.floating | np.integer | np.bool_):
        return _json_safe(value.item())
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def regime(result: Analysis) -> dict[str, Any] | None:
    """Where the study's best cell got to: its held-out loss as a fraction of chance, ``ln K`` for a ``K``-class
    classifier (the loss of a uniform prediction). None when the runs do not record ``K``."""
    classes = next((r.num_classes for r in result.runs if r.kind == "pretrain"), 0)
    if classes < 2 or not result.cells:
        return None
    best = min(result.cells, key=lambda c: c.loss)
    chance = math.log(classes)
    return {
        "classes": classes,
        "chance_loss": chance,
        "best_loss": best.loss,
        "best_cell": {"model": best.model, "epochs": best.epochs},
        "fraction_of_chance": best.loss / chance,
        "early_transient": best.loss / chance > EARLY_TRANSIENT,
    }


def to_result(result: Analysis, runs_dir: Path) -> dict[str, Any]:
    """The ``fit.json`` dictionary of an analysis (no files written)."""
    est, boot, design = result.estimates, result.boot, result.design
    cells = result.cells
    front = [c for c in cells if c.on_frontier]
    grid, n_opt, interior = est.isoflop
    a_ci = boot.interval("a", est.size_exponent)
    lr_ci = boot.interval("lr_epochs_slope", est.lr["epochs_slope"])
    power = result.power_law
    power_dict = None
    if power is not None:
        c_ci = boot.interval("curvature", est.curvature)
        power_dict = {
            **power.to_dict(),
            "curvature": est.curvature,
            "curvature_interval": list(c_ci) if c_ci else None,
            "backtest": dict(est.backtest),
        }
    fit = result.parametric
    predicted = analysis.optimal_configs(fit, cells, analysis.compute_grid(cells)) if fit else []
    decisions, unreadable = load_tuning(runs_dir, result.runs[0].dataset)
    out = {
        "convscale_version": __version__,
        "runs_dir": str(runs_dir),
        "dataset": result.runs[0].dataset,
        "data": result.data_key,
        "family": result.family,
        "size_axis": result.size_axis,
        "compute_unit": "TPU-v4 core-hours",
        "compute_note": COMPUTE_NOTE,
        "runs": [r.to_dict() for r in result.runs],
        "skipped": [s.to_dict() for s in result.skipped],
        "other_data": [{"name": r.name, "data": r.data_key} for r in result.other_data],
        "noise": result.noise.to_dict(),
        "bootstrap": {"replicates": boot.replicates, "level": boot.level, "method": "runs, whole pipeline"},
        "design": summary(design, est),
        "regime": regime(result),
        "cells": [c.to_dict() for c in cells],
        "frontier": [c.to_dict() for c in front],
        "power_law": power_dict,
        "parametric": fit.to_dict() if fit else None,
        "parametric_error": None if fit else f"{design.n_cells} cells; the law needs >= 6",
        "compute_optimal": {
            "isoflop": [
                {"core_hours": float(np.exp(g)), "n_opt": float(np.exp(n)) if ok else None, "interior": bool(ok)}
                for g, n, ok in zip(grid, n_opt, interior, strict=True)
            ],
            "size_exponent": est.size_exponent,
            "size_exponent_interval": list(a_ci) if a_ci else None,
            "observed": [
                {"core_hours": c.core_hours, "model": c.model, "params": c.params, "epochs": c.epochs, "loss": c.loss}
                for c in front
            ],
            # Smith et al. (§2): the optimal epoch budget exceeded 1 above roughly 5k TPU-v4 core-hours on JFT-4B.
            "epochs_above_one_from": next((c.core_hours for c in front if c.epochs > 1), None),
            "predicted": predicted,
        },
        "lr": {
            "by_epochs": analysis.lr_table(cells),
            "epochs_slope": est.lr["epochs_slope"],
            "epochs_slope_interval": list(lr_ci) if lr_ci else None,
            "size_slope": est.lr["size_slope"],
        },
        "tuning": {"decisions": decisions, "unreadable_lines": unreadable},
        "families": result.families,
        "finetune": {
            "points": analysis.finetune_points(result.runs),
            "references": [dict(r) for r in analysis.REFERENCE_POINTS],
        },
        "verdicts": [v.to_dict() for v in result.verdicts],
    }
    if out["families"] is not None:
        out["families"] = {k: v for k, v in out["families"].items() if k != "verdict"}
    return _json_safe(out)


def build_report(
    runs_dir: str | Path,
    out_dir: str | Path,
    *,
    dataset: str | None = None,
    size_axis: str = "params",
    bootstrap: int = DEFAULT_REPLICATES,
    level: float = LEVEL,
    seed: int = 0,
) -> dict[str, Any]:
    """Analyse the runs in ``runs_dir`` and write the report into ``out_dir``.

    Args:
        runs_dir: Directory of run directories with ``summary.json``.
        out_dir: Where ``report.md``, ``report.html``, ``fit.json`` and the PNGs go (created if missing).
        dataset: Data setting to report on, required when the runs span several.
        size_axis: Model size N: "params" (without the classifier head) or "macs" (MACs per image).
        bootstrap: Bootstrap replicates over runs (each recomputes the whole pipeline).
        level: Confidence level of every interval.
        seed: Bootstrap seed.

    Returns:
        The content written to ``fit.json``.

    Raises:
        UsageError: Missing, empty or foreign runs directory, mixed data without ``dataset``, bad options.
    """
    runs_dir, out_dir = Path(runs_dir), Path(out_dir)
    result = analyse(runs_dir, dataset=dataset, size_axis=size_axis, replicates=bootstrap, level=level, seed=seed)
    content = to_result(result, runs_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = _write_plots(content, result, out_dir)
    content["files"] = {
        "report_md": str(out_dir / "report.md"),
        "report_html": str(out_dir / "report.html"),
        "fit_json": str(out_dir / "fit.json"),
        "plots": {key: str(out_dir / name) for key, name in images.items()},
    }
    title = f"convscale scaling report: {content['data']}"
    blocks = build_document(content, images)
    (out_dir / "report.md").write_text(to_markdown(title, blocks), encoding="utf-8")
    (out_dir / "report.html").write_text(to_html(title, blocks, out_dir), encoding="utf-8")
    (out_dir / "fit.json").write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    return content


def _write_plots(content: dict[str, Any], result: Analysis, out_dir: Path) -> dict[str, str]:
    """Draw the plots the data supports; returns plot key -> file name inside ``out_dir``."""
    cells = result.cells
    front = [c for c in cells if c.on_frontier]
    images = {"loss_vs_compute": "loss_vs_compute.png"}
    chance = (content["regime"] or {}).get("chance_loss")
    plots.loss_vs_compute(cells, front, result.power_law, out_dir / images["loss_vs_compute"], chance)
    optimal = content["compute_optimal"]
    if len(front) >= 2 or optimal["predicted"]:
        images["compute_optimal"] = "compute_optimal.png"
        plots.compute_optimal(front, optimal["predicted"], out_dir / images["compute_optimal"])
    if content["lr"]["by_epochs"]:
        images["lr_vs_epochs"] = "lr_vs_epochs.png"
        plots.lr_vs_epochs(content["lr"]["by_epochs"], out_dir / images["lr_vs_epochs"])
    if result.power_law is not None and math.isfinite(result.estimates.backtest["error"]):
        images["backtest"] = "backtest.png"
        plots.backtest(front, result.estimates.backtest, out_dir / images["backtest"])
    if content["finetune"]["points"]:
        images["finetune"] = "finetune.png"
        plots.finetune(content["finetune"]["points"], out_dir / images["finetune"])
    if content["families"]:
        images["families"] = "families.png"
        plots.families(content["families"], out_dir / images["families"])
    return images
