"""Verdicts on the paper's findings, computed from estimates with honest uncertainty (never asserted).

Each verdict is "supported", "not supported" or "inconclusive (why)", with the numbers behind it:

(a) Held-out loss follows a log-log law in compute (Smith et al. 2023, §2, Fig. 2).
(b) Model size and epoch budget should grow together with compute (§2: "scale the model size and the number of
    training epochs at the same rate").
(c) The optimal learning rate falls as the epoch budget grows (§2, Fig. 3).
(d) When the runs hold ViTs and ConvNets: ConvNets match ViTs at equal pre-training compute (§3, the paper's title).

Every interval is a bootstrap over runs through the whole pipeline (:mod:`convscale_cli.report.inference`), and
the false-verdict rates and power of these rules are measured on simulated studies with a known truth by
``benchmarks/bench_calibration.py``. A design that cannot decide a finding gets "inconclusive" with the reason —
never "supported" by construction (a two-trial lr search, say, can only keep or halve the lr, so it cannot show a
fall).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from convscale_cli.report.estimates import Estimates, StudyDesign
from convscale_cli.report.inference import Bootstrap, Noise

SUPPORTED = "supported"
NOT_SUPPORTED = "not supported"
INCONCLUSIVE = "inconclusive"
# (a) needs a slope, a curvature and a held-out third: at least this many frontier points.
MIN_FRONTIER = 5
# (a) the back-test fails when the held-out points' mean log residual is this many standard errors from 0.
BACKTEST_Z = 2.576
# (c) more than this share of lr optima at the grid's edge makes the trend a statement about the grid.
MAX_EDGE_SHARE = 1.0 / 3.0
# (d) ConvNets "match" ViTs when their loss is at most this much higher at equal compute (log ratio).
MATCH_TOLERANCE = math.log(1.05)
# The family whose runs are the Vision Transformers; every other family counts as a ConvNet.
VIT_FAMILY = "vit"


@dataclass(frozen=True)
class Verdict:
    """One finding, its verdict and the numbers it rests on."""

    finding: str
    claim: str
    status: str
    reason: str
    numbers: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        """One line: "supported: ...", "not supported: ..." or "inconclusive (reason)"."""
        if self.status == INCONCLUSIVE:
            return f"{INCONCLUSIVE} ({self.reason})"
        return f"{self.status}: {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy."""
        return {
            "finding": self.finding,
            "claim": self.claim,
            "status": self.status,
            "reason": self.reason,
            "text": self.text,
            "numbers": self.numbers,
        }


def _ci(pair: tuple[float, float] | None, digits: int = 3) -> str:
    return f"[{pair[0]:.{digits}g}, {pair[1]:.{digits}g}]" if pair else "n/a"


def _no_noise(noise: Noise) -> str:
    return (
        "run noise could not be measured (no cell has two seeds and too few cells to fit the parametric law), "
        "so no interval can be formed"
    )


def log_log_law(est: Estimates, boot: Bootstrap, noise: Noise) -> Verdict:
    """(a) A straight frontier on log-log axes: a slope that excludes 0, and no bend or missed back-test.

    "Supported" needs the slope's interval above 0, the curvature's interval to include 0 and the largest third of
    the frontier predicted within the noise by a line fitted to the rest. "Not supported" when loss does not fall,
    or when the frontier both bends (curvature interval excludes 0) and misses the held-out third. Anything else is
    "inconclusive". R^2 is not a test: an exact power law with noise can score low, and a saturating curve high.
    """
    finding, claim = "log_log_law", "held-out loss follows a log-log (power) law in pre-training compute"
    n_front = int(est.frontier.sum())
    if n_front < MIN_FRONTIER:
        return Verdict(finding, claim, INCONCLUSIVE, f"only {n_front} frontier points; need >= {MIN_FRONTIER}")
    if not noise.known:
        return Verdict(finding, claim, INCONCLUSIVE, _no_noise(noise))
    b_ci = boot.interval("b", est.b)
    c_ci = boot.interval("curvature", est.curvature)
    bt = est.backtest
    z = bt["error"] / (noise.sigma * math.sqrt(bt["leverage"])) if math.isfinite(bt["error"]) else math.nan
    numbers = {
        "b": est.b,
        "b_interval": list(b_ci) if b_ci else None,
        "curvature": est.curvature,
        "curvature_interval": list(c_ci) if c_ci else None,
        "backtest_error": bt["error"],
        "backtest_z": z,
        "frontier_points": n_front,
        "noise": noise.to_dict(),
    }
    if b_ci is None or c_ci is None:
        return Verdict(finding, claim, INCONCLUSIVE, "the frontier changes shape between bootstrap replicates", numbers)
    level = f"{100 * boot.level:.0f}%"
    shown = (
        f"L ~ C^-{est.b:.3g}, exponent {level} CI {_ci(b_ci)}; curvature {est.curvature:+.3g} {_ci(c_ci)}; "
        f"back-test on the largest third: mean log error {bt['error']:+.3f} (z = {z:+.2f}) over {n_front} "
        f"frontier points"
    )
    if b_ci[1] < 0:
        return Verdict(finding, claim, NOT_SUPPORTED, f"loss rises with compute: {shown}", numbers)
    if b_ci[0] <= 0:
        return Verdict(finding, claim, INCONCLUSIVE, f"the exponent's interval includes 0: {shown}", numbers)
    bends = c_ci[0] > 0 or c_ci[1] < 0
    misses = math.isfinite(z) and abs(z) > BACKTEST_Z
    if bends and misses:
        return Verdict(
            finding, claim, NOT_SUPPORTED, f"the frontier bends and misses its largest third: {shown}", numbers
        )
    if bends or misses or not math.isfinite(z):
        why = "the frontier bends" if bends else "the back-test misses" if misses else "too few points to back-test"
        return Verdict(finding, claim, INCONCLUSIVE, f"{why}: {shown}", numbers)
    return Verdict(finding, claim, SUPPORTED, shown, numbers)


