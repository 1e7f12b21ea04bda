"""Shared pieces of the scaling-law fits: the error type and array checks."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from convscale_cli.errors import UsageError

ArrayLike = float | Sequence[float] | np.ndarray


class FitError(UsageError):
    """The data cannot support the requested fit (too few points, non-positive values)."""


def positive_array(name: str, values: ArrayLike) -> np.ndarray:
    """``values`` as a 1-D float64 array, or a FitError naming the first value a log cannot take."""
    array = np.atleast_1d(np.asarray(values, dtype=np.float64))
    if array.ndim != 1:
        raise FitError(f"{name} must be one-dimensional, got shape {array.shape}")
    if not np.all(np.isfinite(array)) or np.any(array <= 0):
        bad = array[~np.isfinite(array) | (array <= 0)][0]
        raise FitError(f"{name} must be finite and > 0 for a log-log fit, got {bad}")
    return array


def quantile_interval(samples: np.ndarray, level: float, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Equal-tailed percentile interval of bootstrap draws along ``axis``."""
    tail = (1.0 - level) / 2.0
    return np.quantile(samples, tail, axis=axis), np.quantile(samples, 1.0 - tail, axis=axis)


def check_level(level: float) -> float:
    """A confidence level in (0, 1), or a FitError."""
    if not 0.0 < level < 1.0:
        raise FitError(f"confidence level must be in (0, 1), got {level}")
    return float(level)
