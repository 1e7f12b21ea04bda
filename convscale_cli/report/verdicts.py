"""Verdicts on the paper's three pre-training findings, computed from the runs (never asserted).

Each verdict is "supported", "not supported" or "inconclusive" with the reason and the numbers behind it:

(a) Held-out loss follows a log-log law in compute (Smith et al. 2023, §2, Fig. 2).
(b) The compute-optimal model size and epoch budget both grow with compute (§2, "scale the model size and the number
    of training epochs at the same rate").
(c) The optimal learning rate falls (monotonically) as the epoch budget rises (§2, Fig. 3).
(d) When the runs hold ViTs and ConvNets: ConvNets match ViTs at equal pre-training compute (§3, the paper's title).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from convscale_cli.report.analysis import Cell, spearman
from convscale_cli.report.fit import ParametricFit, PowerLawFit

SUPPORTED = "supported"
NOT_SUPPORTED = "not supported"
INCONCLUSIVE = "inconclusive"
# R^2 of the log-log frontier fit at or above which a straight line describes it.
R2_THRESHOLD = 0.9
# Spearman correlation with compute at or above which a quantity "grows with compute" along the frontier.
RHO_THRESHOLD = 0.5
# Mean relative gap in held-out loss at matched compute within which two families "match".
MATCH_TOLERANCE = 0.05
# The family whose runs are the Vision Transformers; every other family counts as a ConvNet (NFNet, the ResNet example).
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


def log_log_law(fit: PowerLawFit | None, n_frontier: int, r2_threshold: float = R2_THRESHOLD) -> Verdict:
    """(a) Is the frontier a straight line on log-log axes, with a slope distinguishable from zero?"""
    claim = "held-out loss follows a log-log (power) law in pre-training compute"
    if fit is None or n_frontier < 3:
        return Verdict(
            "log_log_law",
            claim,
            INCONCLUSIVE,
            f"only {n_frontier} frontier point{'s' if n_frontier != 1 else ''}; need >= 3",
        )
    numbers = {"r2": fit.r2, "b": fit.b, "b_interval": list(fit.b_interval) if fit.b_interval else None}
    if fit.b_interval is None:
        return Verdict("log_log_law", claim, INCONCLUSIVE, "no bootstrap interval for the slope", numbers)
    lo, hi = fit.b_interval
    summary = (
        f"R^2 = {fit.r2:.3f} (threshold {r2_threshold:g}), exponent b = {fit.b:.4f} "
        f"with {100 * fit.level:.0f}% CI [{lo:.4f}, {hi:.4f}] over {n_frontier} frontier points"
    )
    if fit.r2 >= r2_threshold and lo > 0:
        return Verdict("log_log_law", claim, SUPPORTED, summary, numbers)
    why = []
    if fit.r2 < r2_threshold:
        why.append("R^2 below threshold")
    if lo <= 0:
        why.append("slope CI includes 0" if hi > 0 else "loss does not fall with compute")
    return Verdict("log_log_law", claim, NOT_SUPPORTED, f"{'; '.join(why)}: {summary}", numbers)


def _rho_or_zero(x: Sequence[float], y: Sequence[float]) -> float:
    # A quantity that stays constant along the frontier did not grow: that is a correlation of 0, not missing data.
    rho = spearman(x, y)
    return 0.0 if math.isnan(rho) and len(x) >= 3 else rho


def scale_together(
    cells: Sequence[Cell], front: Sequence[Cell], fit: ParametricFit | None = None, rho_threshold: float = RHO_THRESHOLD
) -> Verdict:
    """(b) Along the frontier, do both model size and epoch budget increase with compute?"""
    claim = "the compute-optimal model size and epoch budget both grow with compute"
    models = {c.model for c in cells}
    budgets = {c.epochs for c in cells}
    if len(models) < 2:
        return Verdict("scale_together", claim, INCONCLUSIVE, "only one model was trained")
    if len(budgets) < 2:
        return Verdict("scale_together", claim, INCONCLUSIVE, "only one epoch budget was trained")
    if len(front) < 3:
        return Verdict(
            "scale_together",
            claim,
            INCONCLUSIVE,
            f"only {len(front)} frontier point{'s' if len(front) != 1 else ''}; need >= 3",
        )
    compute = [c.core_hours for c in front]
    rho_size = _rho_or_zero(compute, [c.params for c in front])
    rho_epochs = _rho_or_zero(compute, [c.epochs for c in front])
    numbers: dict[str, Any] = {
        "spearman_size": rho_size,
        "spearman_epochs": rho_epochs,
        "frontier": [(c.model, c.epochs, c.core_hours) for c in front],
    }
    summary = (
        f"Spearman correlation with compute along {len(front)} frontier points: model size {rho_size:+.2f}, "
        f"epochs {rho_epochs:+.2f} (threshold {rho_threshold:+.2f})"
    )
    if fit is not None:
        a_exp, b_exp = fit.allocation_exponents()
        numbers.update(optimal_size_exponent=a_exp, optimal_data_exponent=b_exp, fit_identifiable=fit.identifiable)
        caveat = "" if fit.identifiable else ", fit not identifiable"
        summary += f"; parametric fit: N_opt ~ C^{a_exp:.2f}, D_opt ~ C^{b_exp:.2f}{caveat}"
    if rho_size >= rho_threshold and rho_epochs >= rho_threshold:
        return Verdict("scale_together", claim, SUPPORTED, summary, numbers)
    lagging = [name for name, rho in (("model size", rho_size), ("epochs", rho_epochs)) if rho < rho_threshold]
    return Verdict("scale_together", claim, NOT_SUPPORTED, f"{' and '.join(lagging)} did not grow: {summary}", numbers)


def lr_falls(lr_table: dict[str, list[dict[str, Any]]]) -> Verdict:
    """(c) Per model, is the optimal lr non-increasing in the epoch budget, and does it fall somewhere?"""
    claim = "the optimal learning rate falls as the epoch budget rises"
    usable = {model: rows for model, rows in lr_table.items() if len(rows) >= 2}
    if not usable:
        return Verdict("lr_falls", claim, INCONCLUSIVE, "no model has >= 2 epoch budgets with >= 2 learning rates each")
    rising, falling, sequences = [], [], {}
    edges = sum(row["at_edge"] for rows in usable.values() for row in rows)
    for model, rows in sorted(usable.items()):
        lrs = [row["lr"] for row in sorted(rows, key=lambda r: r["epochs"])]
        sequences[model] = [(row["epochs"], row["lr"]) for row in rows]
        if any(b > a for a, b in zip(lrs, lrs[1:], strict=False)):
            rising.append(model)
        if any(b < a for a, b in zip(lrs, lrs[1:], strict=False)):
            falling.append(model)
    numbers = {"sequences": sequences, "rising": rising, "falling": falling, "best_lr_at_grid_edge": edges}
    shown = "; ".join(f"{model}: " + ", ".join(f"{e:g}ep->{lr:g}" for e, lr in seq) for model, seq in sequences.items())
    note = f" ({edges} optima at the edge of the lr grid)" if edges else ""
    if rising:
        return Verdict(
            "lr_falls",
            claim,
            NOT_SUPPORTED,
            f"optimal lr rises with epochs for {', '.join(rising)}: {shown}{note}",
            numbers,
        )
    if not falling:
        return Verdict("lr_falls", claim, INCONCLUSIVE, f"optimal lr is flat across budgets: {shown}{note}", numbers)
    return Verdict(
        "lr_falls",
        claim,
        SUPPORTED,
        f"non-increasing for all {len(usable)} models, falling for {len(falling)}: {shown}{note}",
        numbers,
    )


def convnets_match_vits(comparison: dict[str, Any] | None, tolerance: float = MATCH_TOLERANCE) -> Verdict | None:
    """(d) At matched compute, is the best ConvNet's held-out loss within ``tolerance`` of the best ViT's, on average?

    ``comparison`` is :func:`~convscale_cli.report.analysis.family_comparison`'s result; None (no verdict) unless the
    runs hold the ViT family and at least one other. At each matched compute the ConvNet side is the lowest loss of
    any ConvNet family reached with at most that compute; the gap is (ConvNet - ViT) / ViT, negative when ConvNets
    lead. Being ahead by more than the tolerance still supports the claim that ConvNets are not behind.
    """
    families = sorted((comparison or {}).get("families") or {})
    convnets = [name for name in families if name != VIT_FAMILY]
    if VIT_FAMILY not in families or not convnets:
        return None
    claim = "ConvNets match ViTs at equal pre-training compute"
    assert comparison is not None
    gaps = []
    for row in comparison.get("matched") or []:
        conv = min((row[name] for name in convnets if math.isfinite(row.get(name, math.nan))), default=math.nan)
        vit = row.get(VIT_FAMILY, math.nan)
        if math.isfinite(conv) and math.isfinite(vit) and vit > 0:
            gaps.append((row["core_hours"], (conv - vit) / vit))
    if len(gaps) < 2:
        reason = ("the families' compute ranges do not overlap" if not comparison.get("overlap")
                  else f"only {len(gaps)} matched-compute point(s); need >= 2")
        return Verdict("families_match", claim, INCONCLUSIVE, reason)
    values = [g for _, g in gaps]
    mean = sum(values) / len(values)
    lead = sum(g < 0 for g in values)
    numbers = {"mean_gap": mean, "min_gap": min(values), "max_gap": max(values), "points": len(values),
               "convnet_ahead_at": lead, "tolerance": tolerance, "convnets": convnets}
    shown = (f"ConvNet loss {mean:+.1%} vs ViT on average over {len(values)} matched-compute points (range "
             f"{min(values):+.1%} to {max(values):+.1%}; ConvNet ahead at {lead}), tolerance {tolerance:.0%}")
    if mean > tolerance:
        return Verdict("families_match", claim, NOT_SUPPORTED, f"ViTs ahead: {shown}", numbers)
    where = "ConvNets ahead" if mean < -tolerance else "within tolerance"
    return Verdict("families_match", claim, SUPPORTED, f"{where}: {shown}", numbers)
