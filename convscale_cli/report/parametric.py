"""The parametric law ``L(N, D) = E + A/N**alpha + B/D**beta`` (Hoffmann et al. 2022, Approach 3).

Hoffmann et al. fit it with L-BFGS on a Huber loss of log residuals from a grid of starts; Besiroglu et al. (2024,
"Chinchilla Scaling: A replication attempt") showed that fit had stopped early and its intervals were far too narrow.
Here the law is fitted by variable projection: for fixed exponents ``(alpha, beta)`` the law is linear in
``(E, A, B)``, so those three are solved exactly by non-negative least squares, and the exponents are searched on a
dense log-spaced grid refined twice around the best point. There is no start to get stuck at, every bootstrap
replicate gets the same global search, and an estimate sitting on a bound (``E = 0``, an exponent at the end of the
grid, ``A = 0`` or ``B = 0``) is reported as such instead of silently.

The objective is least squares on relative residuals ``(L_hat - L) / L``, i.e. on log residuals to first order: the
maximum-likelihood fit under the log-normal run noise the calibration (``benchmarks/bench_calibration.py``) measures.
Intervals come from :mod:`convscale_cli.report.inference` (a bootstrap over runs through the whole pipeline), not
from this module; the fitted law with its intervals and caveats is :class:`convscale_cli.report.fit.ParametricFit`.
numpy, and scipy for the final polish.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from convscale_cli.report._fitting import ArrayLike, FitError, positive_array

# The exponent grid: a decay slower than N**-0.02 is indistinguishable from none over any study's span, and one
# faster than N**-3 is not a scaling law.
EXPONENT_RANGE = (0.02, 3.0)
_COARSE = 20
_REFINE = 7

NAMES = ("E", "A", "alpha", "B", "beta")
# A term stays in the law only when leaving it out worsens the fit by more than the run noise would by chance: the
# likelihood-ratio statistic (increase of the residual sum of squares over the noise variance) must exceed the 90%
# point of chi-square with 1 degree of freedom. The left-out coefficient lies on its bound 0 under the null, where
# the statistic is distributed as the mixture 1/2 chi2_0 + 1/2 chi2_1 (Self & Liang 1987), so this is a 5% test.
TERM_CRITICAL = 2.706


@dataclass(frozen=True)
class ParametricPoint:
    """One fit of the law (raw units of N and D).

    Attributes:
        E, A, alpha, B, beta: The law's parameters.
        rms: Root-mean-square relative residual.
        at_bound: Names of the parameters that sit on a bound of the search (``E``, ``A``, ``B`` at 0; an exponent at
            the end of its grid).
        left_out: Terms the fit left out (``E``, ``A``, ``B``): their coefficient is 0 and their exponent NaN.
    """

    E: float
    A: float
    alpha: float
    B: float
    beta: float
    rms: float
    at_bound: tuple[str, ...] = ()
    left_out: tuple[str, ...] = ()

    @property
    def size_exponent(self) -> float:
        """``a`` in ``N_opt ~ C**a`` when ``C ~ N * D`` (Hoffmann et al. eq. 4): ``beta / (alpha + beta)``."""
        return self.beta / (self.alpha + self.beta)

    def array(self) -> np.ndarray:
        """``(E, A, alpha, B, beta)``."""
        return np.array([self.E, self.A, self.alpha, self.B, self.beta])


def law(params: np.ndarray, n: np.ndarray, d: np.ndarray) -> np.ndarray:
    """``E + A / N**alpha + B / D**beta`` for ``params = (E, A, alpha, B, beta)`` (broadcast).

    A term whose coefficient is 0 is 0 whatever its exponent (NaN for a term the fit left out).
    """
    e, a, alpha, b, beta = params
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        size = np.where(a > 0, a * np.exp(-alpha * np.log(n)), 0.0)
        data = np.where(b > 0, b * np.exp(-beta * np.log(d)), 0.0)
    return e + size + data


_SUBSETS = ((0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2))


def _subset_solve(
    gram: np.ndarray, rhs: np.ndarray, total: float, subsets: tuple[tuple[int, ...], ...] = _SUBSETS
) -> tuple[np.ndarray, np.ndarray]:
    """Exact non-negative least squares in three unknowns for a batch of normal equations.

    The NNLS optimum is the unconstrained least-squares solution on some subset of the columns with all its
    coefficients positive, and every such feasible subset solution is a feasible point: so the feasible subset
    solution of least objective is the NNLS optimum. Seven subsets, each solved in closed form for the whole batch.

    Args:
        gram: ``[G, 3, 3]`` normal matrices.
        rhs: ``[G, 3]`` right-hand sides.
        total: the squared norm of the target vector.

    Returns:
        ``(coefficients [G, 3], objective [G])``.
    """
    g = gram.shape[0]
    best = np.full(g, np.inf)
    coef = np.zeros((g, 3))
    # A tiny ridge keeps exactly collinear columns (one distinct N) solvable; it changes nothing measurable.
    gram = gram + 1e-12 * np.trace(gram, axis1=1, axis2=2)[:, None, None] * np.eye(3)
    for cols in subsets:
        x = _solve_small(gram[:, cols][:, :, cols], rhs[:, cols])
        value = total - np.sum(x * rhs[:, cols], axis=1)
        ok = np.all(x >= 0, axis=1) & np.isfinite(value) & (value < best)
        best = np.where(ok, value, best)
        full = np.zeros((g, 3))
        full[:, cols] = x
        coef = np.where(ok[:, None], full, coef)
    return coef, best


def _solve_small(m: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Solve ``m x = r`` for every row by Cramer's rule (1 to 3 unknowns); inf/NaN where singular."""
    k = r.shape[1]
    with np.errstate(divide="ignore", invalid="ignore"):
        if k == 1:
            return r / m[:, :, 0]
        if k == 2:
            det = m[:, 0, 0] * m[:, 1, 1] - m[:, 0, 1] * m[:, 1, 0]
            return np.stack(
                [
                    (r[:, 0] * m[:, 1, 1] - m[:, 0, 1] * r[:, 1]) / det,
                    (m[:, 0, 0] * r[:, 1] - m[:, 1, 0] * r[:, 0]) / det,
                ],
                axis=1,
            )
        # 3x3: the adjugate of a symmetric matrix.
        a, b, c = m[:, 0, 0], m[:, 0, 1], m[:, 0, 2]
        d, e, f = m[:, 1, 1], m[:, 1, 2], m[:, 2, 2]
        c00, c01, c02 = d * f - e * e, c * e - b * f, b * e - c * d
        c11, c12, c22 = a * f - c * c, b * c - a * e, a * d - b * b
        det = a * c00 + b * c01 + c * c02
        return np.stack(
            [
                (c00 * r[:, 0] + c01 * r[:, 1] + c02 * r[:, 2]) / det,
                (c01 * r[:, 0] + c11 * r[:, 1] + c12 * r[:, 2]) / det,
                (c02 * r[:, 0] + c12 * r[:, 1] + c22 * r[:, 2]) / det,
            ],
            axis=1,
        )


