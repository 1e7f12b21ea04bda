"""Each verdict comes out "supported" on data that shows the finding, and not on data that does not."""

from __future__ import annotations

import math

import numpy as np
import pytest

from convscale_cli.report.analysis import Cell, frontier, lr_by_epochs
from convscale_cli.report.fit import fit_power_law
from convscale_cli.report.verdicts import (
    INCONCLUSIVE,
    NOT_SUPPORTED,
    SUPPORTED,
    convnets_match_vits,
    log_log_law,
    lr_falls,
    scale_together,
)

SIZES = {"s": 1e6, "m": 4e6, "l": 16e6}


def cell(model: str, epochs: float, loss: float, *, lr: float = 1.6, lrs: tuple[float, ...] = (1.6,)) -> Cell:
    """A cell whose compute is proportional to size x epochs, like a real training run."""
    params = SIZES[model]
    return Cell(model, "nfnet", epochs, lr, loss, params * epochs / 1e6, params, params * 100, epochs * 1e5, lrs, 1)


# --- (a) log-log law -------------------------------------------------------------------------------------------------


def test_log_log_law_supported_on_a_clean_power_law() -> None:
    rng = np.random.default_rng(0)
    compute = np.logspace(0, 3, 8)
    fit = fit_power_law(compute, 3 * compute**-0.05 * np.exp(rng.normal(0, 0.002, 8)), bootstrap=200)
    verdict = log_log_law(fit, 8)
    assert verdict.status == SUPPORTED, verdict.text
    assert verdict.numbers["r2"] > 0.99 and verdict.numbers["b"] == pytest.approx(0.05, abs=0.005)


def test_log_log_law_not_supported_when_loss_is_flat_noise() -> None:
    rng = np.random.default_rng(1)
    compute = np.logspace(0, 3, 8)
    fit = fit_power_law(compute, 2.5 * np.exp(rng.normal(0, 0.03, 8)), bootstrap=200)
    verdict = log_log_law(fit, 8)
    assert verdict.status == NOT_SUPPORTED
    assert "R^2 below threshold" in verdict.reason


def test_log_log_law_not_supported_when_the_curve_bends() -> None:
    compute = np.logspace(0, 4, 10)
    loss = 2.0 + 5.0 * compute**-0.8  # saturating: a straight log-log line fits it poorly
    verdict = log_log_law(fit_power_law(compute, loss, bootstrap=100), 10, r2_threshold=0.95)
    assert verdict.status == NOT_SUPPORTED and verdict.numbers["r2"] < 0.95


def test_log_log_law_inconclusive_with_two_points() -> None:
    verdict = log_log_law(fit_power_law([1.0, 10.0], [3.0, 2.0]), 2)
    assert verdict.status == INCONCLUSIVE and verdict.text.startswith("inconclusive (only 2 frontier points")


# --- (b) model size and epochs grow together -------------------------------------------------------------------------


def _chinchilla_cells() -> list[Cell]:
    """Loss = 1 + 2/N^0.5 + 2/D^0.5 in units where both terms matter: the optimum moves to larger N and D."""
    cells = []
    for model, params in SIZES.items():
        for epochs in (0.5, 1, 2, 4, 8, 16):
            loss = 1 + 2 / math.sqrt(params / 1e6) + 2 / math.sqrt(epochs)
            cells.append(cell(model, epochs, loss))
    return cells


def test_scale_together_supported_when_both_grow() -> None:
    cells = _chinchilla_cells()
    front = frontier(cells)
    verdict = scale_together(cells, front)
    assert verdict.status == SUPPORTED, verdict.text
    assert verdict.numbers["spearman_size"] >= 0.5 and verdict.numbers["spearman_epochs"] >= 0.5


def test_scale_together_not_supported_when_the_smallest_model_always_wins() -> None:
    # Model size does not help at all: the frontier is the small model trained longer and longer.
    cells = [cell(m, e, 1 + 2 / math.sqrt(e)) for m in SIZES for e in (0.5, 1, 2, 4, 8, 16)]
    front = frontier(cells)
    assert {c.model for c in front} == {"s"}
    verdict = scale_together(cells, front)
    assert verdict.status == NOT_SUPPORTED
    assert verdict.reason.startswith("model size did not grow") and verdict.numbers["spearman_size"] == 0.0


