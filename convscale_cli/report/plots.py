"""Matplotlib PNGs of the report, drawn like the paper's figures (log-log axes, one curve per model).

Figures are built with :class:`matplotlib.figure.Figure` and the Agg canvas directly rather than ``pyplot``: no global
state, no GUI backend, safe in threads and on headless machines. matplotlib is imported inside the functions so that
importing the report package stays cheap.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from convscale_cli.report.analysis import REFERENCE_POINTS, Cell
from convscale_cli.report.fit import PowerLawFit

_DPI = 110
# Every compute axis: the ledger's training FLOPs converted to TPU-v4 core-hours at the calibrated MFU.
COMPUTE_LABEL = "TPU-v4 core-hours, from FLOPs at the calibrated MFU"
_SIZE = (7.0, 4.6)


def _figure(ncols: int = 1):  # noqa: ANN202  (matplotlib types are imported lazily)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(_SIZE[0] * (1 if ncols == 1 else 0.8 * ncols), _SIZE[1]), dpi=_DPI)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, ncols, squeeze=False)[0]
    for ax in axes:
        ax.grid(True, which="major", alpha=0.3)
        ax.grid(True, which="minor", alpha=0.1)
    return figure, axes


def _plain_ticks(ax: Any) -> None:
    """Label log axes 2.4, 2.6 ... and 0.5, 1, 2 instead of 2.4x10^0 and 2^-1: losses span less than a decade."""
    from matplotlib.ticker import FuncFormatter

    formatter = FuncFormatter(lambda value, _: f"{value:g}")
    ax.yaxis.set_major_formatter(formatter)
    ax.yaxis.set_minor_formatter(formatter)
    ax.tick_params(axis="y", which="minor", labelsize=7)


def _log_x(ax: Any) -> None:
    """Log x axis; its minor labels are settled in :func:`_save` once the data limits are known."""
    ax.set_xscale("log")


def _tidy_log_x(ax: Any) -> None:
    """Label minor ticks only when the axis spans under two decades, and then as plain numbers.

    matplotlib's default labels some minor ticks as 3x10^-2 when the data span one or two decades, and they collide.
    """
    import math

    from matplotlib.ticker import FuncFormatter, NullFormatter

    if ax.get_xscale() != "log":
        return
    low, high = ax.get_xlim()
    if math.log10(high / low) >= 2:
        ax.xaxis.set_minor_formatter(NullFormatter())
        return
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.tick_params(axis="x", which="minor", labelsize=7)


def _save(figure: Any, path: Path) -> Path:
    for ax in figure.axes:
        _tidy_log_x(ax)
    figure.tight_layout()
    figure.savefig(path, format="png")
    return path


def _by_model(cells: Sequence[Cell]) -> dict[str, list[Cell]]:
    groups: dict[str, list[Cell]] = defaultdict(list)
    for cell in sorted(cells, key=lambda c: (c.params, c.model, c.epochs)):
        groups[cell.model].append(cell)
    return groups


def _draw_fit(ax: Any, fit: PowerLawFit, low: float, high: float, label: str, color: str = "black") -> None:
    grid = np.logspace(np.log10(low), np.log10(high), 100)
    ax.plot(grid, fit.predict(grid), "--", color=color, lw=1.4, label=label)
    if len(fit.samples):
        lo, hi = fit.interval(grid)
        ax.fill_between(grid, lo, hi, color=color, alpha=0.12, lw=0)


def loss_vs_compute(
    cells: Sequence[Cell], front: Sequence[Cell], fit: PowerLawFit | None, path: Path, chance: float | None = None
) -> Path:
    """Held-out loss vs compute: a curve per model over epoch budgets, the frontier and the fitted law (Fig. 2);
    with ``chance`` (ln K), a level line at half of it, above which a study is in its early transient."""
    figure, (ax,) = _figure()
    if chance is not None:
        ax.axhline(chance / 2, color="grey", ls=":", lw=1, label=f"half of chance (ln K / 2 = {chance / 2:.2f})")
    for model, group in _by_model(cells).items():
        group = sorted(group, key=lambda c: c.core_hours)
        ax.plot([c.core_hours for c in group], [c.loss for c in group], "o-", ms=4, lw=1.2, label=model)
    ax.plot(
        [c.core_hours for c in front], [c.loss for c in front], "s", ms=9, mfc="none", mec="black", label="frontier"
    )
    if fit is not None:
        low, high = fit.compute_range
        ci = f", b in [{fit.b_interval[0]:.3f}, {fit.b_interval[1]:.3f}]" if fit.b_interval else ""
        _draw_fit(ax, fit, low, high * 3, f"L = {fit.a:.3g} C^-{fit.b:.3f} (R^2 {fit.r2:.2f}{ci})")
    _log_x(ax)
    ax.set_yscale("log")
    ax.set_xlabel(f"pre-training compute ({COMPUTE_LABEL})")
    ax.set_ylabel("held-out loss")
    _plain_ticks(ax)
    ax.set_title("Held-out loss vs compute (best lr per model and epoch budget)")
    ax.legend(fontsize=8, loc="best")
    return _save(figure, path)


def compute_optimal(front: Sequence[Cell], optimal: Sequence[dict[str, Any]], path: Path) -> Path:
    """Compute-optimal parameters and epochs vs compute: observed frontier and parametric-fit prediction."""
    figure, (left, right) = _figure(2)
    compute = [c.core_hours for c in front]
    # Markers only: consecutive frontier points often alternate between neighbouring models, and a line through
    # them would suggest an oscillation that is just the discreteness of the model and epoch grids.
    left.plot(compute, [c.params for c in front], "o", color="C0", label="frontier (observed)")
    right.plot(compute, [c.epochs for c in front], "o", color="C0", label="frontier (observed)")
    if optimal:
        grid = [row["core_hours"] for row in optimal]
        left.plot(grid, [row["params"] for row in optimal], "s--", color="C1", ms=4, label="parametric fit")
        right.plot(grid, [row["epochs"] for row in optimal], "s--", color="C1", ms=4, label="parametric fit")
    for ax, label in ((left, "parameters"), (right, "epochs")):
        _log_x(ax)
        ax.set_yscale("log")
        ax.set_xlabel(f"compute ({COMPUTE_LABEL})")
        ax.set_ylabel(f"compute-optimal {label}")
        ax.legend(fontsize=8)
    _plain_ticks(right)
    figure.suptitle("Compute-optimal model size and epoch budget")
    return _save(figure, path)


def lr_vs_epochs(table: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    """Optimal learning rate vs epoch budget per model, log2 axes like Fig. 3."""
    figure, (ax,) = _figure()
    for model, rows in sorted(table.items()):
        rows = sorted(rows, key=lambda r: r["epochs"])
        ax.plot([r["epochs"] for r in rows], [r["lr"] for r in rows], "o-", label=model)
        edges = [r for r in rows if r["at_edge"]]
        if edges:
            ax.plot([r["epochs"] for r in edges], [r["lr"] for r in edges], "x", color="red", ms=8)
    ax.plot([], [], "x", color="red", label="optimum at grid edge")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("epoch budget")
    ax.set_ylabel("optimal learning rate (alpha at batch 4096)")
    _plain_ticks(ax)
    ax.set_title("Optimal learning rate vs epoch budget")
    ax.legend(fontsize=8)
    return _save(figure, path)


def backtest(front: Sequence[Cell], result: dict[str, float], path: Path) -> Path:
    """The frontier, a line fitted to all but its largest third of compute, and that third (the back-test)."""
    from convscale_cli.report.estimates import BACKTEST_FRACTION, ols

    figure, (ax,) = _figure()
    points = sorted(front, key=lambda c: c.core_hours)
    x = np.log([c.core_hours for c in points])
    y = np.log([c.loss for c in points])
    cut = x.max() - BACKTEST_FRACTION * np.ptp(x)
    test = x >= cut - 1e-12
    intercept, slope = ols(x[~test], y[~test])
    ax.plot(np.exp(x[~test]), np.exp(y[~test]), "o", color="C0", label="fitted (frontier)")
    ax.plot(np.exp(x[test]), np.exp(y[test]), "o", color="C3", mfc="none", ms=8, label="held out (largest third)")
    grid = np.linspace(x.min(), x.max(), 50)
    ax.plot(
        np.exp(grid),
        np.exp(intercept + slope * grid),
        "--",
        color="black",
        lw=1.2,
        label=f"line through the fitted points; held-out mean log error {result['error']:+.3f}",
    )
    _log_x(ax)
    ax.set_yscale("log")
    ax.set_xlabel(f"pre-training compute ({COMPUTE_LABEL})")
    ax.set_ylabel("held-out loss")
    _plain_ticks(ax)
    ax.set_title("Back-test: predicting the largest third of the frontier")
    ax.legend(fontsize=8)
    return _save(figure, path)


def finetune(points: Sequence[dict[str, Any]], path: Path) -> Path:
    """Fine-tuned top-1 of this study's runs (left) beside the published JFT -> ImageNet points (right).

    Two panels, each with its own axes: a laptop study's fine-tuning dataset and compute have nothing in common with
    ImageNet after 1e5 TPU-v4 core-hours of JFT, and one shared axis would suggest a comparison that is not there.
    """
    figure, (ax, ref_ax) = _figure(2)
    by_model: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for point in points:
        by_model[f"{point['model']} ({point['dataset']})"].append(point)
    for index, (label, group) in enumerate(sorted(by_model.items())):
        color = f"C{index}"
        pretrained = sorted((p for p in group if not p.get("scratch")), key=lambda p: p["pretrain_core_hours"])
        if pretrained:
            ax.plot(
                [p["pretrain_core_hours"] for p in pretrained],
                [p["top1"] for p in pretrained],
                "o-",
                color=color,
                label=f"{label}, pre-trained",
            )
        # A from-scratch baseline has no pre-training compute to sit at on a log axis: a level line instead.
        for baseline in (p for p in group if p.get("scratch")):
            ax.axhline(
                baseline["top1"],
                color=color,
                ls="--",
                lw=1,
                label=f"{label} from scratch (same fine-tuning compute): {baseline['top1']:.1f}%",
            )
    _log_x(ax)
    ax.set_xlabel(f"pre-training compute ({COMPUTE_LABEL})")
    ax.set_ylabel("fine-tuned top-1 (%)")
    ax.set_title("This study: fine-tuned top-1")
    ax.legend(fontsize=7, loc="best")
    for ref, marker in zip(REFERENCE_POINTS, "*PXD^v", strict=False):
        ref_ax.plot(
            ref["core_hours"],
            ref["top1"],
            marker,
            color="dimgray",
            mfc="none",
            ms=9,
            label=f"{ref['model']}: {ref['top1']:g}%",
        )
    _log_x(ref_ax)
    ref_ax.set_xlabel("JFT pre-training compute (TPU-v4 core-hours)")
    ref_ax.set_ylabel("ImageNet top-1 (%)")
    ref_ax.set_title("Published (JFT -> ImageNet), not from these runs")
    ref_ax.legend(fontsize=7, loc="best")
    return _save(figure, path)


def families(comparison: dict[str, Any], path: Path) -> Path:
    """Each family's cells and frontier on one plot: ConvNets and ViTs at equal compute."""
    figure, (ax,) = _figure()
    for index, (name, entry) in enumerate(sorted(comparison["families"].items())):
        color = f"C{index}"
        members = entry["cells"]
        ax.plot([c["core_hours"] for c in members], [c["loss"] for c in members], ".", color=color, alpha=0.35)
        front = sorted(entry["frontier"], key=lambda c: c["core_hours"])
        ax.plot(
            [c["core_hours"] for c in front],
            [c["loss"] for c in front],
            "o-",
            color=color,
            label=f"{name} frontier" + (f" (L ~ C^-{entry['b']:.3f})" if entry.get("b") else ""),
        )
    _log_x(ax)
    ax.set_yscale("log")
    ax.set_xlabel(f"pre-training compute ({COMPUTE_LABEL})")
    ax.set_ylabel("held-out loss")
    _plain_ticks(ax)
    ax.set_title("Families at equal compute")
    ax.legend(fontsize=8)
    return _save(figure, path)
