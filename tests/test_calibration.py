"""The report's intervals and verdicts are calibrated on simulated studies with a known truth.

A smaller version of ``benchmarks/bench_calibration.py`` (which runs 200 simulations per scenario and records the
table in docs/calibration.md): 50 simulated studies for each of six scenarios, each through the real sweep, report
analysis and ``plan --from``, with the same bounds widened by its own sampling error. The seeds are fixed, so the
test is deterministic; it fails when
a change to the analysis makes an interval cover the truth too rarely or too often, a null finding "supported" too
often, a true one "not supported" too often, or power drop.
"""

from __future__ import annotations

import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import pytest

from convscale_cli.report.calibration import check, run_once, tally
from convscale_cli.report.simulate import scenarios

SIMULATIONS = 50
REPLICATES = 60
# Two binomial standard errors of a 90% coverage measured on 50 studies: the benchmark's 200 studies use no slack.
SLACK = 2 * math.sqrt(0.9 * 0.1 / SIMULATIONS)


def _one(name: str, workdir: str, seed: int) -> dict:
    return run_once(scenarios()[name], seed, workdir, REPLICATES)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["law-holds", "saturating", "size-and-lr-null", "two-trial", "families-match", "main-job"]
)
def test_intervals_and_verdicts_are_calibrated(name: str, tmp_path: Path) -> None:
    scenario = scenarios()[name]
    # Spawned workers: forking a process that has imported jax (other tests have) can deadlock.
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        rows = list(pool.map(partial(_one, name, str(tmp_path)), range(1000, 1000 + SIMULATIONS)))
    summary = tally(scenario, rows)
    assert summary["sims"] == SIMULATIONS
    assert {"b", "beta", "plan_loss"} <= set(summary["coverage"])  # every interval was formed and checked
    assert check(scenario, summary, SLACK) == [], summary


def test_the_bounds_catch_a_miscalibrated_analysis() -> None:
    """The checker itself: intervals that never cover, and a null finding always supported, are both reported."""
    scenario = scenarios()["size-and-lr-null"]
    row = {
        "seed": 0,
        "verdicts": {"log_log_law": "supported", "scale_together": "supported", "lr_falls": "inconclusive"},
        "intervals": {"b": (10.0, 11.0), "alpha": (0.0, 1.0), "beta": (0.0, 1.0), "E": (0.0, 1.0)},
        "noise": 0.01,
    }
    failures = check(scenario, tally(scenario, [row] * 10))
    assert any("coverage of b 0.00" in f for f in failures)
    assert any("scale_together 'supported' 100% when false" in f for f in failures)
