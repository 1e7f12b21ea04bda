"""Optimisers of the recipes: SGD-Nesterov + unit-wise AGC for NFNets, AdamW / Adafactor + global clipping for ViTs.

NFNet (Brock et al. 2021 §4, A.1; DM ``optim.py`` SGD_AGC): gradients are clipped unit-wise (AGC, lambda 0.01,
eps 1e-3) on every parameter except the classifier weight, *then* the L2 weight decay is added to the gradient (it is
not decoupled), then Nesterov momentum 0.9 and the learning rate. The schedule warms up linearly from 0 and decays
with a cosine to 0 (Smith et al. 2023 §2). The peak learning rate is alpha quoted at batch 4096 and scaled linearly
with the batch.

A recipe may instead select the warm-up-stable-decay schedule (``schedule = "wsd"``; Hägele et al. 2024, "Scaling Laws
and Compute-Optimal Training Beyond Fixed Training Durations"): the same warm-up, a constant rate, then a cooldown to
0 over the last ``cooldown_fraction`` of the steps, linear or 1-sqrt. Every budget shares the constant phase of the
longest one, which is what lets a sweep branch its shorter budgets from one trunk.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from convscale_cli.errors import UsageError
from convscale_cli.recipe import Recipe, cooldown_steps
from convscale_cli.recipe import peak_learning_rate as peak_learning_rate  # the engine's name for it


def param_path(path: Sequence[Any]) -> str:
    """The '/'-joined name of a parameter (``stages/0/0/conv0/kernel``), as recipe regexes expect."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def path_mask(patterns: Sequence[str], *, match: bool) -> Callable[[Any], Any]:
    """A mask function for :func:`optax.masked`: True where a path matches any pattern (``match``) or none.

    Raises:
        UsageError: a pattern that is not a valid regular expression.
    """
    try:
        compiled = [re.compile(p) for p in patterns]
    except re.error as exc:
        raise UsageError(f"invalid parameter pattern in {list(patterns)!r}: {exc}") from None

    def mask(params: Any) -> Any:
        def leaf(path: Sequence[Any], _: Any) -> bool:
            hit = any(p.search(param_path(path)) for p in compiled)
            return hit if match else not hit

        return jax.tree_util.tree_map_with_path(leaf, params)

    return mask


def warmup_cosine(count: Any, peak_lr: Any, warmup_steps: Any, total_steps: Any) -> jax.Array:
    """Linear warm-up from 0 to ``peak_lr`` over ``warmup_steps``, then cosine decay to 0 at ``total_steps``.

    Written with jnp only, so the three numbers may be traced arrays (see :class:`WarmupCosine`).
    """
    count = jnp.asarray(count, jnp.float32)
    warmup = jnp.asarray(warmup_steps, jnp.float32)
    total = jnp.asarray(total_steps, jnp.float32)
    warm = peak_lr * count / jnp.maximum(warmup, 1.0)
    progress = jnp.clip((count - warmup) / jnp.maximum(total - warmup, 1.0), 0.0, 1.0)
    decayed = 0.5 * peak_lr * (1.0 + jnp.cos(jnp.pi * progress))
    return jnp.where(count < warmup, warm, decayed)


def warmup_stable_decay(
    count: Any, peak_lr: Any, warmup_steps: Any, total_steps: Any, cooldown_steps: Any, *, shape: str = "linear"
) -> jax.Array:
    """Linear warm-up to ``peak_lr``, constant, then a cooldown to 0 over the last ``cooldown_steps`` steps.

    The cooldown factor is ``1 - p`` (``linear``) or ``1 - sqrt(p)`` (``1-sqrt``, the shape Hägele et al. 2024 §3
    found best) for the cooldown progress ``p`` in [0, 1]. jnp only, so the numbers may be traced arrays.
    """
    count = jnp.asarray(count, jnp.float32)
    warmup = jnp.asarray(warmup_steps, jnp.float32)
    cooldown = jnp.asarray(cooldown_steps, jnp.float32)
    start = jnp.asarray(total_steps, jnp.float32) - cooldown
    warm = peak_lr * count / jnp.maximum(warmup, 1.0)
    progress = jnp.clip((count - start) / jnp.maximum(cooldown, 1.0), 0.0, 1.0)
    factor = 1.0 - (jnp.sqrt(progress) if shape == "1-sqrt" else progress)
    return jnp.where(count < warmup, warm, peak_lr * factor)


