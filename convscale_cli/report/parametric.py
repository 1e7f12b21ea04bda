"""The parametric law ``L(N, D) = E + A/N**alpha + B/D**beta`` (Hoffmann et al. 2022, Approach 3).

A Huber loss on log-space residuals, minimised with multi-start L-BFGS from a grid, with bootstrap intervals and
explicit warnings when the exponents are not identifiable from the data. Import it from
:mod:`convscale_cli.report.fit`. scipy loads inside :func:`fit_parametric`, keeping ``convscale plan`` fast.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from convscale_cli.report._fitting import ArrayLike, FitError, check_level, positive_array, quantile_interval

# Hoffmann et al. (2022, App. D.2) use delta = 1e-3: residuals above it count linearly, so a few runs that diverged or
# were cut short cannot drag the exponents.
HUBER_DELTA = 1e-3
# Exponent bounds for the optimiser: a decay faster than 1/N**3 is not a scaling law, and 0 means "no dependence".
_EXPONENT_BOUNDS = (1e-3, 3.0)
# Identifiability thresholds (see ParametricFit.warnings).
MIN_DISTINCT = 3
MIN_SPAN = 4.0
MAX_EXPONENT_CI_RATIO = 10.0
MAX_COEFFICIENT_CI_ORDERS = 2.0

_NAMES = ("E", "A", "alpha", "B", "beta")


@dataclass(frozen=True)
class ParametricFit:
    """``L(N, D) = E + A / N**alpha + B / D**beta`` (Hoffmann et al. 2022, Approach 3).

    Attributes:
        E: Irreducible loss.
        A: Model-size coefficient.
        alpha: Model-size exponent.
        B: Data coefficient.
        beta: Data exponent.
        n: Number of runs fitted.
        n_sizes: Distinct model sizes among them.
        size_axis: What N measures ("params" or "macs").
        level: Confidence level of ``intervals``.
        intervals: Bootstrap interval per parameter name (empty without a bootstrap).
        warnings: Why the exponents may not be identifiable; empty when the data constrain them.
        objective: Final Huber objective (sum over runs).
        samples: Bootstrap draws of ``(E, A, alpha, B, beta)``, shape ``(k, 5)``.
    """

    E: float
    A: float
    alpha: float
    B: float
    beta: float
    n: int
    n_sizes: int
    size_axis: str
    level: float
    intervals: dict[str, tuple[float, float]]
    warnings: tuple[str, ...]
    objective: float
    samples: np.ndarray = field(repr=False, compare=False)

    @property
    def identifiable(self) -> bool:
        """True when no identifiability warning was raised."""
        return not self.warnings

    def predict(self, N: ArrayLike, D: ArrayLike) -> np.ndarray:  # noqa: N803  (the paper's names)
        """Predicted loss for model size(s) ``N`` trained on ``D`` examples (broadcast)."""
        n, d = positive_array("N", N), positive_array("D", D)
        return _law(np.array([self.E, self.A, self.alpha, self.B, self.beta]), n, d)

    def interval(
        self,
        N: ArrayLike,  # noqa: N803
        D: ArrayLike,  # noqa: N803
        level: float | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Pointwise bootstrap interval of the prediction (the prediction itself without a bootstrap)."""
        n, d = positive_array("N", N), positive_array("D", D)
        if len(self.samples) == 0:
            mid = self.predict(n, d)
            return mid, mid
        preds = np.stack([_law(p, n, d) for p in self.samples])
        return quantile_interval(preds, check_level(level or self.level))

    def allocation_exponents(self) -> tuple[float, float]:
        """Exponents of the compute-optimal ``N_opt ~ C**a`` and ``D_opt ~ C**b`` when ``C ~ N * D``.

        Hoffmann et al. (2022, eq. 4): ``a = beta / (alpha + beta)`` and ``b = alpha / (alpha + beta)``. Smith et al.
        (§2) find model size and epochs should grow "at the same rate", i.e. ``a ~ b ~ 0.5``. Exact only when N counts
        MACs (training compute is ~6 * MACs * D); with N = params it holds as far as params track MACs.
        """
        total = self.alpha + self.beta
        return self.beta / total, self.alpha / total

    def optimal_allocation(
        self, compute: ArrayLike, cost_per_size_example: float = 6.0
    ) -> tuple[np.ndarray, np.ndarray]:
        """Compute-optimal ``(N, D)`` for a budget ``compute = cost_per_size_example * N * D`` (Hoffmann et al., eq. 4).

        With N in MACs per image and compute in FLOPs, training costs ~6 FLOPs per MAC per example (forward plus
        backward), hence the default. The result is a continuous size: a model of that size may not exist.

        Args:
            compute: Budget(s) in the unit that ``cost_per_size_example * N * D`` is measured in.
            cost_per_size_example: Compute per unit of N per training example.

        Returns:
            ``(N_opt, D_opt)`` arrays.
        """
        c = positive_array("compute", compute) / cost_per_size_example
        a_exp, b_exp = self.allocation_exponents()
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))
        n_opt = g * c**a_exp
        return n_opt, c / n_opt

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no bootstrap draws)."""
        a_exp, b_exp = self.allocation_exponents()
        return {
            "law": "L = E + A / N^alpha + B / D^beta",
            **{name: getattr(self, name) for name in _NAMES},
            "n": self.n,
            "n_sizes": self.n_sizes,
            "size_axis": self.size_axis,
            "level": self.level,
            "intervals": {k: list(v) for k, v in self.intervals.items()},
            "identifiable": self.identifiable,
            "warnings": list(self.warnings),
            "objective": self.objective,
            "bootstrap": len(self.samples),
            "optimal_size_exponent": a_exp,
            "optimal_data_exponent": b_exp,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ParametricFit:
        """Rebuild a fit from :meth:`to_dict` output (e.g. ``fit.json``); bootstrap draws are not stored there."""
        try:
            return cls(
                **{name: float(data[name]) for name in _NAMES},
                n=int(data["n"]),
                n_sizes=int(data["n_sizes"]),
                size_axis=str(data["size_axis"]),
                level=float(data["level"]),
                intervals={k: (float(v[0]), float(v[1])) for k, v in data.get("intervals", {}).items()},
                warnings=tuple(data.get("warnings", ())),
                objective=float(data.get("objective", math.nan)),
                samples=np.zeros((0, len(_NAMES))),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise FitError(f"not a parametric fit: {exc!r} missing or malformed") from exc


def _law(params: np.ndarray, n: np.ndarray, d: np.ndarray) -> np.ndarray:
    e, a, alpha, b, beta = params
    # Logs keep A / N**alpha finite for large N and exponents.
    return e + np.exp(np.log(a) - alpha * np.log(n)) + np.exp(np.log(b) - beta * np.log(d))


def _huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    small = np.abs(r) <= delta
    value = np.where(small, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta))
    grad = np.where(small, r, delta * np.sign(r))
    return value, grad


def _objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, delta: float):  # noqa: ANN202
    """Huber loss of ``logsumexp(a - alpha log N, b - beta log D, e) - log L`` and its gradient.

    ``theta = (e, a, alpha, b, beta)`` with ``E = exp(e)`` etc.: the log-sum-exp form of Hoffmann et al. keeps every
    term positive without constraints and is smooth for L-BFGS.
    """
    e, a, alpha, b, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
    top = terms.max(axis=0)
    weights = np.exp(terms - top)
    total = weights.sum(axis=0)
    lse = top + np.log(total)
    weights /= total
    value, dr = _huber(lse - log_l, delta)
    grad = np.array(
        [
            np.sum(dr * weights[2]),
            np.sum(dr * weights[0]),
            -np.sum(dr * weights[0] * log_n),
            np.sum(dr * weights[1]),
            -np.sum(dr * weights[1] * log_d),
        ]
    )
    return float(value.sum()), grad


def _start_grid(log_l: np.ndarray) -> np.ndarray:
    """Starting points in normalised units (N and D divided by their geometric means), Hoffmann-style grid."""
    low = float(np.exp(log_l.min()))
    es = [math.log(low * q) for q in (0.05, 0.5, 0.9)]
    coefficients = [math.log(low * q) for q in (0.02, 0.2, 1.0)]
    exponents = [0.1, 0.4, 1.0, 2.0]
    return np.array(list(itertools.product(es, coefficients, exponents, coefficients, exponents)))


def _best_starts(grid: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, delta: float, k: int):
    """The ``k`` grid points with the lowest objective: only they are worth a local optimisation."""
    values = np.array([_objective(s, log_n, log_d, log_l, delta)[0] for s in grid])
    return grid[np.argsort(values)[:k]]


def _single_blas_thread() -> contextlib.AbstractContextManager[Any]:
    """Limit BLAS to one thread while optimising.

    L-BFGS-B calls BLAS on 5-vectors every iteration; with a multi-threaded BLAS on a busy machine each call pays for
    waking threads, which measured 25x slower than single-threaded. threadpoolctl ships with scikit-learn.
    """
    import scipy.optimize  # noqa: F401  (load scipy's own OpenBLAS first: threadpoolctl limits loaded libraries only)

    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - only slower, never wrong
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _minimise(starts: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, delta: float):
    """L-BFGS-B from every start; returns ``(theta, objective)`` of the best local minimum."""
    from scipy.optimize import minimize

    bounds = [(None, None), (None, None), _EXPONENT_BOUNDS, (None, None), _EXPONENT_BOUNDS]
    best_theta, best_value = starts[0], math.inf
    for start in starts:
        result = minimize(
            _objective,
            start,
            args=(log_n, log_d, log_l, delta),
            jac=True,
            method="L-BFGS-B",
            bounds=bounds,
            options={"maxiter": 500},
        )
        if np.all(np.isfinite(result.x)) and result.fun < best_value:
            best_theta, best_value = result.x, float(result.fun)
    return np.asarray(best_theta, dtype=np.float64), best_value


def _denormalise(theta: np.ndarray, n0: float, d0: float) -> np.ndarray:
    """(e, a', alpha, b', beta) in units of N/n0, D/d0 -> (E, A, alpha, B, beta) in raw units."""
    e, a, alpha, b, beta = theta
    return np.array([math.exp(e), math.exp(a + alpha * math.log(n0)), alpha, math.exp(b + beta * math.log(d0)), beta])


def _span(values: np.ndarray) -> float:
    return float(values.max() / values.min())


def _identifiability_warnings(
    n: np.ndarray, d: np.ndarray, params: np.ndarray, intervals: dict[str, tuple[float, float]]
) -> list[str]:
    found: list[str] = []
    for label, values, exponent in (("model sizes", n, "alpha"), ("data sizes", d, "beta")):
        distinct = len(np.unique(values))
        if distinct < MIN_DISTINCT:
            found.append(f"only {distinct} distinct {label}: {exponent} is not identifiable (need >= {MIN_DISTINCT})")
        elif _span(values) < MIN_SPAN:
            found.append(f"{label} span only {_span(values):.1f}x: {exponent} is poorly constrained (< {MIN_SPAN:g}x)")
    if len(n) < 2 * len(_NAMES):
        found.append(f"only {len(n)} runs for 5 parameters (want >= {2 * len(_NAMES)})")
    for name, value in (("alpha", params[2]), ("beta", params[4])):
        if value <= _EXPONENT_BOUNDS[0] * 1.01 or value >= _EXPONENT_BOUNDS[1] * 0.99:
            found.append(f"{name} = {value:.3g} sits at its bound {_EXPONENT_BOUNDS}")
    for name in ("alpha", "beta"):
        if name in intervals:
            lo, hi = intervals[name]
            if lo <= 0 or hi / lo > MAX_EXPONENT_CI_RATIO:
                found.append(
                    f"bootstrap interval of {name} [{lo:.3g}, {hi:.3g}] spans more than {MAX_EXPONENT_CI_RATIO:g}x"
                )
    for name in ("A", "B"):
        if name in intervals:
            lo, hi = intervals[name]
            if lo <= 0 or math.log10(hi / lo) > MAX_COEFFICIENT_CI_ORDERS:
                found.append(f"bootstrap interval of {name} [{lo:.3g}, {hi:.3g}] spans orders of magnitude")
    return found


def fit_parametric(
    N: ArrayLike,  # noqa: N803  (the paper's names)
    D: ArrayLike,  # noqa: N803
    loss: ArrayLike,
    *,
    size_axis: str = "params",
    bootstrap: int = 100,
    level: float = 0.9,
    seed: int = 0,
    huber_delta: float = HUBER_DELTA,
    starts: int = 12,
) -> ParametricFit:
    """Fit ``L(N, D) = E + A / N**alpha + B / D**beta`` to runs.

    Args:
        N: Model size per run (parameters, or MACs per image; see ``size_axis``).
        D: Training examples seen per run.
        loss: Held-out loss per run.
        size_axis: Label recorded with the fit ("params" or "macs").
        bootstrap: Resamples for the intervals; 0 disables them.
        level: Confidence level of the intervals.
        seed: Bootstrap seed.
        huber_delta: Huber threshold on log-space residuals.
        starts: Local optimisations launched from the best points of the start grid.

    Returns:
        The fit with bootstrap intervals and identifiability warnings.

    Raises:
        FitError: Fewer than 5 runs, mismatched lengths or non-positive values.
    """
    n, d, y = positive_array("N", N), positive_array("D", D), positive_array("loss", loss)
    if not len(n) == len(d) == len(y):
        raise FitError(f"N, D and loss differ in length: {len(n)}, {len(d)}, {len(y)}")
    if len(n) < len(_NAMES):
        raise FitError(f"the parametric law has 5 parameters and needs at least 5 runs, got {len(n)}")
    if size_axis not in ("params", "macs"):
        raise FitError(f"size_axis must be 'params' or 'macs', got {size_axis!r}")
    level = check_level(level)
    # Normalising by the geometric means makes A and B O(loss) at the start, which L-BFGS needs to converge reliably.
    n0, d0 = float(np.exp(np.log(n).mean())), float(np.exp(np.log(d).mean()))
    log_n, log_d, log_l = np.log(n / n0), np.log(d / d0), np.log(y)
    if starts < 1:
        raise FitError(f"starts must be >= 1, got {starts}")
    best = _best_starts(_start_grid(log_l), log_n, log_d, log_l, huber_delta, starts)
    draws = []
    with _single_blas_thread():
        theta, value = _minimise(best, log_n, log_d, log_l, huber_delta)
        if bootstrap > 0:
            rng = np.random.default_rng(seed)
            # Warm-start each resample from the full-data optimum: a resample's optimum lies close to it, and one
            # local run per resample keeps a 100-draw bootstrap to seconds.
            warm = theta[None, :]
            for _ in range(bootstrap):
                idx = rng.integers(0, len(n), len(n))
                t, _ = _minimise(warm, log_n[idx], log_d[idx], log_l[idx], huber_delta)
                draws.append(_denormalise(t, n0, d0))
    params = _denormalise(theta, n0, d0)
    samples = np.asarray(draws, dtype=np.float64).reshape(-1, len(_NAMES))
    intervals: dict[str, tuple[float, float]] = {}
    if len(samples):
        lo, hi = quantile_interval(samples, level)
        intervals = {name: (float(lo[i]), float(hi[i])) for i, name in enumerate(_NAMES)}
    return ParametricFit(
        E=float(params[0]),
        A=float(params[1]),
        alpha=float(params[2]),
        B=float(params[3]),
        beta=float(params[4]),
        n=len(n),
        n_sizes=len(np.unique(n)),
        size_axis=size_axis,
        level=level,
        intervals=intervals,
        warnings=tuple(_identifiability_warnings(n, d, params, intervals)),
        objective=value,
        samples=samples,
    )
