"""Sharpness-aware minimisation (Foret et al. 2021) as the NFNet transfer recipe uses it.

Smith et al. (2023 §3) fine-tune "using sharpness aware minimization (SAM) with stochastic depth
and dropout"; the NFNet recipe they build on uses rho = 0.05 and computes the ascent step on only **20% of the
batch**, which makes SAM cost 20-40% more than a plain step instead of 100% (Brock et al. 2021 A.4-A.5).

One SAM step, for a loss ``L`` and parameters ``w``:

1. ``g_a = grad L_a(w)`` on the ascent rows (a fraction of the batch);
2. ``e = rho * g_a / ||g_a||`` (global L2 norm over every parameter);
3. ``g = grad L(w + e)`` on the whole batch.

``g`` then replaces the plain gradient everywhere downstream: AGC clips ``g`` against the norms of the *unperturbed*
``w`` and the optimiser (weight decay, momentum, learning rate) consumes the clipped ``g`` and updates ``w``, exactly
as the NFNet code feeds SAM gradients into SGD_AGC. :func:`sam_gradients` therefore only returns gradients; the
caller passes them to ``tx.update(g, opt_state, w)`` with the optimiser chain of :mod:`convscale_cli.engine.optim`.

Deviation: the NFNet code does not all-reduce the ascent gradients (each replica perturbs with its own 20%). Under a
single-program ``jit`` the ascent rows are a slice of the *global* batch and their gradient is summed over devices
like any other; :func:`ascent_rows` takes the same number of leading rows from every device's shard, so the ascent
pass stays evenly split over the devices and costs one extra gradient all-reduce.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import optax

from convscale_cli.errors import UsageError
from convscale_cli.recipe import DEFAULT_SAM_FRACTION, DEFAULT_SAM_RHO

# SAM radius of the NFNet transfer recipe (Brock et al. 2021 A.5) and the fraction of the batch its ascent uses (A.4).
DEFAULT_RHO = DEFAULT_SAM_RHO
DEFAULT_FRACTION = DEFAULT_SAM_FRACTION

GradFn = Callable[[Any, dict[str, jax.Array]], tuple[tuple[jax.Array, Any], Any]]


def check_sam(rho: float, fraction: float) -> None:
    """Raise a UsageError unless ``rho >= 0`` and ``fraction`` is in (0, 1]."""
    if not (math.isfinite(rho) and rho >= 0):
        raise UsageError(f"SAM rho {rho!r} must be >= 0 (0 disables SAM; the NFNet recipe uses {DEFAULT_RHO})")
    if not (math.isfinite(fraction) and 0.0 < fraction <= 1.0):
        raise UsageError(f"SAM fraction {fraction!r} must be in (0, 1] (the NFNet recipe uses {DEFAULT_FRACTION})")


def ascent_size(per_shard: int, fraction: float) -> int:
    """Rows of each device's shard the ascent step uses: ``ceil(fraction * per_shard)``, at least 1."""
    return max(1, min(per_shard, math.ceil(fraction * per_shard - 1e-9)))


def ascent_rows(batch: dict[str, jax.Array], fraction: float, num_shards: int = 1) -> dict[str, jax.Array]:
    """The leading ``fraction`` of every shard's rows of a batch.

    Args:
        batch: arrays with a shared leading batch dimension ``B`` (split over ``num_shards`` devices).
        fraction: share of the rows the ascent step uses, in (0, 1].
        num_shards: devices the batch dimension is split over; ``B`` must be divisible by it.

    Returns:
        The same keys with ``num_shards * ascent_size(B // num_shards, fraction)`` rows: each device keeps the first
        rows of its own shard, so no rows move between devices.
    """
    sizes = {value.shape[0] for value in batch.values()}
    if len(sizes) != 1:
        raise ValueError(f"batch arrays disagree on the batch dimension: {sorted(sizes)}")
    (rows,) = sizes
    if rows % num_shards:
        raise ValueError(f"batch of {rows} rows does not split over {num_shards} shards")
    per_shard = rows // num_shards
    keep = ascent_size(per_shard, fraction)
    if keep == per_shard:
        return batch

    def take(x: jax.Array) -> jax.Array:
        shards = x.reshape((num_shards, per_shard) + x.shape[1:])
        return shards[:, :keep].reshape((num_shards * keep,) + x.shape[1:])

    return {key: take(value) for key, value in batch.items()}


def perturbation(grads: Any, rho: float, eps: float = 1e-12) -> Any:
    """``rho * g / ||g||`` with the global L2 norm over every leaf (Foret et al. 2021, eq. 2).

    ``eps`` keeps a zero gradient (an all-padding ascent slice) from producing NaNs: the perturbation is then zero.
    """
    norm = optax.tree.norm(grads)
    scale = rho / (norm + eps)
    return jax.tree_util.tree_map(lambda g: (g * scale).astype(g.dtype), grads)


def sam_gradients(
    grad_fn: GradFn,
    params: Any,
    batch: dict[str, jax.Array],
    *,
    rho: float,
    fraction: float = DEFAULT_FRACTION,
    num_shards: int = 1,
) -> tuple[tuple[jax.Array, Any], Any]:
    """The SAM gradient of one batch; plain gradients when ``rho == 0``.

    Args:
        grad_fn: ``grad_fn(params, batch) -> ((loss, aux), grads)``, e.g. ``jax.value_and_grad(f, has_aux=True)``.
            It is called on the ascent rows and on the whole batch; any randomness it needs (dropout, stochastic
            depth) comes from a key it closes over, so the step stays a pure function of its inputs.
        params: the current (unperturbed) parameters.
        batch: the whole batch, including its ``mask`` so padded rows weigh nothing in either pass.
        rho: SAM radius; 0 skips the ascent pass entirely.
        fraction: share of each shard's rows the ascent pass uses.
        num_shards: devices the batch is split over (see :func:`ascent_rows`).

    Returns:
        ``((loss, aux), grads)`` of the descent pass at ``params + e``: the loss and aux describe the perturbed
        point and ``grads`` is what the optimiser (with its AGC) must consume, applied to the unperturbed ``params``.
    """
    if rho == 0:
        return grad_fn(params, batch)
    _, ascent = grad_fn(params, ascent_rows(batch, fraction, num_shards))
    # The perturbation is a function of the parameters only through the ascent gradient, which SAM treats as a
    # constant (the first-order approximation of Foret et al. §2), hence stop_gradient.
    e = jax.lax.stop_gradient(perturbation(ascent, rho))
    perturbed = jax.tree_util.tree_map(lambda w, d: w + d, params, e)
    return grad_fn(perturbed, batch)


__all__ = [
    "DEFAULT_FRACTION",
    "DEFAULT_RHO",
    "ascent_rows",
    "ascent_size",
    "check_sam",
    "perturbation",
    "sam_gradients",
]