def test_scale_together_inconclusive_with_one_model() -> None:
    cells = [cell("s", e, 1 + 1 / e) for e in (1, 2, 4)]
    assert scale_together(cells, frontier(cells)).text == "inconclusive (only one model was trained)"


# --- (c) optimal lr falls with the epoch budget ----------------------------------------------------------------------


def _lr_cells(best: dict[str, list[float]]) -> list[Cell]:
    grid = (0.2, 0.4, 0.8, 1.6, 3.2)
    return [
        cell(model, epochs, 2.0, lr=lr, lrs=grid)
        for model, lrs in best.items()
        for epochs, lr in zip((1, 2, 4, 8), lrs, strict=True)
    ]


def test_lr_falls_supported_when_non_increasing_and_falling() -> None:
    verdict = lr_falls(lr_by_epochs(_lr_cells({"s": [1.6, 1.6, 0.8, 0.8], "l": [1.6, 0.8, 0.4, 0.4]})))
    assert verdict.status == SUPPORTED, verdict.text
    assert verdict.numbers["falling"] == ["l", "s"] and "s: 1ep->1.6, 2ep->1.6, 4ep->0.8, 8ep->0.8" in verdict.reason


def test_lr_falls_not_supported_when_it_rises() -> None:
    verdict = lr_falls(lr_by_epochs(_lr_cells({"s": [0.8, 1.6, 1.6, 1.6], "l": [1.6, 0.8, 0.4, 0.4]})))
    assert verdict.status == NOT_SUPPORTED and verdict.numbers["rising"] == ["s"]


def test_lr_falls_inconclusive_when_flat_or_untuned() -> None:
    flat = lr_falls(lr_by_epochs(_lr_cells({"s": [0.8, 0.8, 0.8, 0.8]})))
    assert flat.status == INCONCLUSIVE and "flat" in flat.reason
    untuned = lr_falls(lr_by_epochs([cell("s", e, 2.0) for e in (1, 2, 4)]))
    assert untuned.status == INCONCLUSIVE and ">= 2 learning rates" in untuned.reason


def test_lr_falls_counts_optima_at_the_grid_edge() -> None:
    verdict = lr_falls(lr_by_epochs(_lr_cells({"s": [3.2, 1.6, 0.8, 0.2]})))
    assert verdict.status == SUPPORTED and verdict.numbers["best_lr_at_grid_edge"] == 2


# --- (d) ConvNets vs ViTs at equal compute ---------------------------------------------------------------------------


def _comparison(rows: list[tuple[float, float, float]], families: tuple[str, ...] = ("nfnet", "vit")) -> dict:
    matched = [{"core_hours": c, "nfnet": conv, "vit": vit} for c, conv, vit in rows]
    return {"families": {f: {} for f in families}, "matched": matched, "overlap": [rows[0][0], rows[-1][0]] if rows
            else None}


def test_families_match_within_tolerance_is_supported() -> None:
    verdict = convnets_match_vits(_comparison([(1.0, 5.0, 5.1), (2.0, 4.6, 4.5), (4.0, 4.2, 4.25)]))
    assert verdict is not None and verdict.status == SUPPORTED and "within tolerance" in verdict.text
    assert verdict.numbers["points"] == 3 and verdict.numbers["convnet_ahead_at"] == 2


def test_vits_ahead_is_not_supported_and_convnets_ahead_is() -> None:
    behind = convnets_match_vits(_comparison([(1.0, 5.5, 5.0), (2.0, 5.0, 4.5)]))
    assert behind is not None and behind.status == NOT_SUPPORTED and "ViTs ahead" in behind.text
    ahead = convnets_match_vits(_comparison([(1.0, 4.0, 5.0), (2.0, 3.6, 4.5)]))
    assert ahead is not None and ahead.status == SUPPORTED and "ConvNets ahead" in ahead.text


def test_families_verdict_needs_both_families_and_overlap() -> None:
    assert convnets_match_vits(None) is None
    assert convnets_match_vits(_comparison([(1.0, 5.0, 5.0)], families=("nfnet", "resnet"))) is None
    none = convnets_match_vits(_comparison([]))
    assert none is not None and none.status == INCONCLUSIVE and "do not overlap" in none.text
    one = convnets_match_vits(_comparison([(1.0, 5.0, math.nan), (2.0, 4.0, 4.1)]))
    assert one is not None and one.status == INCONCLUSIVE and "only 1" in one.text
