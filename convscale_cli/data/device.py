"""On-device parts of the input pipeline: normalisation, MixUp/CutMix/label smoothing, and global batch assembly.

The host ships uint8 images (4x less host-to-device traffic than float32); the jitted training step normalises them
with the statistics the parameters are trained with (:class:`~convscale_cli.data.Normalization`: ImageNet's, or those
of imported weights, e.g. 0.5 for timm's ViTs), and mixes examples there because MixUp/CutMix need pairs of examples
and soft labels (NFNet fine-tuning recipe, Brock et al. 2021 A.3: MixUp 0.2 on half the batch, CutMix on the other
half).

Multi-host: every process builds only its ``b = B / P`` rows of each global batch (see
:mod:`convscale_cli.data.pipeline`). :func:`to_global` turns those process-local numpy arrays into global
``jax.Array`` s with ``jax.make_array_from_process_local_data``, which places each process's rows on its own devices of
a batch-sharded ``NamedSharding`` without any cross-host copy. Process ``i``'s rows are rows ``[i b, (i + 1) b)`` of the
global batch, which matches the order ``jax.make_array_from_process_local_data`` assumes when the batch axis is
sharded over all devices of the mesh in process order (the default device order of ``jax.make_mesh``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from convscale_cli.data import IMAGENET_MEAN, IMAGENET_STD, Normalization


def normalize(
    images: jax.Array,
    dtype: Any = jnp.float32,
    *,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> jax.Array:
    """uint8 ``[..., H, W, 3]`` images -> ``(x - mean) / std``, statistics on the 0-255 scale (default ImageNet's)."""
    inv_std = 1.0 / jnp.asarray(std, jnp.float32)
    return ((images.astype(jnp.float32) - jnp.asarray(mean, jnp.float32)) * inv_std).astype(dtype)


@dataclasses.dataclass(frozen=True)
class Normalizer:
    """``normalize`` with a model's statistics bound: what the compiled steps call on their uint8 batches.

    A frozen dataclass rather than a ``functools.partial`` so that two runs of one model compare equal and share
    their compiled programs (:mod:`convscale_cli.engine.cache`).
    """

    fn: Callable[..., jax.Array]
    normalization: Normalization

    def __call__(self, images: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
        mean, std = self.normalization.scaled()
        return self.fn(images, dtype, mean=mean, std=std)


def to_global(batch: dict[str, Any], sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
    """Assemble process-local numpy batches into global arrays sharded by ``sharding`` along the batch axis.

    Args:
        batch: this process's batch from a loader (``{"image", "label", "id", "mask"}`` numpy arrays).
        sharding: a sharding of the batch axis, e.g. ``NamedSharding(mesh, PartitionSpec("data"))``; trailing axes are
            replicated.

    Returns:
        The same keys as global ``jax.Array`` s whose leading dimension is ``b * jax.process_count()``.
    """
    return {key: jax.make_array_from_process_local_data(sharding, value) for key, value in batch.items()}


def smooth_labels(targets: jax.Array, label_smoothing: float, num_classes: int) -> jax.Array:
    """Targets mixed with the uniform distribution over ``num_classes`` (Szegedy et al. 2016, "Rethinking the
    Inception Architecture", §7): the one label smoothing of convscale, for pre-training's loss and fine-tuning's
    mixed targets alike."""
    if label_smoothing > 0:
        targets = targets * (1.0 - label_smoothing) + label_smoothing / num_classes
    return targets


def one_hot_targets(labels: jax.Array, num_classes: int, label_smoothing: float = 0.0) -> jax.Array:
    """Integer labels (or multi-hot float labels, passed through) -> float32 targets with optional smoothing."""
    if labels.ndim == 1 and jnp.issubdtype(labels.dtype, jnp.integer):
        targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    else:
        targets = labels.astype(jnp.float32)
    return smooth_labels(targets, label_smoothing, num_classes)


def _cutmix_mask(rng: jax.Array, height: int, width: int, lam: jax.Array) -> tuple[jax.Array, jax.Array]:
    # Box of area (1 - lam) H W at a uniform centre, clipped to the image (Yun et al. 2019); the label weight uses the
    # clipped area so labels match pixels exactly.
    cy_key, cx_key = jax.random.split(rng)
    cut = jnp.sqrt(1.0 - lam)
    cy = jax.random.uniform(cy_key) * height
    cx = jax.random.uniform(cx_key) * width
    y0, y1 = jnp.clip(cy - cut * height / 2, 0, height), jnp.clip(cy + cut * height / 2, 0, height)
    x0, x1 = jnp.clip(cx - cut * width / 2, 0, width), jnp.clip(cx + cut * width / 2, 0, width)
    ys = jnp.arange(height)[:, None] + 0.5
    xs = jnp.arange(width)[None, :] + 0.5
    inside = (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)
    kept = 1.0 - inside.mean()
    return inside, kept


def mix_batch(
    rng: jax.Array,
    images: jax.Array,
    labels: jax.Array,
    *,
    num_classes: int,
    mixup_alpha: float = 0.0,
    cutmix_alpha: float = 0.0,
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
    """MixUp / CutMix and label smoothing inside the jitted step; returns ``(images, float32 targets [B, C])``.

    Each example is mixed with the example at the mirrored batch position (one ``lambda`` per half batch, as in the
    NFNet reference). With both alphas > 0 the first half gets MixUp and the second CutMix (NFNet recipe); with one
    of them, the whole batch gets it. Call it with normalised float images; padding rows (mask 0) are mixed like the
    rest, which is harmless because their own loss weight is 0 and padding only occurs in the run's final batch.

    Args:
        rng: PRNG key (fold the step in so every step mixes differently).
        images: float ``[B, H, W, C]``.
        labels: int ``[B]`` or float multi-hot ``[B, num_classes]``.
        num_classes: classifier size.
        mixup_alpha: Beta(alpha, alpha) for MixUp; 0 disables.
        cutmix_alpha: Beta(alpha, alpha) for CutMix; 0 disables.
        label_smoothing: smoothing of the targets before mixing.
    """
    targets = one_hot_targets(labels, num_classes, label_smoothing)
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return images, targets
    batch, height, width = images.shape[0], images.shape[1], images.shape[2]
    partner_images, partner_targets = images[::-1], targets[::-1]
    mix_key, cut_key, box_key = jax.random.split(rng, 3)
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = jnp.arange(batch) >= batch // 2
    else:
        use_cutmix = jnp.full((batch,), cutmix_alpha > 0)
    lam_mix = jax.random.beta(mix_key, mixup_alpha, mixup_alpha) if mixup_alpha > 0 else jnp.float32(1.0)
    lam_cut = jax.random.beta(cut_key, cutmix_alpha, cutmix_alpha) if cutmix_alpha > 0 else jnp.float32(1.0)
    inside, kept = _cutmix_mask(box_key, height, width, lam_cut)
    mixed = lam_mix * images + (1.0 - lam_mix) * partner_images
    cutted = jnp.where(inside[None, :, :, None], partner_images, images)
    out_images = jnp.where(use_cutmix[:, None, None, None], cutted, mixed).astype(images.dtype)
    weight = jnp.where(use_cutmix, kept, lam_mix)[:, None]
    out_targets = weight * targets + (1.0 - weight) * partner_targets
    return out_images, out_targets
