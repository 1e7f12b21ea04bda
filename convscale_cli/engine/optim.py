"""Optimisers of the recipes: SGD-Nesterov + unit-wise AGC for NFNets, AdamW / Adafactor + global clipping for ViTs.

NFNet (Brock et al. 2021 §4, A.1; paper-facts §1.3, §3.8): gradients are clipped unit-wise (AGC, lambda 0.01,
eps 1e-3) on every parameter except the classifier weight, *then* the L2 weight decay is added to the gradient (it is
not decoupled), then Nesterov momentum 0.9 and the learning rate. The schedule warms up linearly from 0 and decays
with a cosine to 0 (§1.3). The peak learning rate is alpha quoted at batch 4096 and scaled linearly with the batch.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import optax

from convscale_cli.errors import UsageError
from convscale_cli.recipe import Recipe


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


def peak_learning_rate(alpha: float, batch_size: int, base_batch_size: int) -> float:
    """The paper's convention: alpha is quoted at ``base_batch_size`` (4096) and scaled linearly with the batch."""
    return alpha * batch_size / base_batch_size


def learning_rate_schedule(peak: float, total_steps: int, warmup_fraction: float) -> optax.Schedule:
    """Linear warm-up from 0 over ``warmup_fraction`` of the run, then cosine decay to 0 at ``total_steps``.

    The warm-up is a fraction of the run rather than the ImageNet recipe's fixed 5 epochs, so 0.25-epoch budgets
    (§1.3) still spend most steps at a useful learning rate.
    """
    warmup = int(round(warmup_fraction * total_steps))
    if warmup <= 0:
        return optax.cosine_decay_schedule(peak, max(total_steps, 1))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1), end_value=0.0
    )


def make_optimizer(recipe: Recipe, schedule: optax.Schedule) -> optax.GradientTransformation:
    """Build the optax chain the recipe describes.

    Args:
        recipe: the resolved recipe (optimizer, momentum, weight decay, clipping, masks).
        schedule: the learning-rate schedule (already scaled to the global batch).

    Raises:
        UsageError: an unknown optimizer name.
    """
    decay_mask = path_mask(recipe.no_decay, match=False)
    clip: list[optax.GradientTransformation] = []
    if recipe.agc_clip is not None:
        # The classifier weight is excluded: "it is always better to not clip the final linear layer" (NFNet §5.1).
        agc = optax.adaptive_grad_clip(recipe.agc_clip, eps=recipe.agc_eps)
        clip.append(optax.masked(agc, path_mask(recipe.agc_exclude, match=False)) if recipe.agc_exclude else agc)
    if recipe.grad_clip_norm is not None:
        clip.append(optax.clip_by_global_norm(recipe.grad_clip_norm))
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
