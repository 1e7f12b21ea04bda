"""The pure fine-tuning step: MixUp/CutMix and label smoothing, SAM, the recipe's optimiser with AGC, and the EMA.

Like the engine's :func:`~convscale_cli.engine.step.train_step` it is a module-level function of arrays whose static
settings are bound with :func:`functools.partial`, jitted once with the state donated, and its randomness is folded
from the state's base key and the step number, so a resumed run reproduces an uninterrupted one bit for bit. It
differs where the transfer recipe does (Smith et al. 2023 §3; NFNet 2021 A.3-A.5): the gradient is SAM's (computed on
a fraction of the batch, then handed to AGC and the optimiser as the plain gradient would be), the examples are mixed
on device, and the parameter EMA is updated after every step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from convscale_cli.data.device import mix_batch
from convscale_cli.engine.ema import ema_update
from convscale_cli.engine.optim import current_learning_rate
from convscale_cli.engine.sam import sam_gradients
from convscale_cli.engine.state import TrainState, step_key
from convscale_cli.engine.step import masked_mean, per_example_loss, topk_correct

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


def finetune_step(
    state: TrainState,
    batch: Batch,
    *,
    model: Any,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    normalize: Callable[[jax.Array], jax.Array],
    loss: str,
    num_classes: int,
    sam_rho: float,
    sam_fraction: float,
    num_shards: int,
    ema_decay: float,
    mixup_alpha: float = 0.0,
    cutmix_alpha: float = 0.0,
    label_smoothing: float = 0.0,
) -> tuple[TrainState, Metrics]:
    """One fine-tuning step on one global batch.

    Args:
        state: the current state (donated by the jitted caller); ``state.ema`` is None when the EMA is off.
        batch: ``image`` uint8 ``[b, H, W, 3]``, ``label`` (int ``[b]`` or multi-hot ``[b, C]``), ``mask`` ``[b]``.
        model: the flax module (built with the fine-tuning stochastic depth and dropout).
        tx: the recipe's optimiser chain (AGC first, then weight decay, momentum, learning rate).
        schedule: the learning-rate schedule, reported in the metrics.
        normalize: uint8 images -> normalised float32.
        loss: ``softmax`` or ``sigmoid``.
        num_classes: classifier size.
        sam_rho: SAM radius (0: plain gradients, no ascent pass).
        sam_fraction: share of each device's rows used by the SAM ascent pass.
        num_shards: devices the batch is split over (so the ascent rows stay on their devices).
        ema_decay: target EMA decay (ignored when ``state.ema`` is None).
        mixup_alpha: MixUp Beta parameter (0: off).
        cutmix_alpha: CutMix Beta parameter (0: off).
        label_smoothing: softmax target smoothing.

    Returns:
        The new state and scalar metrics ``loss`` (at the SAM-perturbed point when SAM is on), ``top1`` (against
        the unmixed labels), ``grad_norm`` (of the gradient the optimiser consumed, before AGC), ``lr`` and
        ``examples``.
    """
    dropout_key, mix_key = jax.random.split(step_key(state.rng, state.step))
    mask = batch["mask"].astype(jnp.float32)
    # Mixing happens on device because MixUp/CutMix pair examples of the batch (NFNet A.3); with nothing to mix the
    # targets are the one-hot (or multi-hot) labels.
    images, targets = mix_batch(
        mix_key,
        normalize(batch["image"]),
        batch["label"],
        num_classes=num_classes,
        mixup_alpha=mixup_alpha,
        cutmix_alpha=cutmix_alpha,
        label_smoothing=label_smoothing,
    )
    rows = {"image": images, "target": targets, "mask": mask}

    def grad_fn(params: Any, part: Batch) -> tuple[tuple[jax.Array, jax.Array], Any]:
        def loss_fn(p: Any) -> tuple[jax.Array, jax.Array]:
            logits = model.apply({"params": p}, part["image"], train=True, rngs={"dropout": dropout_key})
            per = per_example_loss(logits, part["target"], loss=loss, num_classes=num_classes)
            return masked_mean(per, part["mask"]), logits

        return jax.value_and_grad(loss_fn, has_aux=True)(params)

    (value, logits), grads = sam_gradients(
        grad_fn, state.params, rows, rho=sam_rho, fraction=sam_fraction, num_shards=num_shards
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = None if state.ema is None else ema_update(state.ema, params, state.step, ema_decay)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema)
    metrics = {
        "loss": value,
        "top1": masked_mean(topk_correct(logits, batch["label"], 1), mask),
        "grad_norm": optax.tree.norm(grads),
        # Read from the injected hyperparameters, so runs differing only in lr or length share one compiled step.
        "lr": current_learning_rate(state.opt_state, state.step, schedule),
        "examples": mask.sum(),
    }
    return new_state, metrics


__all__ = ["finetune_step"]