def scale_together(est: Estimates, boot: Bootstrap, noise: Noise, design: StudyDesign) -> Verdict:
    """(b) The compute-optimal size, read off the envelope, grows as C^a with 0 < a < 1.

    At each compute level the envelope's best model is located by a parabola in log N (Hoffmann et al. 2022,
    Approach 2); ``a`` is the slope of log N_opt on log C, so epochs grow as C^(1-a). "Supported" needs the optimum
    strictly inside the ladder at two or more levels and a's interval inside (0, 1); "not supported" when the
    interval lies entirely at or below 0 (size does not grow) or at or above 1 (epochs do not grow).
    """
    finding, claim = "scale_together", "the compute-optimal model size and epoch budget both grow with compute"
    if len(design.models) < 3:
        return Verdict(
            finding, claim, INCONCLUSIVE, f"{len(design.models)} model sizes; need >= 3 to locate an optimum"
        )
    if len(set(design.cell_epochs.tolist())) < 2:
        return Verdict(finding, claim, INCONCLUSIVE, "only one epoch budget was trained")
    grid, _, interior = est.isoflop
    inside = int(interior.sum())
    numbers: dict[str, Any] = {"interior_levels": inside, "levels": len(grid), "a": est.size_exponent}
    if est.parametric is not None:
        numbers["parametric_a"] = est.parametric.size_exponent
    if inside < 2:
        where = (
            "no compute level is covered by three models"
            if not len(grid)
            else (
                f"the best model is the smallest or largest of the ladder at {len(grid) - inside} of {len(grid)} "
                "compute levels"
            )
        )
        return Verdict(finding, claim, INCONCLUSIVE, f"the optimum is not inside the ladder: {where}", numbers)
    if not noise.known:
        return Verdict(finding, claim, INCONCLUSIVE, _no_noise(noise), numbers)
    a_ci = boot.interval("a", est.size_exponent)
    numbers["a_interval"] = list(a_ci) if a_ci else None
    if a_ci is None:
        share = boot.defined("a")
        return Verdict(
            finding,
            claim,
            INCONCLUSIVE,
            f"the optimum leaves the ladder in {1 - share:.0%} of bootstrap replicates",
            numbers,
        )
    half = a_ci[0] <= 0.5 <= a_ci[1]
    numbers["equal_rates_in_interval"] = half
    shown = (
        f"N_opt ~ C^{est.size_exponent:.2f} {100 * boot.level:.0f}% CI {_ci(a_ci, 2)}, so epochs ~ "
        f"C^{1 - est.size_exponent:.2f}; the optimum is inside the ladder at {inside} of {len(grid)} compute levels; "
        f"the paper's equal rates (a = 0.5) {'lie' if half else 'do not lie'} in the interval"
    )
    if a_ci[0] > 0 and a_ci[1] < 1:
        return Verdict(finding, claim, SUPPORTED, shown, numbers)
    if a_ci[1] <= 0:
        return Verdict(finding, claim, NOT_SUPPORTED, f"model size does not grow: {shown}", numbers)
    if a_ci[0] >= 1:
        return Verdict(finding, claim, NOT_SUPPORTED, f"epochs do not grow: {shown}", numbers)
    return Verdict(finding, claim, INCONCLUSIVE, f"a's interval reaches outside (0, 1): {shown}", numbers)