@dataclasses.dataclass(frozen=True)
class WarmupCosine:
    """The recipes' schedule (warm-up then cosine to 0), with its numbers kept apart from its shape.

    :func:`make_optimizer` injects ``peak_lr``, ``warmup_steps`` and ``total_steps`` into the optimiser state as
    arrays instead of baking them into the compiled step as constants. Runs that differ only in learning rate or
    length (every cell of a sweep, both trials of the two-trial rule) then lower to the same XLA program, which the
    persistent compilation cache compiles once.
    """

    peak_lr: float
    warmup_steps: int
    total_steps: int

    def __call__(self, count: Any) -> jax.Array:
        return warmup_cosine(count, self.peak_lr, self.warmup_steps, self.total_steps)

    def hyperparams(self) -> dict[str, Any]:
        return {"peak_lr": float(self.peak_lr), "warmup_steps": self.warmup_steps, "total_steps": self.total_steps}

    @staticmethod
    def curve(count: Any, peak_lr: Any, warmup_steps: Any, total_steps: Any) -> jax.Array:
        """The rate at ``count`` from the numbers :meth:`hyperparams` names (possibly read back from the state)."""
        return warmup_cosine(count, peak_lr, warmup_steps, total_steps)


@dataclasses.dataclass(frozen=True)
class WarmupStableDecay:
    """The warm-up-stable-decay schedule, injected like :class:`WarmupCosine` (its shape is part of the program)."""

    peak_lr: float
    warmup_steps: int
    total_steps: int
    cooldown_steps: int
    shape: str = "linear"

    def __call__(self, count: Any) -> jax.Array:
        return self.curve(count, **self.hyperparams())

    def hyperparams(self) -> dict[str, Any]:
        return {
            "peak_lr": float(self.peak_lr),
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
            "cooldown_steps": self.cooldown_steps,
        }

    def curve(self, count: Any, peak_lr: Any, warmup_steps: Any, total_steps: Any, cooldown_steps: Any) -> jax.Array:
        """The rate at ``count`` from the numbers :meth:`hyperparams` names (possibly read back from the state)."""
        return warmup_stable_decay(count, peak_lr, warmup_steps, total_steps, cooldown_steps, shape=self.shape)


# Schedules whose numbers make_optimizer injects into the optimiser state.
INJECTED_SCHEDULES = (WarmupCosine, WarmupStableDecay)


def learning_rate_schedule(
    peak: float,
    total_steps: int,
    warmup_fraction: float,
    *,
    kind: str = "cosine",
    cooldown_fraction: float = 0.2,
    cooldown_shape: str = "linear",
    warmup_steps: int | None = None,
) -> WarmupCosine | WarmupStableDecay:
    """Linear warm-up from 0 over ``warmup_fraction`` of the run, then cosine decay to 0 at ``total_steps``.

    The warm-up is a fraction of the run rather than the ImageNet recipe's fixed 5 epochs, so 0.25-epoch budgets
    (Smith et al. 2023 §2) still spend most steps at a useful learning rate. ``warmup_steps`` fixes its length instead.
    ``kind="wsd"`` holds the peak after the warm-up and cools down to 0 over the last ``cooldown_fraction`` of the
    steps (``cooldown_shape`` linear or 1-sqrt).

    Raises:
        UsageError: an unknown kind, or a fixed warm-up that does not end before the decay starts.
    """
    total = max(int(total_steps), 1)
    warmup = int(round(warmup_fraction * total_steps)) if warmup_steps is None else int(warmup_steps)
    if kind == "wsd":
        cooldown = cooldown_steps(total, cooldown_fraction)
        if warmup_steps is not None and warmup > total - cooldown:
            raise UsageError(
                f"warm-up of {warmup} steps runs into the cooldown, which starts at step {total - cooldown} of this "
                f"{total}-step run: use fewer warmup_steps or a longer run"
            )
        return WarmupStableDecay(float(peak), warmup, total, cooldown, cooldown_shape)
    if kind != "cosine":
        raise UsageError(f"unknown schedule {kind!r}: choose from cosine, wsd")
    if warmup_steps is not None and warmup > total:
        raise UsageError(f"warm-up of {warmup} steps is longer than this {total}-step run: use fewer warmup_steps")
    return WarmupCosine(float(peak), warmup, total)


def recipe_schedule(recipe: Recipe, peak: float, total_steps: int) -> WarmupCosine | WarmupStableDecay:
    """The schedule a recipe describes for a run of ``total_steps`` at peak rate ``peak``."""
    return learning_rate_schedule(
        peak,
        total_steps,
        recipe.warmup_fraction,
        kind=recipe.schedule,
        cooldown_fraction=recipe.cooldown_fraction,
        cooldown_shape=recipe.cooldown_shape,
        warmup_steps=recipe.warmup_steps,
    )


def current_learning_rate(opt_state: Any, step: Any, schedule: optax.Schedule) -> jax.Array:
    """The learning rate at ``step``, read from injected hyperparameters when the optimiser has them.

    Reading it from the state (not from ``schedule``'s Python numbers) keeps run-specific constants out of the
    compiled step, so the metric does not undo what :class:`WarmupCosine` injection buys.
    """
    hyperparams = getattr(opt_state, "hyperparams", None)
    if isinstance(schedule, INJECTED_SCHEDULES) and hyperparams is not None:
        return schedule.curve(step, **hyperparams)
    return jnp.asarray(schedule(step), jnp.float32)


