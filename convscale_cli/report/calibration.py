"""Calibration: simulated studies (:mod:`convscale_cli.report.simulate`) through the real analysis and plan, and the
bounds their intervals and verdicts must meet.

:func:`run_once` runs one simulated study through :func:`convscale_cli.report.build.analyse` and
:func:`convscale_cli.plan_fit.plan_fitted` and records each interval, its truth (:func:`truth_values`) and each
verdict; :func:`tally` summarises a scenario's studies and :func:`check` lists the bounds they miss.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from convscale_cli.budget import train_flops
from convscale_cli.report.simulate import DATASET, FAMILY, MACS_PER_PARAM, POWERED, Scenario, write_study


def truth_values(scenario: Scenario) -> dict[str, float]:
    """True values of the quantities whose intervals are checked.

    ``alpha``, ``beta``, ``E`` and ``a = beta / (alpha + beta)`` are the law's (``alpha`` and ``a`` only when
    ``A > 0``, ``E`` only when ``E > 0``: a truth on the boundary of the parameter space is covered by any interval
    that reaches the boundary, which says nothing about calibration). The frontier exponent ``b`` is a
    property of the design as well as of the law (which cells exist to form the envelope): its truth is the
    noise-free analysis of the same design.
    """
    from convscale_cli.report.estimates import RunPoint, StudyDesign, estimate
    from convscale_cli.report.verdicts import families_of

    e, a, alpha, b, beta = scenario.law
    points = []
    for name, (family, size) in scenario.models().items():
        for epochs in scenario.epochs:
            lr = scenario.optimal_lr(size, epochs)
            examples = epochs * scenario.examples_per_epoch
            flops = train_flops(size * MACS_PER_PARAM) * examples
            loss = scenario.loss(size, epochs, lr, 0.0, family)
            points.append(RunPoint(name, family, epochs, lr, size, examples, flops, loss))
    design = StudyDesign.from_points([p for p in points if p.family == FAMILY])
    noise_free = estimate(design, design.loss, parametric=False)
    out = {"b": noise_free.b, "beta": beta}
    if scenario.vit_gap is not None:  # the gap along the two envelopes of this design's ladders
        both = StudyDesign.from_points(points)
        out["family_gap"] = estimate(both, both.loss, parametric=False, families=families_of(both)).family_gap
    if e > 0:  # E = 0 lies on the boundary of E >= 0, where an interval [0, x] holds it by construction
        out["E"] = e
    if a > 0:  # with A = 0 model size does not matter: alpha and the allocation have no true value
        out.update(alpha=alpha, a=scenario.size_exponent)
    return out


def run_once(
    scenario: Scenario, study_seed: int, workdir: str | Path, replicates: int, plan_at: float = 1.0
) -> dict[str, Any]:
    """One simulated study through the real sweep, analysis and plan: intervals, truths and verdicts.

    ``plan_at`` is the plan's budget as a multiple of the largest cell's compute (above 1 the plan extrapolates).
    """
    import shutil

    from convscale_cli.budget import get_hardware, parse_budget
    from convscale_cli.plan_fit import plan_fitted
    from convscale_cli.planner import DatasetPlan, PlanRequest
    from convscale_cli.report.build import analyse

    out = Path(workdir) / f"{scenario.name}-{study_seed}"
    shutil.rmtree(out, ignore_errors=True)
    registry = write_study(scenario, out, study_seed)
    result = analyse(out, replicates=replicates, seed=study_seed)
    est, boot = result.estimates, result.boot
    observed = {"b": est.b, "a": est.size_exponent}
    if est.parametric is not None:
        observed.update(alpha=est.parametric.alpha, beta=est.parametric.beta, E=est.parametric.E)
    intervals = {name: boot.interval(name, value) for name, value in observed.items()}
    families = next((v for v in result.verdicts if v.finding == "families_match"), None)
    if families is not None and families.numbers.get("gap_interval"):
        intervals["family_gap"] = tuple(families.numbers["gap_interval"])
    row: dict[str, Any] = {
        "seed": study_seed,
        "verdicts": {v.finding: v.status for v in result.verdicts},
        "intervals": intervals,
        "noise": result.noise.sigma,
    }
    # plan --from at (a multiple of) the largest cell's compute: does the recommendation's interval hold the truth?
    if result.parametric is not None:
        largest = plan_at * max(c.core_hours for c in result.cells)
        from convscale_cli.budget import core_hours_to_flops

        request = PlanRequest(
            budget=parse_budget(f"{core_hours_to_flops(largest):.6g}-flops"),
            hardware=get_hardware("tpu-v4"),
            dataset=DatasetPlan(DATASET, int(scenario.examples_per_epoch), 100, 32),
            family=FAMILY,
            batch_size=64,
            top=1,
        )
        plan = plan_fitted(request, registry, out, analysis=result)
        best = plan.recommendation
        size = scenario.models()[best.model][1]
        epochs = best.examples / scenario.examples_per_epoch
        # The plan predicts the loss a user will measure following it with one seed, tuning the way the study tuned
        # its runs: the best of the study's lr grid, or for the two-trial rule the better of the two trials the
        # plan suggests, each a new run with its own noise.
        grid = [scenario.lr_ref * 2.0**k for k in scenario.lr_octaves] if scenario.rule == "grid" else best.lr_trials
        draws = np.random.default_rng([study_seed, len(grid)]).standard_normal(len(grid))
        truth = min(scenario.loss(size, epochs, lr, z) for lr, z in zip(grid, draws, strict=True))
        row["plan"] = {"interval": best.loss_interval, "truth": truth}
    shutil.rmtree(out, ignore_errors=True)
    return row


def tally(scenario: Scenario, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Coverage of each interval and the share of each verdict over a scenario's simulations."""
    truth = truth_values(scenario)
    coverage: dict[str, dict[str, float]] = {}
    for name, value in truth.items():
        hits = [lo <= value <= hi for row in rows if (ci := row["intervals"].get(name)) for lo, hi in [ci]]
        if hits:
            coverage[name] = {"coverage": float(np.mean(hits)), "n": len(hits), "truth": value}
    plans = [row["plan"] for row in rows if row.get("plan") and row["plan"]["interval"]]
    if plans:
        hits = [p["interval"][0] <= p["truth"] <= p["interval"][1] for p in plans]
        coverage["plan_loss"] = {"coverage": float(np.mean(hits)), "n": len(hits), "truth": math.nan}
    verdicts: dict[str, dict[str, float]] = {}
    for finding in ("log_log_law", "scale_together", "lr_falls", "families_match"):
        if finding == "families_match" and scenario.vit_gap is None:
            continue
        statuses = [row["verdicts"].get(finding) for row in rows]
        verdicts[finding] = {
            status: statuses.count(status) / len(statuses) for status in ("supported", "not supported", "inconclusive")
        }
    return {
        "scenario": scenario.name,
        "sims": len(rows),
        "coverage": coverage,
        "verdicts": verdicts,
        "noise": float(np.median([row["noise"] for row in rows])),
    }


