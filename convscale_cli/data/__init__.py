"""Grain input pipelines: training and evaluation loaders, augmentation, exact resume, multi-host sharding.

Public API (imported lazily, so ``import convscale_cli.data`` never pulls in jax or grain)::

    train_loader, eval_loader, Loader          # convscale_cli.data.pipeline (grain, numpy, PIL)
    AugmentConfig, augment_from_dict           # convscale_cli.data.augment
    normalize, to_global, mix_batch, one_hot_targets   # convscale_cli.data.device (jax)
    IMAGENET_MEAN, IMAGENET_STD                # plain tuples, 0-255 scale
"""

from __future__ import annotations

from convscale_cli.lazy import attach

# The statistics timm's NFNet and ViT weights were trained with (0-255 scale, RGB).
IMAGENET_MEAN: tuple[float, float, float] = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD: tuple[float, float, float] = (0.229 * 255, 0.224 * 255, 0.225 * 255)

_LAZY = {
    "train_loader": "pipeline",
    "eval_loader": "pipeline",
    "Loader": "pipeline",
    "AugmentConfig": "augment",
    "augment_from_dict": "augment",
    "normalize": "device",
    "to_global": "device",
    "mix_batch": "device",
    "one_hot_targets": "device",
}

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", *_LAZY]

__getattr__, __dir__ = attach(__name__, _LAZY, __all__)