def lr_falls(est: Estimates, boot: Bootstrap, noise: Noise, design: StudyDesign) -> Verdict:
    """(c) The slope of log lr* on log epochs (size held fixed) is negative.

    Each cell's optimum comes from >= 3 learning rates (a parabola in log2 lr through the best and its neighbours).
    "Supported" when the slope's interval is below 0, "not supported" only when it is above 0.
    """
    finding, claim = "lr_falls", "the optimal learning rate falls as the epoch budget rises"
    tried = design.lrs_per_cell
    if len(tried) and tried.max() <= 2:
        why = (
            "two learning rates per cell cannot show a fall (the better of two is always at an edge of the pair, so no "
            "cell has an interior optimum; the two-trial rule keeps alpha or alpha/2 by design)"
            if tried.max() == 2
            else "one learning rate per cell cannot show a fall (no cell has an optimum to compare)"
        )
        return Verdict(finding, claim, INCONCLUSIVE, f"{why}; run >= 3 learning rates per cell (tune-lr --grid)")
    with_three = int((tried >= 3).sum())
    edges = int((est.cells.edge != 0).sum())
    interior = int(math.isfinite(est.lr["cells"]) and est.lr["cells"])
    numbers: dict[str, Any] = {
        "cells_with_3_lrs": with_three,
        "optima_at_edge": edges,
        "interior_optima": interior,
        "epochs_slope": est.lr["epochs_slope"],
        "size_slope": est.lr["size_slope"],
    }
    if with_three and edges > MAX_EDGE_SHARE * with_three:
        return Verdict(
            finding,
            claim,
            INCONCLUSIVE,
            f"the best lr is at the edge of the grid in {edges} of {with_three} cells: widen the grid",
            numbers,
        )
    if not math.isfinite(est.lr["epochs_slope"]):
        return Verdict(
            finding,
            claim,
            INCONCLUSIVE,
            f"{interior} cells have an interior lr optimum; need >= 3 over >= 2 epoch budgets",
            numbers,
        )
    if not noise.known:
        return Verdict(finding, claim, INCONCLUSIVE, _no_noise(noise), numbers)
    ci = boot.interval("lr_epochs_slope", est.lr["epochs_slope"])
    numbers["epochs_slope_interval"] = list(ci) if ci else None
    if ci is None:
        return Verdict(
            finding, claim, INCONCLUSIVE, "the lr optima leave the grid in too many bootstrap replicates", numbers
        )
    shown = (
        f"lr* ~ epochs^{est.lr['epochs_slope']:+.2f} {100 * boot.level:.0f}% CI {_ci(ci, 2)} from {interior} "
        f"interior optima ({edges} at the grid edge)"
    )
    if ci[1] < 0:
        return Verdict(finding, claim, SUPPORTED, shown, numbers)
    if ci[0] > 0:
        return Verdict(finding, claim, NOT_SUPPORTED, f"the optimal lr rises: {shown}", numbers)
    return Verdict(finding, claim, INCONCLUSIVE, f"the slope's interval includes 0: {shown}", numbers)


def convnets_match_vits(
    est: Estimates, boot: Bootstrap, noise: Noise, design: StudyDesign, tolerance: float = MATCH_TOLERANCE
) -> Verdict | None:
    """(d) Over the families' shared compute range, is the ConvNet envelope within ``tolerance`` of the ViT one?

    None (no verdict) unless the runs hold the ViT family and at least one other. The gap is the mean log loss ratio
    (ConvNet / ViT) along the two envelopes; "supported" when its interval lies below ``log 1.05`` (ConvNets at most
    5% behind, or ahead), "not supported" when it lies above.
    """
    families = set(design.families)
    if VIT_FAMILY not in families or len(families) < 2:
        return None
    finding, claim = "families_match", "ConvNets match ViTs at equal pre-training compute"
    gap = est.family_gap
    if not math.isfinite(gap):
        return Verdict(finding, claim, INCONCLUSIVE, "the families' compute ranges do not overlap")
    if not noise.known:
        return Verdict(finding, claim, INCONCLUSIVE, _no_noise(noise), {"gap": gap})
    ci = boot.interval("family_gap", gap)
    numbers = {"gap": gap, "gap_interval": list(ci) if ci else None, "tolerance": tolerance}
    if ci is None:
        return Verdict(finding, claim, INCONCLUSIVE, "the shared compute range changes between replicates", numbers)
    pct = [100 * (math.exp(v) - 1) for v in (gap, *ci)]
    shown = (
        f"ConvNet loss {pct[0]:+.1f}% vs ViT at equal compute, {100 * boot.level:.0f}% CI "
        f"[{pct[1]:+.1f}%, {pct[2]:+.1f}%]; tolerance {100 * (math.exp(tolerance) - 1):.0f}%"
    )
    if ci[1] < tolerance:  # the paper's claim is that ConvNets are not behind: ahead by any margin supports it
        ahead = "ConvNets ahead by more than the tolerance: " if ci[1] < -tolerance else ""
        return Verdict(finding, claim, SUPPORTED, ahead + shown, numbers)
    if ci[0] > tolerance:
        return Verdict(finding, claim, NOT_SUPPORTED, f"ViTs ahead: {shown}", numbers)
    return Verdict(finding, claim, INCONCLUSIVE, f"the interval straddles the tolerance: {shown}", numbers)


def all_verdicts(est: Estimates, boot: Bootstrap, noise: Noise, design: StudyDesign) -> list[Verdict]:
    """The verdicts the runs allow, in the paper's order."""
    found = [
        log_log_law(est, boot, noise),
        scale_together(est, boot, noise, design),
        lr_falls(est, boot, noise, design),
        convnets_match_vits(est, boot, noise, design),
    ]
    return [v for v in found if v is not None]


def families_of(design: StudyDesign) -> tuple[Sequence[str], str] | None:
    """``(convnet families, vit family)`` when the study holds both, else None."""
    names = sorted(set(design.families))
    if VIT_FAMILY not in names or len(names) < 2:
        return None
    return [n for n in names if n != VIT_FAMILY], VIT_FAMILY
