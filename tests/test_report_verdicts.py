"""Each verdict follows the data: "supported" where the truth holds, not where it is false, and "inconclusive"
where the design cannot decide. The studies are simulated with a known truth and run through the real sweep and
report (``convscale_cli.report.simulate``); the rates over many such studies are ``tests/test_calibration.py``'s.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from convscale_cli.report.build import analyse
from convscale_cli.report.estimates import RunPoint, StudyDesign, estimate
from convscale_cli.report.simulate import Scenario, scenarios, write_study
from convscale_cli.report.verdicts import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED


def verdicts_of(scenario: Scenario, tmp_path: Path, seed: int = 0, replicates: int = 100) -> dict[str, object]:
    write_study(scenario, tmp_path / scenario.name, seed)
    result = analyse(tmp_path / scenario.name, replicates=replicates, seed=seed)
    return {v.finding: v for v in result.verdicts}


def test_every_finding_is_supported_when_the_paper_holds(tmp_path: Path) -> None:
    found = verdicts_of(scenarios()["law-holds"], tmp_path)
    assert [found[f].status for f in ("log_log_law", "scale_together", "lr_falls")] == [SUPPORTED] * 3, {
        f: v.text for f, v in found.items()
    }
    assert 0.4 < found["scale_together"].numbers["a"] < 0.6  # the truth is beta / (alpha + beta) = 0.5
    assert found["lr_falls"].numbers["epochs_slope"] == pytest.approx(-0.35, abs=0.1)


def test_a_saturating_frontier_is_not_a_log_log_law(tmp_path: Path) -> None:
    found = verdicts_of(scenarios()["saturating"], tmp_path)
    assert found["log_log_law"].status == NOT_SUPPORTED, found["log_log_law"].text
    assert "bends" in found["log_log_law"].reason


def test_irrelevant_model_size_and_a_constant_lr_are_never_supported(tmp_path: Path) -> None:
    found = verdicts_of(scenarios()["size-and-lr-null"], tmp_path)
    # The smallest model wins at every compute: the optimum never sits inside the ladder.
    assert found["scale_together"].status == INCONCLUSIVE and "not inside the ladder" in found["scale_together"].reason
    assert found["lr_falls"].status != SUPPORTED, found["lr_falls"].text


def test_a_rising_lr_optimum_is_not_supported(tmp_path: Path) -> None:
    rising = dataclasses.replace(
        scenarios()["law-holds"], name="rising", lr_epochs_exp=0.35, lr_octaves=(-2, -1, 0, 1, 2, 3)
    )
    found = verdicts_of(rising, tmp_path)
    assert found["lr_falls"].status == NOT_SUPPORTED and "rises" in found["lr_falls"].reason


def test_two_trials_per_cell_can_never_show_a_falling_lr(tmp_path: Path) -> None:
    """The two-trial rule keeps alpha or alpha/2, so kept optima can only stay or halve: no evidence of a fall."""
    found = verdicts_of(scenarios()["two-trial"], tmp_path)
    assert found["lr_falls"].status == INCONCLUSIVE
    assert found["lr_falls"].reason.startswith("two learning rates per cell cannot show a fall")


def test_one_lr_per_cell_says_so_and_not_two_trials(tmp_path: Path) -> None:
    one = dataclasses.replace(scenarios()["law-holds"], name="one-lr", lr_octaves=(0,))
    found = verdicts_of(one, tmp_path)
    assert found["lr_falls"].status == INCONCLUSIVE
    assert found["lr_falls"].reason.startswith("one learning rate per cell cannot show a fall"), found["lr_falls"].text


def test_too_small_a_design_is_inconclusive_not_a_verdict(tmp_path: Path) -> None:
    small = dataclasses.replace(scenarios()["law-holds"], name="tiny", sizes=(1e5, 2e5), epochs=(0.5, 1.0))
    found = verdicts_of(small, tmp_path)
    # Two sizes and two budgets cannot show a law or an allocation (the full lr grid can still show the lr trend).
    assert found["log_log_law"].status == found["scale_together"].status == INCONCLUSIVE
    assert "frontier points" in found["log_log_law"].reason
    assert "model sizes; need >= 3" in found["scale_together"].reason


def test_without_measurable_noise_no_verdict_claims_anything(tmp_path: Path) -> None:
    few = dataclasses.replace(
        scenarios()["law-holds"], name="few", rule="two-trial", sizes=(1e5, 2e5, 4e5), epochs=(0.5, 1.0)
    )
    write_study(few, tmp_path / "few", 0)
    result = analyse(tmp_path / "few", replicates=50)
    assert not result.noise.known  # one seed, two lrs per cell, 6 cells: one degree of freedom short
    assert all(v.status == INCONCLUSIVE for v in result.verdicts)


def _point(model: str, size: float, epochs: float, loss: float) -> RunPoint:
    return RunPoint(model, "nfnet", epochs, 1.6, size, epochs * 1e4, size * epochs, loss)


def test_the_frontier_drops_cells_another_model_beats_at_their_compute() -> None:
    """l1 at 0.25 epochs costs as much as l0 at ~0.5 epochs but is 0.32 nats worse: it is not a frontier point."""
    points = [
        _point("l0", 1.0, 0.25, 5.68),
        _point("l0", 1.0, 0.5, 5.31),
        _point("l0", 1.0, 1.0, 4.76),
        _point("l1", 1.9, 0.25, 5.63),  # compute 0.475: between l0's 0.25 and 0.5 epochs, above l0's curve there
        _point("l1", 1.9, 0.5, 5.28),
        _point("l1", 1.9, 1.0, 4.87),
    ]
    design = StudyDesign.from_points(points)
    est = estimate(design, design.loss, parametric=False)
    on = {(design.models[design.cell_model[k]], design.cell_epochs[k]) for k in np.flatnonzero(est.frontier)}
    assert ("l1", 0.25) not in on and ("l1", 0.5) not in on
    assert {("l0", 0.25), ("l0", 0.5), ("l0", 1.0), ("l1", 1.0)} == on


def test_an_lr_optimum_at_the_grid_edge_is_not_located() -> None:
    points = [RunPoint("m", "nfnet", 1.0, lr, 1.0, 1e4, 1.0, 3.0 - 0.1 * i) for i, lr in enumerate((0.2, 0.4, 0.8))]
    points += [
        RunPoint("m", "nfnet", 2.0, lr, 1.0, 2e4, 2.0, 2.0 + d) for lr, d in ((0.2, 0.1), (0.4, 0.0), (0.8, 0.1))
    ]
    design = StudyDesign.from_points(points)
    est = estimate(design, design.loss, parametric=False)
    assert list(est.cells.edge) == [1, 0]  # the first cell's best is its largest lr: the optimum may lie above
    assert np.isnan(est.cells.optimum[0]) and est.cells.optimum[1] == pytest.approx(np.log2(0.4))


def test_a_sweep_that_learned_nothing_supports_nothing(tmp_path: Path) -> None:
    """Every loss within noise of chance (ln 420 = 6.04): no finding may come out "supported"."""
    flat = dataclasses.replace(
        scenarios()["law-holds"], name="flat", law=(6.04, 0.0, 0.3, 0.0, 0.3), lr_epochs_exp=0.0, lr_size_exp=0.0
    )
    found = verdicts_of(flat, tmp_path)
    assert all(v.status != SUPPORTED for v in found.values()), {f: v.text for f, v in found.items()}


@pytest.mark.parametrize(("gap", "ahead"), [(0.0, False), (-0.25, True)])
def test_convnets_well_ahead_support_the_match_and_the_text_says_they_are_ahead(
    tmp_path: Path, gap: float, ahead: bool
) -> None:
    scenario = dataclasses.replace(scenarios()["families-match"], vit_gap=gap)
    found = verdicts_of(scenario, tmp_path)["families_match"]
    assert found.status == SUPPORTED, found.text  # the paper claims ConvNets are not behind; ahead is not behind
    assert ("ConvNets ahead by more than the tolerance" in found.text) is ahead, found.text
