"""Bad values on every path (plan, pretrain, finetune, tune-lr, sweep): exit 2 and one ``Error:`` line, never a
traceback; NaN, inf, out-of-range seeds and absurd budgets included. None of these tests trains anything."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from convscale_cli import planner as P
from convscale_cli.budget import MAX_BUDGET_FLOPS, parse_budget
from convscale_cli.cli import main
from convscale_cli.errors import UsageError


def _fails(argv: list[str], capsys: Any, *needles: str) -> str:
    """Run the CLI; it must exit 2 with one ``Error:`` line holding every needle."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("Error: ") and "\n" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


# --- 1. budgets: finite, at most MAX_BUDGET_FLOPS, and tiny ones get the smallest-feasible error ---------------------


@pytest.mark.parametrize("budget", ["1e308-flops", "1e300-core-hours", "1e305-h100-hours", "1e290-tpu-v3-core-hours",
                                    "1e300-cpu-hours", "1.1e30-flops"])  # fmt: skip
def test_plan_refuses_absurdly_large_budgets(budget: str, capsys: Any) -> None:
    _fails(["plan", "--budget", budget], capsys, f"budget {budget!r} is too large", "1e+30 model FLOPs")


@pytest.mark.parametrize("budget", ["1e-300-flops", "5e-324-flops", "1e-300-core-hours"])
def test_plan_says_a_vanishing_budget_is_below_the_smallest_feasible_one(budget: str, capsys: Any) -> None:
    _fails(["plan", "--budget", budget], capsys, "is too small", "the smallest feasible budget is")


def test_parse_budget_checks_the_flops_of_every_unit() -> None:
    assert parse_budget(f"{MAX_BUDGET_FLOPS:g}-flops").amount == MAX_BUDGET_FLOPS
    for text in ("1e31-flops", "1e300-core-hours", "1e300-a100-hours", "1e300-cpu-hours"):
        with pytest.raises(UsageError, match="too large"):
            parse_budget(text)


def test_plan_rechecks_the_budget_on_a_measured_cpu_peak(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    monkeypatch.setenv("CONVSCALE_CPU_PEAK_FLOPS", "1e300")
    _fails(["plan", "--budget", "10-cpu-hours"], capsys, "too large")


def test_round_down_survives_subnormal_and_non_finite_values() -> None:
    assert P.round_down(1e-300) == 1e-300
    assert P.round_down(1.2345e-320) == pytest.approx(1.23e-320, rel=1e-2)
    assert P.round_down(math.nan) == 0.0 and P.round_down(math.inf) == math.inf
    assert P.round_down(0.30649) == 0.306 and P.round_down(8 * (1 - 1e-12)) == 8.0


# --- 2. plan --bootstrap is checked with or without --from ---------------------------------------------------------


def test_plan_bootstrap_must_be_non_negative_without_from(capsys: Any) -> None:
    _fails(["plan", "--budget", "10k-core-hours", "--bootstrap", "-1"], capsys, "--bootstrap must be >= 0, got -1")


# --- tune-lr options ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid", ["nan,inf", "0.4,-1", ","])
def test_tune_lr_grid_must_be_positive_finite(grid: str, tmp_path: Path, capsys: Any) -> None:
    argv = ["tune-lr", "--model", "nfnet-tiny-l0", "--epochs", "0.01", "--runs", str(tmp_path), "--dataset", "shapes",
            "--grid", f"--lr-grid={grid}"]  # fmt: skip
    _fails(argv, capsys, "is not a comma-separated list of positive numbers")


# --- 7-9. did-you-mean everywhere a name is checked -----------------------------------------------------------------


def test_tune_lr_size_axis_suggests(tmp_path: Path, capsys: Any) -> None:
    argv = ["tune-lr", "--model", "nfnet-tiny-l0", "--epochs", "1", "--runs", str(tmp_path), "--dataset", "shapes",
            "--size-axis", "parms"]  # fmt: skip
    _fails(argv, capsys, "--size-axis 'parms' is not one of 'params', 'macs'; did you mean 'params'?")
