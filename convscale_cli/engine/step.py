"""The pure, module-level training and evaluation steps.

Both are plain functions of arrays; the loop binds the static settings (model, optimiser, loss) with
:func:`functools.partial` and jits them once with the state donated (flax examples/imagenet). Every batch has the
same shape (the final partial batch is padded and masked), so each step compiles exactly once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from convscale_cli.data.device import mix_batch, smooth_labels
from convscale_cli.engine.ema import ema_update
from convscale_cli.engine.optim import current_learning_rate
from convscale_cli.engine.sam import DEFAULT_FRACTION, sam_gradients
from convscale_cli.engine.state import TrainState, step_key

# The stream of the step key that MixUp/CutMix draw from; dropout and stochastic depth use the step key itself.
MIX_STREAM = 1

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


def per_example_loss(
    logits: jax.Array, labels: jax.Array, *, loss: str, num_classes: int, label_smoothing: float = 0.0
) -> jax.Array:
    """Cross-entropy per example, in float32.

    Args:
        logits: ``[b, C]`` logits.
        labels: ``int[b]`` class indices, or ``float[b, C]`` multi-hot targets (multi-label datasets).
        loss: ``softmax`` (multi-hot targets are normalised to sum to 1) or ``sigmoid`` (independent binary
            cross-entropies summed over classes, the ViT/JFT-3B loss, Zhai et al. 2022 §3.3).
        num_classes: ``C``.
        label_smoothing: softmax only; mixes the targets with the uniform distribution (NFNet A.1 uses 0.1).
    """
    logits = logits.astype(jnp.float32)
    if labels.ndim == 1:
        targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    else:
        targets = labels.astype(jnp.float32)
    if loss == "sigmoid":
        return optax.sigmoid_binary_cross_entropy(logits, targets).sum(axis=-1)
    if labels.ndim != 1:
        targets = targets / jnp.maximum(targets.sum(axis=-1, keepdims=True), 1.0)
    targets = smooth_labels(targets, label_smoothing, num_classes)
    return -(targets * jax.nn.log_softmax(logits, axis=-1)).sum(axis=-1)


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """1.0 per example whose label (any positive label, for multi-hot targets) is among the top ``k`` logits."""
    k = min(k, logits.shape[-1])
    _, top = jax.lax.top_k(logits, k)
    if labels.ndim == 1:
        hit = (top == labels[:, None]).any(axis=-1)
    else:
        hit = (jnp.take_along_axis(labels, top, axis=-1) > 0).any(axis=-1)
    return hit.astype(jnp.float32)


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean over the real examples of a padded batch (``mask`` 0 for padding)."""
    return (values * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    model: Any,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    normalize: Callable[[jax.Array], jax.Array],
    loss: str,
    num_classes: int,
    label_smoothing: float = 0.0,
    ema_decay: float | None = None,
    accum_steps: int = 1,
    sam_rho: float = 0.0,
    sam_fraction: float = DEFAULT_FRACTION,
    num_shards: int = 1,
    mixup_alpha: float = 0.0,
    cutmix_alpha: float = 0.0,
) -> tuple[TrainState, Metrics]:
    """One optimiser step on one global batch: pre-training's, and fine-tuning's with its extras switched on.

    The dropout / stochastic-depth key is folded from the state's base key and the step number, so the step is a
    pure function of ``(state, batch)`` and a resumed run reproduces an uninterrupted one bit for bit. The transfer
    recipe (Smith et al. 2023 §3; NFNet 2021 A.3-A.5) adds SAM, whose gradient is handed to AGC and the optimiser as
    the plain gradient would be, and MixUp/CutMix on device; both are static options, off by default.

    Args:
        state: the current state (donated by the jitted caller); ``state.ema`` is None when the EMA is off.
        batch: ``image`` uint8 ``[b, H, W, 3]``, ``label``, ``mask`` float ``[b]`` (0 for padding).
        model: the flax module.
        tx: the optimiser.
        schedule: the learning-rate schedule, reported in the metrics.
        normalize: uint8 images -> normalised float32 (ImageNet mean/std), traced into the step.
        loss: ``softmax`` or ``sigmoid``.
        num_classes: classifier size.
        label_smoothing: softmax label smoothing (of the mixed targets, when mixing).
        ema_decay: decay of the parameter EMA (with the NFNet warm-up ``min(decay, (1+t)/(10+t))``), or None.
        accum_steps: gradient accumulation (timm's ``--grad-accum-steps``): the batch is split into this many
            micro-batches whose summed gradients make the large batch's gradient (the masked mean over all of it), so
            the update is the large batch's up to float rounding, at a fraction of the activation memory. Micro-batch
            ``i`` draws its dropout from ``fold_in(step key, i)``: with dropout or stochastic depth the random masks
            differ from the large batch's (the paper's pre-training uses neither). Not combined with SAM or mixing.
        sam_rho: SAM radius (Foret et al. 2021); 0: plain gradients, no ascent pass.
        sam_fraction: share of each device's rows the SAM ascent pass uses (NFNet A.4: 20%).
        num_shards: devices the batch is split over (so the ascent rows stay on their devices).
        mixup_alpha: MixUp Beta parameter (0: off).
        cutmix_alpha: CutMix Beta parameter (0: off; with both, half the batch gets each: NFNet A.3).

    Returns:
        The new state and scalar metrics: ``loss`` (at the SAM-perturbed point when SAM is on) and ``top1`` (against
        the unmixed labels) as masked means over the batch, ``grad_norm`` (of the gradient the optimiser consumed,
        before AGC), ``lr`` and ``examples`` (real examples in the batch).

    Raises:
        ValueError: gradient accumulation asked for together with SAM or mixing.
    """
    rng = step_key(state.rng, state.step)
    mask = batch["mask"].astype(jnp.float32)
    mixing = bool(mixup_alpha or cutmix_alpha)
    if accum_steps > 1:
        if sam_rho or mixing:
            raise ValueError("gradient accumulation does not combine with SAM or on-device mixing")
        value, top1, grads = _accumulated(state.params, batch, rng, accum_steps, model, normalize, loss, num_classes,
                                          label_smoothing)  # fmt: skip
    else:
        images, targets, smoothing = normalize(batch["image"]), batch["label"], label_smoothing
        if mixing:
            # On device, because MixUp/CutMix pair examples of the batch (NFNet A.3); the soft targets carry the
            # label smoothing. The mixing draws from its own stream, so turning it on changes nothing else (the
            # dropout and stochastic-depth masks stay those of the run without it).
            images, targets = mix_batch(
                jax.random.fold_in(rng, MIX_STREAM),
                images,
                targets,
                num_classes=num_classes,
                mixup_alpha=mixup_alpha,
                cutmix_alpha=cutmix_alpha,
                label_smoothing=label_smoothing,
            )
            smoothing = 0.0

        def grad_fn(params: Any, part: Batch) -> tuple[tuple[jax.Array, jax.Array], Any]:
            def loss_fn(p: Any) -> tuple[jax.Array, jax.Array]:
                logits = model.apply({"params": p}, part["image"], train=True, rngs={"dropout": rng})
                per = per_example_loss(
                    logits, part["target"], loss=loss, num_classes=num_classes, label_smoothing=smoothing
                )
                return masked_mean(per, part["mask"]), logits

            return jax.value_and_grad(loss_fn, has_aux=True)(params)

        rows = {"image": images, "target": targets, "mask": mask}
        (value, logits), grads = sam_gradients(
            grad_fn, state.params, rows, rho=sam_rho, fraction=sam_fraction, num_shards=num_shards
        )
        top1 = masked_mean(topk_correct(logits, batch["label"], 1), mask)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema
    if ema is not None and ema_decay is not None:
        ema = ema_update(ema, params, state.step, ema_decay)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema)
    metrics = {
        "loss": value,
        "top1": top1,
        "grad_norm": optax.tree.norm(grads),
        # Read from the injected hyperparameters, so runs differing only in lr or length share one compiled step.
        "lr": current_learning_rate(state.opt_state, state.step, schedule),
        "examples": mask.sum(),
    }
    return new_state, metrics


