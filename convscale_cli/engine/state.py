"""The training state: everything on device that a checkpoint must hold to continue a run bit for bit."""

from __future__ import annotations

import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax


class TrainState(flax.struct.PyTreeNode):
    """Device-side training state.

    Attributes:
        step: optimiser steps taken (int32 scalar).
        params: model parameters (float32, whatever the activation dtype).
        opt_state: optimiser state (float32).
        ema: exponential moving average of ``params``, or None (fine-tuning keeps one; JFT pre-training does not,
            NFNet 2021 A.5).
        rng: the run's base PRNG key (raw uint32 key data); per-step keys are folded from it by step number, so a
            resumed run draws exactly the dropout masks an uninterrupted one would.
    """

    step: jax.Array
    params: Any
    opt_state: optax.OptState
    ema: Any
    rng: jax.Array

    @classmethod
    def create(cls, params: Any, tx: optax.GradientTransformation, rng: jax.Array, *, ema: bool = False) -> TrainState:
        """A fresh state at step 0 (``ema=True`` starts the average at the initial parameters)."""
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            ema=jax.tree_util.tree_map(jnp.copy, params) if ema else None,
            rng=rng,
        )


def step_key(rng: jax.Array, step: jax.Array) -> jax.Array:
    """The PRNG key of one step: a pure function of the base key and the step number (restart-invariant)."""
    return jax.random.fold_in(rng, step)


def param_count(params: Any) -> int:
    """The number of parameters in a tree of arrays (or of ``ShapeDtypeStruct``s): read off the shapes alone."""
    return int(sum(math.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(params)))
