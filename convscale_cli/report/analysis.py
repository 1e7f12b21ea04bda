"""The report's tables: one row per (model, epoch budget) cell, compute-optimal predictions, fine-tuning points.

The numbers come from :mod:`convscale_cli.report.estimates` (best lr per cell, seeds averaged, the envelope); this
module only lays them out for ``fit.json``, the document and the plots.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from convscale_cli.report.estimates import Estimates, StudyDesign
from convscale_cli.report.fit import ParametricFit
from convscale_cli.report.runs import Run

# Published fine-tuned ImageNet top-1 of JFT-pre-trained models, on the paper's TPU-v4 core-hour axis
# (Smith et al. 2023, Table 2 and §3). They are reference points from other papers, never fitted to.
REFERENCE_POINTS: tuple[dict[str, Any], ...] = (
    {"model": "NFNet-F7+", "core_hours": 110e3, "top1": 90.3, "source": "Smith et al. 2023 (arXiv 2310.16764)"},
    {"model": "NFNet-F7+ (RA)", "core_hours": 110e3, "top1": 90.4, "source": "Smith et al. 2023 (arXiv 2310.16764)"},
    {
        "model": "ViT-g/14",
        "core_hours": 120e3,
        "top1": 90.2,
        "source": "Zhai et al. 2022 / Alabdulmohsin et al. 2023; TPU-v4 estimate from Smith et al. 2023",
    },
    {
        "model": "ViT-G/14",
        "core_hours": 280e3,
        "top1": 90.45,
        "source": "Zhai et al. 2022 (arXiv 2106.04560); TPU-v4 estimate from Smith et al. 2023",
    },
    {
        "model": "SoViT-400m/14",
        "core_hours": 130e3,
        "top1": 90.3,
        "source": "Alabdulmohsin et al. 2023 (arXiv 2305.13035); TPU-v4 estimate from Smith et al. 2023",
    },
)


@dataclass(frozen=True)
class Cell:
    """The best learning rate of one (model, epoch budget), seeds averaged.

    Attributes:
        model: Architecture name.
        family: Model family.
        epochs: Epoch budget.
        lr: Learning rate with the lowest mean held-out loss.
        loss: That mean held-out loss (over seeds).
        core_hours: Mean compute of the runs at that learning rate.
        params: Parameter count (with the classifier head).
        size: Model size N on the fits' axis (parameters without the head, or MACs per image).
        macs: Forward MACs per image at the training resolution.
        examples: Mean examples seen.
        lrs: Every learning rate tried in this cell, ascending.
        seeds: Runs averaged at the best learning rate.
        seed_sd: Standard deviation of the held-out loss over those seeds (NaN with one seed).
        lr_optimum: Optimal lr from a parabola in log2 lr (NaN with < 3 lrs or the best at an edge).
        lr_edge: -1 / +1 when the best lr is the lowest / highest of >= 3 tried, else 0.
        on_frontier: True when no other model's curve is lower at this cell's compute.
    """

    model: str
    family: str
    epochs: float
    lr: float
    loss: float
    core_hours: float
    params: float
    size: float
    macs: float
    examples: float
    lrs: tuple[float, ...]
    seeds: int
    seed_sd: float
    lr_optimum: float
    lr_edge: int
    on_frontier: bool

    @property
    def lr_at_edge(self) -> bool:
        """True when the best of >= 3 learning rates is the smallest or largest tried."""
        return self.lr_edge != 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy."""
        data = {name: getattr(self, name) for name in self.__dataclass_fields__}
        data["lrs"] = list(self.lrs)
        data["lr_at_edge"] = self.lr_at_edge
        return data


def cell_table(design: StudyDesign, est: Estimates, runs: Sequence[Run]) -> list[Cell]:
    """One :class:`Cell` per (model, epochs) of the design, sorted by compute."""
    by_model = {r.model: r for r in runs}
    log_l = np.log(design.loss)
    cells = []
    for k in range(design.n_cells):
        model = design.models[design.cell_model[k]]
        j = int(est.cells.best[k])
        members = log_l[design.group == k * design.lrs.shape[1] + j]
        losses = np.exp(members)
        example = by_model[model]
        optimum = est.cells.optimum[k]
        cells.append(
            Cell(
                model=model,
                family=design.families[design.cell_model[k]],
                epochs=float(design.cell_epochs[k]),
                lr=float(est.cells.lr[k]),
                loss=float(est.cells.loss[k]),
                core_hours=float(est.cells.compute[k]),
                params=example.params,
                size=float(design.size[design.cell_model[k]]),
                macs=example.macs_per_image,
                examples=float(est.cells.examples[k]),
                lrs=tuple(float(x) for x in design.lrs[k] if math.isfinite(x)),
                seeds=len(members),
                seed_sd=float(np.std(losses, ddof=1)) if len(members) > 1 else math.nan,
                lr_optimum=float(2.0**optimum) if math.isfinite(optimum) else math.nan,
                lr_edge=int(est.cells.edge[k]),
                on_frontier=bool(est.frontier[k]),
            )
        )
    return sorted(cells, key=lambda c: (c.core_hours, c.loss))