def _accumulated(
    params: Any,
    batch: Batch,
    rng: jax.Array,
    accum_steps: int,
    model: Any,
    normalize: Callable[[jax.Array], jax.Array],
    loss: str,
    num_classes: int,
    label_smoothing: float,
) -> tuple[jax.Array, jax.Array, Any]:
    """``(loss, top1, grads)`` of the whole batch as masked means, summed over ``accum_steps`` micro-batches."""
    size = batch["mask"].shape[0]
    if size % accum_steps:
        raise ValueError(f"cannot split a batch of {size} examples into {accum_steps} micro-batches of equal size")

    # Micro-batch i holds examples i, i + k, i + 2k, ...: with the batch split over devices in contiguous blocks of
    # a multiple of k, every device keeps its own examples and works on each micro-batch (no data moves).
    def split(x: jax.Array) -> jax.Array:
        return jnp.moveaxis(x.reshape(size // accum_steps, accum_steps, *x.shape[1:]), 1, 0)

    micro = jax.tree_util.tree_map(split, batch)

    def sums(params: Any, part: Batch, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits = model.apply({"params": params}, normalize(part["image"]), train=True, rngs={"dropout": key})
        per = per_example_loss(
            logits, part["label"], loss=loss, num_classes=num_classes, label_smoothing=label_smoothing
        )
        mask = part["mask"].astype(jnp.float32)
        return (per * mask).sum(), (topk_correct(logits, part["label"], 1) * mask).sum()

    def body(carry: Any, xs: tuple[jax.Array, Batch]) -> tuple[Any, None]:
        index, part = xs
        (loss_sum, top1_sum), grads = jax.value_and_grad(sums, has_aux=True)(
            params, part, jax.random.fold_in(rng, index)
        )
        total = (carry[0] + loss_sum, carry[1] + top1_sum, jax.tree_util.tree_map(jnp.add, carry[2], grads))
        return total, None

    zeros = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), jax.tree_util.tree_map(jnp.zeros_like, params))
    (loss_sum, top1_sum, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(accum_steps), micro))
    count = jnp.maximum(batch["mask"].astype(jnp.float32).sum(), 1.0)
    return loss_sum / count, top1_sum / count, jax.tree_util.tree_map(lambda g: g / count, grads)


def eval_step(
    params: Any,
    batch: Batch,
    *,
    model: Any,
    normalize: Callable[[jax.Array], jax.Array],
    loss: str,
    num_classes: int,
) -> Metrics:
    """Held-out metrics of one padded batch as *sums*, so batches add up exactly (the padding has mask 0).

    Returns:
        ``loss_sum`` (plain cross-entropy, no label smoothing), ``top1_sum``, ``top5_sum`` and ``count``.
    """
    logits = model.apply({"params": params}, normalize(batch["image"]), train=False)
    mask = batch["mask"].astype(jnp.float32)
    labels = batch["label"]
    per = per_example_loss(logits, labels, loss=loss, num_classes=num_classes)
    return {
        "loss_sum": (per * mask).sum(),
        "top1_sum": (topk_correct(logits, labels, 1) * mask).sum(),
        "top5_sum": (topk_correct(logits, labels, 5) * mask).sum(),
        "count": mask.sum(),
    }