# The bounds a calibration must meet (the coverage of a nominal 90% interval, false-verdict rates, power).
COVERAGE_BOUNDS = (0.80, 0.97)
MAX_FALSE = 0.10
MIN_POWER = 0.80


def check(scenario: Scenario, summary: dict[str, Any], slack: float = 0.0) -> list[str]:
    """Every bound the scenario's tally misses, as readable lines (empty: calibrated).

    ``slack`` widens the coverage bounds by that much on each side: a smaller calibration (the CI test's 50 studies)
    allows for its own sampling error, about two binomial standard errors; the benchmark uses none.
    """
    failures = []
    for name, entry in summary["coverage"].items():
        if not COVERAGE_BOUNDS[0] - slack <= entry["coverage"] <= COVERAGE_BOUNDS[1] + slack:
            failures.append(f"{scenario.name}: coverage of {name} {entry['coverage']:.2f} outside {COVERAGE_BOUNDS}")
    for finding, shares in summary["verdicts"].items():
        truth = scenario.truth.get(finding)
        if truth is True and shares["not supported"] > MAX_FALSE:
            failures.append(f"{scenario.name}: {finding} 'not supported' {shares['not supported']:.0%} when true")
        if truth is False and shares["supported"] > MAX_FALSE:
            failures.append(f"{scenario.name}: {finding} 'supported' {shares['supported']:.0%} when false")
        if truth is True and finding in POWERED.get(scenario.name, ()) and shares["supported"] < MIN_POWER:
            failures.append(f"{scenario.name}: {finding} 'supported' only {shares['supported']:.0%} (power)")
    if scenario.rule == "two-trial" and summary["verdicts"]["lr_falls"]["supported"] > 0:
        failures.append(f"{scenario.name}: a two-trial study was 'supported' on lr_falls")
    return failures