def make_optimizer(recipe: Recipe, schedule: optax.Schedule) -> optax.GradientTransformation:
    """Build the optax chain the recipe describes.

    Args:
        recipe: the resolved recipe (optimizer, momentum, weight decay, clipping, masks).
        schedule: the learning-rate schedule (already scaled to the global batch). A :class:`WarmupCosine` or
            :class:`WarmupStableDecay` has its numbers injected into the optimiser state
            (``optax.inject_hyperparams``) rather than compiled in.

    Raises:
        UsageError: an unknown optimizer name.
    """
    if isinstance(schedule, WarmupCosine):
        if recipe.optimizer not in _OPTIMIZERS:
            raise UsageError(f"unknown optimizer {recipe.optimizer!r}: choose from {', '.join(_OPTIMIZERS)}")

        def factory(peak_lr: Any, warmup_steps: Any, total_steps: Any) -> optax.GradientTransformation:
            return _chain(recipe, lambda count: warmup_cosine(count, peak_lr, warmup_steps, total_steps))

        return optax.inject_hyperparams(factory)(**schedule.hyperparams())
    if isinstance(schedule, WarmupStableDecay):
        if recipe.optimizer not in _OPTIMIZERS:
            raise UsageError(f"unknown optimizer {recipe.optimizer!r}: choose from {', '.join(_OPTIMIZERS)}")

        def wsd_factory(
            peak_lr: Any, warmup_steps: Any, total_steps: Any, cooldown_steps: Any
        ) -> optax.GradientTransformation:
            return _chain(
                recipe, lambda count: schedule.curve(count, peak_lr, warmup_steps, total_steps, cooldown_steps)
            )

        return optax.inject_hyperparams(wsd_factory)(**schedule.hyperparams())
    return _chain(recipe, schedule)


_OPTIMIZERS = ("sgd", "adamw", "adafactor")


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """Scale the updates by ``max_norm / max(||updates||, max_norm)``: global-norm clipping as one multiply.

    The same clipping as :func:`optax.clip_by_global_norm` (updates under the bound pass bit for bit, the factor is
    exactly 1; clipped ones agree to rounding, in the form torch's ``clip_grad_norm_`` uses), but without optax's
    scalar-predicated ``select`` between the raw and the rescaled tree, which XLA:CPU does not fuse into the update:
    a ViT-B/16 AdamW update took 155 ms with it and 52 ms with the multiply (torch's fused AdamW + clipping: 73 ms).
    """

    def update(updates: Any, state: optax.EmptyState, params: Any = None) -> tuple[Any, optax.EmptyState]:
        del params
        norm = optax.tree.norm(updates)
        scale = max_norm / jnp.maximum(norm, max_norm)
        return jax.tree_util.tree_map(lambda u: u * scale.astype(u.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _chain(recipe: Recipe, schedule: optax.Schedule) -> optax.GradientTransformation:
    decay_mask = path_mask(recipe.no_decay, match=False)
    clip: list[optax.GradientTransformation] = []
    if recipe.agc_clip is not None:
        # The classifier weight is excluded: "it is always better to not clip the final linear layer" (NFNet §5.1).
        agc = optax.adaptive_grad_clip(recipe.agc_clip, eps=recipe.agc_eps)
        clip.append(optax.masked(agc, path_mask(recipe.agc_exclude, match=False)) if recipe.agc_exclude else agc)
    if recipe.grad_clip_norm is not None:
        clip.append(clip_by_global_norm(recipe.grad_clip_norm))
    if recipe.optimizer == "sgd":
        update = [
            optax.add_decayed_weights(recipe.weight_decay, mask=decay_mask),  # L2 in the gradient, after AGC (A.1)
            optax.trace(decay=recipe.momentum, nesterov=recipe.nesterov),
            optax.scale_by_learning_rate(schedule),
        ]
    elif recipe.optimizer == "adamw":
        update = [
            optax.adamw(
                schedule, b1=recipe.momentum, b2=recipe.beta2, weight_decay=recipe.weight_decay, mask=decay_mask
            )
        ]
    elif recipe.optimizer == "adafactor":
        update = [
            optax.adafactor(
                schedule,
                momentum=recipe.momentum,
                weight_decay_rate=recipe.weight_decay or None,
                weight_decay_mask=decay_mask,
                multiply_by_parameter_scale=False,
            )
        ]
    else:
        raise UsageError(f"unknown optimizer {recipe.optimizer!r}: choose from sgd, adamw, adafactor")
    return optax.chain(*clip, *update)