def _grid_objective(
    alphas: np.ndarray,
    betas: np.ndarray,
    log_n: np.ndarray,
    log_d: np.ndarray,
    inv_l: np.ndarray,
    subsets: tuple[tuple[int, ...], ...] = _SUBSETS,
) -> tuple[np.ndarray, np.ndarray]:
    """NNLS of ``(E, A, B)`` at every pair of the grid ``alphas x betas`` (row-major).

    The weighted columns are ``1/L``, ``N**-alpha / L`` and ``D**-beta / L`` and the target is a vector of ones, so
    every normal-equation entry is a sum over points that factorises over the two axes: one matrix product gives the
    cross terms of the whole grid.

    Returns:
        Coefficients ``[Ga * Gb, 3]`` and objectives ``[Ga * Gb]``.
    """
    w = inv_l**2
    p = np.exp(-alphas[:, None] * log_n[None, :])  # [Ga, n]
    q = np.exp(-betas[:, None] * log_d[None, :])  # [Gb, n]
    ga, gb = len(alphas), len(betas)
    ee = np.full((ga, gb), w.sum())
    en = np.broadcast_to((p @ w)[:, None], (ga, gb))
    ed = np.broadcast_to((q @ w)[None, :], (ga, gb))
    nn = np.broadcast_to(((p * p) @ w)[:, None], (ga, gb))
    dd = np.broadcast_to(((q * q) @ w)[None, :], (ga, gb))
    nd = (p * w) @ q.T
    gram = np.stack(
        [np.stack([ee, en, ed], -1), np.stack([en, nn, nd], -1), np.stack([ed, nd, dd], -1)], axis=-2
    ).reshape(ga * gb, 3, 3)
    rhs = np.stack(
        [
            np.full((ga, gb), inv_l.sum()),
            np.broadcast_to((p @ inv_l)[:, None], (ga, gb)),
            np.broadcast_to((q @ inv_l)[None, :], (ga, gb)),
        ],
        axis=-1,
    ).reshape(ga * gb, 3)
    return _subset_solve(gram, rhs, float(len(inv_l)), subsets)


