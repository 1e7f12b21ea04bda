"""Scaling-law fit types: the frontier power law and the parametric law L(N, D) of Hoffmann et al.

Smith et al. (2023, §2, Fig. 2) report "a clear linear trend" of held-out loss against TPU-v4 core-hours on log-log
axes but give no exponent. :class:`PowerLawFit` holds ``L = a * C**(-b)`` with its intervals; the report builds it
from :mod:`convscale_cli.report.estimates` with intervals from the bootstrap over runs
(:mod:`convscale_cli.report.inference`). :func:`fit_power_law` is a standalone least-squares fit with a pairs
bootstrap, for points that are independent (it knows nothing of cells, seeds or best-lr selection).
:func:`fit_parametric` (from :mod:`.parametric`) fits ``L(N, D) = E + A/N**alpha + B/D**beta``.

Only numpy is imported at module level.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from convscale_cli.report._fitting import ArrayLike, FitError, check_level, positive_array, quantile_interval
from convscale_cli.report.parametric import ParametricFit, fit_parametric

__all__ = ["FitError", "ParametricFit", "PowerLawFit", "fit_parametric", "fit_power_law"]


@dataclass(frozen=True)
class PowerLawFit:
    """``loss = a * compute**(-b)``, fitted in log space.

    Attributes:
        a: Loss at one unit of compute.
        b: Decay exponent (positive when loss falls with compute).
        r2: Coefficient of determination of the log-log regression.
        n: Number of points fitted.
        level: Confidence level of the intervals.
        a_interval: Bootstrap interval of ``a`` (None without a bootstrap).
        b_interval: Bootstrap interval of ``b`` (None without a bootstrap).
        compute_range: Smallest and largest compute fitted.
        samples: Bootstrap draws of ``(log a, b)``, shape ``(k, 2)``.
    """

    a: float
    b: float
    r2: float
    n: int
    level: float
    a_interval: tuple[float, float] | None
    b_interval: tuple[float, float] | None
    compute_range: tuple[float, float]
    samples: np.ndarray = field(repr=False, compare=False)

    def predict(self, compute: ArrayLike) -> np.ndarray:
        """Predicted loss at each compute value."""
        c = positive_array("compute", compute)
        return self.a * c ** (-self.b)

    def interval(self, compute: ArrayLike, level: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Pointwise bootstrap band of the fitted curve (the prediction itself when there is no bootstrap)."""
        c = positive_array("compute", compute)
        if len(self.samples) == 0:
            mid = self.predict(c)
            return mid, mid
        curves = np.exp(self.samples[:, :1] - self.samples[:, 1:] * np.log(c)[None, :])
        return quantile_interval(curves, check_level(level or self.level))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no bootstrap draws)."""
        return {
            "law": "L = a * C^(-b)",
            "a": self.a,
            "b": self.b,
            "r2": self.r2,
            "n": self.n,
            "level": self.level,
            "a_interval": list(self.a_interval) if self.a_interval else None,
            "b_interval": list(self.b_interval) if self.b_interval else None,
            "compute_range": list(self.compute_range),
            "bootstrap": len(self.samples),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PowerLawFit:
        """Rebuild a fit from :meth:`to_dict` output (e.g. ``fit.json``); bootstrap draws are not stored there."""
        try:
            return cls(
                a=float(data["a"]),
                b=float(data["b"]),
                r2=float(data["r2"]),
                n=int(data["n"]),
                level=float(data["level"]),
                a_interval=tuple(data["a_interval"]) if data.get("a_interval") else None,
                b_interval=tuple(data["b_interval"]) if data.get("b_interval") else None,
                compute_range=(float(data["compute_range"][0]), float(data["compute_range"][1])),
                samples=np.zeros((0, 2)),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise FitError(f"not a power-law fit: {exc!r} missing or malformed") from exc


def _ols(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    slope, intercept = np.polyfit(x, y, 1)
    return float(intercept), float(slope)


def fit_power_law(
    compute: ArrayLike, loss: ArrayLike, *, bootstrap: int = 1000, level: float = 0.9, seed: int = 0
) -> PowerLawFit:
    """Fit ``loss = a * compute**(-b)`` by least squares on ``log loss`` against ``log compute``.

    Args:
        compute: Compute per point (any positive unit; the report uses TPU-v4 core-hours).
        loss: Held-out loss per point (positive).
        bootstrap: Pairs-bootstrap resamples for the intervals; 0 disables them. Needs at least 3 points.
        level: Confidence level of the intervals.
        seed: Seed of the bootstrap resampling, so reports are reproducible.

    Returns:
        The fit, with bootstrap intervals of ``a`` and ``b`` and draws for a confidence band.

    Raises:
        FitError: Fewer than two distinct compute values, mismatched lengths or non-positive values.
    """
    c, y = positive_array("compute", compute), positive_array("loss", loss)
    if len(c) != len(y):
        raise FitError(f"compute and loss differ in length: {len(c)} vs {len(y)}")
    if len(np.unique(c)) < 2:
        raise FitError(f"a power law needs at least 2 distinct compute values, got {len(np.unique(c))}")
    level = check_level(level)
    x, ly = np.log(c), np.log(y)
    log_a, slope = _ols(x, ly)
    residual = ly - (log_a + slope * x)
    total = float(np.sum((ly - ly.mean()) ** 2))
    r2 = 1.0 - float(np.sum(residual**2)) / total if total > 0 else 1.0

    draws: list[tuple[float, float]] = []
    if bootstrap > 0 and len(c) >= 3:
        rng = np.random.default_rng(seed)
        for _ in range(bootstrap):
            idx = rng.integers(0, len(c), len(c))
            if len(np.unique(x[idx])) < 2:  # a resample of one compute value has no slope
                continue
            la, sl = _ols(x[idx], ly[idx])
            draws.append((la, -sl))
    samples = np.asarray(draws, dtype=np.float64).reshape(-1, 2)
    a_interval = b_interval = None
    if len(samples):
        lo, hi = quantile_interval(samples, level)
        a_interval = (float(np.exp(lo[0])), float(np.exp(hi[0])))
        b_interval = (float(lo[1]), float(hi[1]))
    return PowerLawFit(
        a=float(np.exp(log_a)),
        b=-slope,
        r2=r2,
        n=len(c),
        level=level,
        a_interval=a_interval,
        b_interval=b_interval,
        compute_range=(float(c.min()), float(c.max())),
        samples=samples,
    )
