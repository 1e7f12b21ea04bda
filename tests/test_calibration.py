"""The report's intervals and verdicts are calibrated on simulated studies with a known truth.

A smaller version of ``benchmarks/bench_calibration.py`` (which runs 200 simulations per scenario and records the
table in docs/calibration.md): 50 simulated studies for each of four scenarios, each through the real sweep, report
analysis and ``plan --from``, with the same bounds. The seeds are fixed, so the test is deterministic; it fails when
a change to the analysis makes an interval cover the truth too rarely or too often, a null finding "supported" too
often, a true one "not supported" too often, or power drop.
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import pytest

from convscale_cli.report.simulate import check, run_once, scenarios, tally

SIMULATIONS = 50
REPLICATES = 60
# Bounds the analysis is known to miss (docs/calibration.md, "Known misses"): when model size truly does not matter
# (A = 0) and E = 0, both coefficients sit on their bound and the percentile bootstrap of beta, and of the predictions
# that extrapolate with it, covers 70-80% instead of 80-97%. Listed, not hidden: the test fails if they are missed by
# anything else, and also once they are met (then this entry must go).
KNOWN_MISSES = {"size-and-lr-null": ("coverage of beta", "coverage of plan_loss")}


def _one(name: str, workdir: str, seed: int) -> dict:
    return run_once(scenarios()[name], seed, workdir, REPLICATES)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["law-holds", "saturating", "size-and-lr-null", "two-trial"])
def test_intervals_and_verdicts_are_calibrated(name: str, tmp_path: Path) -> None:
    scenario = scenarios()[name]
    with ProcessPoolExecutor(2) as pool:
        rows = list(pool.map(partial(_one, name, str(tmp_path)), range(1000, 1000 + SIMULATIONS)))
    summary = tally(scenario, rows)
    assert summary["sims"] == SIMULATIONS
    assert {"b", "alpha", "beta", "plan_loss"} <= set(summary["coverage"])  # every interval was formed and checked
    failures = check(scenario, summary)
    known = KNOWN_MISSES.get(name, ())
    assert [f for f in failures if not any(k in f for k in known)] == [], summary
    still = [k for k in known if any(k in f for f in failures)]
    assert still == list(known), f"{name}: {sorted(set(known) - set(still))} now calibrated; update KNOWN_MISSES"


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