def compute_grid(cells: Sequence[Cell], extend: float = 100.0, points_per_decade: int = 2) -> np.ndarray:
    """Log-spaced compute values from the cheapest cell to ``extend`` times the most expensive one."""
    low = min(c.core_hours for c in cells)
    high = max(c.core_hours for c in cells) * extend
    count = max(2, int(math.ceil(math.log10(high / low) * points_per_decade)) + 1)
    return np.logspace(math.log10(low), math.log10(high), count)


def optimal_configs(fit: ParametricFit, cells: Sequence[Cell], computes: Iterable[float]) -> list[dict[str, Any]]:
    """Compute-optimal trained model and epoch budget per compute value, predicted by the parametric law.

    Each observed model is a candidate. Its cost per example is read from its own runs' ledgers (core-hours per
    example seen), so the extrapolation uses exactly the compute accounting of the data.
    """
    per_model: dict[str, list[Cell]] = defaultdict(list)
    for cell in cells:
        per_model[cell.model].append(cell)
    candidates = []
    for model, group in per_model.items():
        cost = statistics.median(c.core_hours / c.examples for c in group)
        per_epoch = statistics.median(c.examples / c.epochs for c in group)
        candidates.append((model, group[0].size, group[0].params, cost, per_epoch))
    largest = max(c[1] for c in candidates)
    rows = []
    for compute in computes:
        options = []
        for model, size, params, cost, per_epoch in candidates:
            examples = compute / cost
            low, high = fit.interval(size, examples)
            options.append(
                (
                    float(fit.predict(size, examples)[0]),
                    model,
                    size,
                    params,
                    examples,
                    per_epoch,
                    (float(low[0]), float(high[0])),
                )
            )
        loss, model, size, params, examples, per_epoch, interval = min(options)
        rows.append(
            {
                "core_hours": float(compute),
                "model": model,
                "params": params,
                "epochs": examples / per_epoch,
                "examples": examples,
                "predicted_loss": loss,
                "loss_interval": list(interval),
                # The best candidate being the largest one tried means the optimum may be a larger, untried model.
                "at_largest_model": size == largest and len(candidates) > 1,
            }
        )
    return rows


def lr_table(cells: Iterable[Cell]) -> dict[str, list[dict[str, Any]]]:
    """Per model, the best lr at each epoch budget where at least two lrs were tried."""
    table: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for cell in sorted(cells, key=lambda c: (c.model, c.epochs)):
        if len(cell.lrs) >= 2:
            table[cell.model].append(
                {
                    "epochs": cell.epochs,
                    "lr": cell.lr,
                    "optimum": cell.lr_optimum if math.isfinite(cell.lr_optimum) else None,
                    "lrs": list(cell.lrs),
                    "at_edge": cell.lr_at_edge,
                }
            )
    return dict(table)


def finetune_points(runs: Iterable[Run]) -> list[dict[str, Any]]:
    """Best fine-tuned top-1 per pre-training run, against that run's pre-training compute.

    A from-scratch baseline (``finetune --scratch``) is its own point with ``scratch`` set and no pre-training compute.
    """
    best: dict[tuple[str, str], Run] = {}
    for run in runs:
        if run.kind != "finetune" or math.isnan(run.eval_top1):
            continue
        key = (run.pretrain_run or run.name, run.dataset)
        if key not in best or run.eval_top1 > best[key].eval_top1:
            best[key] = run
    return sorted(
        (
            {
                "model": r.model,
                "family": r.family,
                "dataset": r.dataset,
                "pretrain_run": r.pretrain_run,
                "pretrain_core_hours": r.pretrain_core_hours,
                "top1": 100.0 * r.eval_top1,
                "run": r.name,
                "scratch": r.from_scratch,
            }
            for r in best.values()
        ),
        key=lambda p: (p["dataset"], p["pretrain_core_hours"]),
    )