def fit_varpro(
    N: ArrayLike,  # noqa: N803  (the paper's names)
    D: ArrayLike,  # noqa: N803
    loss: ArrayLike,
    *,
    without: tuple[str, ...] = (),
) -> ParametricPoint:
    """Least-squares fit of the law by variable projection over a refined exponent grid.

    Args:
        N: Model sizes.
        D: Examples seen.
        loss: Held-out losses.
        without: Terms to leave out: "E", "A" (model size does not matter) or "B". The bootstrap refits a law
            whose observed fit put a coefficient on its bound 0 without that term, so its replicates describe the
            model the data chose (a bound mixed into the replicates otherwise distorts every other interval). A
            left-out term's coefficient is 0 and its exponent NaN.

    Raises:
        FitError: fewer than 5 points, mismatched lengths or non-positive values.
    """
    n, d, y = positive_array("N", N), positive_array("D", D), positive_array("loss", loss)
    if not len(n) == len(d) == len(y):
        raise FitError(f"N, D and loss differ in length: {len(n)}, {len(d)}, {len(y)}")
    if len(n) < len(NAMES):
        raise FitError(f"the parametric law has 5 parameters and needs at least 5 points, got {len(n)}")
    # Geometric-mean units keep the columns O(1) for every exponent on the grid.
    n0, d0 = float(np.exp(np.log(n).mean())), float(np.exp(np.log(d).mean()))
    log_n, log_d, inv_l = np.log(n / n0), np.log(d / d0), 1.0 / y
    drop_e, drop_a, drop_b = "E" in without, "A" in without, "B" in without
    subsets = tuple(
        c for c in _SUBSETS if not (drop_e and 0 in c) and not (drop_a and 1 in c) and not (drop_b and 2 in c)
    )
    lo, hi = math.log(EXPONENT_RANGE[0]), math.log(EXPONENT_RANGE[1])
    axis = np.linspace(lo, hi, _COARSE)
    # A left-out term's exponent is not searched: one placeholder value keeps the grid's shape.
    axis_a, axis_b = (axis[:1] if drop_a else axis), (axis[:1] if drop_b else axis)
    step = axis[1] - axis[0]
    coef, value = _grid_objective(np.exp(axis_a), np.exp(axis_b), log_n, log_d, inv_l, subsets)
    i = int(np.argmin(value))
    la, lb = axis_a[i // len(axis_b)], axis_b[i % len(axis_b)]
    for _ in range(2):  # refine around the best point, each time on a grid 3x finer
        ra = np.clip(np.linspace(la - step, la + step, 1 if drop_a else _REFINE), lo, hi)
        rb = np.clip(np.linspace(lb - step, lb + step, 1 if drop_b else _REFINE), lo, hi)
        ra = ra if not drop_a else np.array([la])
        rb = rb if not drop_b else np.array([lb])
        c2, v2 = _grid_objective(np.exp(ra), np.exp(rb), log_n, log_d, inv_l, subsets)
        j = int(np.argmin(v2))
        if v2[j] <= value[i]:
            coef, value, i = c2, v2, j
            la, lb = ra[j // len(rb)], rb[j % len(rb)]
        step = step * 2.0 / (_REFINE - 1)
    e, a_norm, b_norm = coef[i]
    # Polish all five jointly from the grid's best point with a bounded trust-region least-squares run (tight
    # tolerances; Besiroglu et al. 2024 found the published Chinchilla fit had stopped early), so estimates are not
    # quantised to the grid.
    from scipy.optimize import least_squares

    def residual(t: np.ndarray) -> np.ndarray:
        return (t[0] + t[1] * np.exp(-t[2] * log_n) + t[3] * np.exp(-t[4] * log_d)) * inv_l - 1.0

    def jacobian(t: np.ndarray) -> np.ndarray:
        pn, pd = np.exp(-t[2] * log_n), np.exp(-t[4] * log_d)
        return np.stack([inv_l, pn * inv_l, -t[1] * log_n * pn * inv_l, pd * inv_l, -t[3] * log_d * pd * inv_l], 1)

    start = np.array([e, a_norm, math.exp(la), b_norm, math.exp(lb)])
    low = np.array([0.0, 0.0, EXPONENT_RANGE[0], 0.0, EXPONENT_RANGE[0]])
    high = np.array([np.inf, np.inf, EXPONENT_RANGE[1], np.inf, EXPONENT_RANGE[1]])
    free = np.array(
        [
            i
            for i in range(5)
            if not (drop_e and i == 0) and not (drop_a and i in (1, 2)) and not (drop_b and i in (3, 4))
        ]
    )
    fixed = start.copy()
    fixed[[0] if drop_e else []] = 0.0
    fixed[[1] if drop_a else []] = 0.0
    fixed[[3] if drop_b else []] = 0.0

    def full(t: np.ndarray) -> np.ndarray:
        out = fixed.copy()
        out[free] = t
        return out

    polished = least_squares(
        lambda t: residual(full(t)),
        np.clip(start[free], low[free] + 1e-12, high[free]),
        jac=lambda t: jacobian(full(t))[:, free],
        bounds=(low[free], high[free]),
        method="trf",
        xtol=1e-12,
        ftol=1e-14,
        gtol=1e-14,
        max_nfev=200,
    )
    if 2.0 * polished.cost <= value[i]:
        e, a_norm, alpha_p, b_norm, beta_p = full(polished.x)
        la, lb = math.log(alpha_p), math.log(beta_p)
        value = np.array([2.0 * polished.cost])
        i = 0
        # The trust region keeps iterates strictly inside the bounds: a coefficient below a millionth of the
        # smallest loss is at its bound 0.
        scale = float(np.min(y))
        e, a_norm, b_norm = (0.0 if v < 1e-6 * scale else v for v in (e, a_norm, b_norm))
    alpha = math.nan if drop_a else math.exp(la)
    beta = math.nan if drop_b else math.exp(lb)
    at_bound = [name for name, v in (("E", e), ("A", a_norm), ("B", b_norm)) if v <= 0.0 and name not in without]
    for name, v, dropped in (("alpha", la, drop_a), ("beta", lb, drop_b)):
        if not dropped and (v <= lo + 1e-9 or v >= hi - 1e-9):
            at_bound.append(name)
    return ParametricPoint(
        E=float(e),
        A=0.0 if drop_a else float(a_norm * n0**alpha),
        alpha=alpha,
        B=0.0 if drop_b else float(b_norm * d0**beta),
        beta=beta,
        rms=math.sqrt(max(float(value[i]), 0.0) / len(y)),
        at_bound=tuple(at_bound),
        left_out=tuple(t for t in ("E", "A", "B") if t in without),
    )


def unsupported_terms(point: ParametricPoint) -> tuple[str, ...]:
    """The law's terms a fit put on a bound: E at 0; A at 0 or alpha at a bound; B at 0 or beta at a bound."""
    bound = set(point.at_bound)
    return tuple(name for name, marks in (("E", {"E"}), ("A", {"A", "alpha"}), ("B", {"B", "beta"})) if bound & marks)


def select_law(
    N: ArrayLike,  # noqa: N803  (the paper's names)
    D: ArrayLike,  # noqa: N803
    loss: ArrayLike,
    *,
    noise: float | None = None,
) -> ParametricPoint:
    """The law with only the terms the data support, fitted by :func:`fit_varpro`.

    A term the full fit puts on a bound -- its coefficient at 0, or its exponent at the end of the search range,
    where it only fits noise (``A/N**3`` on the smallest model) -- is left out and the law refitted. Then, when the
    noise of one point's log loss is known, terms are removed one at a time (backward elimination) while the least
    needed one fails the likelihood-ratio test of :data:`TERM_CRITICAL`.

    Why: a term that is really absent is still fitted with a small positive coefficient about half the time, and it
    trades off against the others (a spurious E > 0 steepens beta). On simulated studies with E = 0 the 90% interval
    of beta covered its truth in 76% of studies with the bound rule alone. The bootstrap applies this same selection
    to every replicate, so the intervals include the uncertainty of the choice itself.

    Args:
        N: Model sizes.
        D: Examples seen.
        loss: Held-out losses.
        noise: Standard deviation of one point's log loss; None or NaN skips the test (bound rule only).
    """
    fit = fit_varpro(N, D, loss)
    without = unsupported_terms(fit)
    if len(without) == 3:  # no term is supported: nothing is left to fit, keep the free fit and its flags
        return fit
    if without:
        fit = fit_varpro(N, D, loss, without=without)
    if noise is None or not math.isfinite(noise) or noise <= 0.0:
        return fit
    rss = len(np.atleast_1d(loss)) * fit.rms**2
    while len(without) < 2:
        trials = [fit_varpro(N, D, loss, without=(*without, t)) for t in ("E", "A", "B") if t not in without]
        weakest = min(trials, key=lambda t: t.rms)
        statistic = (len(np.atleast_1d(loss)) * weakest.rms**2 - rss) / noise**2
        if statistic >= TERM_CRITICAL:
            break
        fit, without, rss = weakest, weakest.left_out, len(np.atleast_1d(loss)) * weakest.rms**2
    return fit
