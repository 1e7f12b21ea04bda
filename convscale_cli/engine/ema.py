"""Exponential moving average of the parameters, with the NFNet decay warm-up.

The NFNet recipes keep an EMA of the parameters and evaluate it (Brock et al. 2021 A.1 for ImageNet, decay 0.99999;
A.5 for JFT -> ImageNet transfer, "as with our ResNet fine-tuning", decay 0.9999). The decay is warmed up as in the
DeepMind code, ``min(decay, (1 + t) / (10 + t))`` at step ``t``: the first updates move the average most of the way
to the current parameters, so a short fine-tuning run's EMA is not dominated by its (random-head) initialisation.

Everything here is pure and jit-friendly; the average is kept in float32 like the parameters.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from convscale_cli.errors import UsageError
from convscale_cli.recipe import DEFAULT_EMA_DECAY

# The NFNet fine-tuning decay (Brock et al. 2021 A.5 -> the ResNet fine-tuning recipe).
DEFAULT_DECAY = DEFAULT_EMA_DECAY


def check_decay(decay: float) -> None:
    """Raise a UsageError unless ``decay`` is in [0, 1) (0 means "no EMA")."""
    if not (math.isfinite(decay) and 0.0 <= decay < 1.0):
        raise UsageError(f"EMA decay {decay!r} must be in [0, 1) (0 disables the EMA; NFNet uses {DEFAULT_DECAY})")


def ema_decay(step: jax.Array | int, decay: float) -> jax.Array:
    """The decay used by the update at optimiser step ``step`` (0-based): ``min(decay, (1 + t) / (10 + t))``."""
    t = jnp.asarray(step, jnp.float32)
    return jnp.minimum(jnp.float32(decay), (1.0 + t) / (10.0 + t))


def ema_init(params: Any) -> Any:
    """A new average that starts at ``params`` (copied, so donating ``params`` later is safe)."""
    return jax.tree_util.tree_map(lambda p: jnp.array(p, copy=True), params)


def ema_update(ema: Any, params: Any, step: jax.Array | int, decay: float) -> Any:
    """``ema <- d * ema + (1 - d) * params`` with ``d = ema_decay(step, decay)``.

    Args:
        ema: the current average (same tree as ``params``).
        params: the parameters *after* the optimiser update of step ``step``.
        step: the 0-based index of that update.
        decay: the target decay (the warm-up caps it early in the run).
    """
    d = ema_decay(step, decay)
    return jax.tree_util.tree_map(lambda e, p: (d * e + (1.0 - d) * p).astype(e.dtype), ema, params)


__all__ = ["DEFAULT_DECAY", "check_decay", "ema_decay", "ema_init", "ema_update"]
