"""Grain input pipelines: training and evaluation loaders, augmentation, exact resume, multi-host sharding.

Public API (imported lazily, so ``import convscale_cli.data`` never pulls in jax or grain)::

    train_loader, eval_loader, Loader          # convscale_cli.data.pipeline (grain, numpy, PIL)
    AugmentConfig, augment_from_dict           # convscale_cli.data.augment
    normalize, to_global, mix_batch, one_hot_targets   # convscale_cli.data.device (jax)
    IMAGENET_MEAN, IMAGENET_STD                # plain tuples, 0-255 scale
    Normalization, IMAGENET, INCEPTION         # a model's input normalisation (plain Python)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from convscale_cli.errors import CheckpointError
from convscale_cli.lazy import attach

# The ImageNet statistics DeepMind's NFNets (and timm's dm_nfnet weights) normalise with (0-255 scale, RGB).
IMAGENET_MEAN: tuple[float, float, float] = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD: tuple[float, float, float] = (0.229 * 255, 0.224 * 255, 0.225 * 255)


@dataclasses.dataclass(frozen=True)
class Normalization:
    """A model's input normalisation: pixels ``x`` in [0, 1] become ``(x - mean) / std`` per RGB channel.

    Every checkpoint records the one its parameters were trained with (``model.json`` and a run's ``config.json``
    under ``normalization``); one that records none was written before convscale kept it and used ImageNet's.

    Attributes:
        mean: per-channel mean, RGB, on the [0, 1] scale (timm's ``pretrained_cfg["mean"]``).
        std: per-channel standard deviation, RGB, on the [0, 1] scale.
    """

    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        for name in ("mean", "std"):
            value = getattr(self, name)
            ok = (
                isinstance(value, (tuple, list))
                and len(value) == 3
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
            )
            if not ok or (name == "std" and min(value) <= 0):
                raise ValueError(f"normalization {name} {value!r} must be three finite numbers (std > 0), RGB")
            object.__setattr__(self, name, tuple(float(v) for v in value))

    def to_json(self) -> dict[str, list[float]]:
        """``{"mean": [r, g, b], "std": [r, g, b]}``, as checkpoints record it."""
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_json(cls, value: Any, where: str) -> Normalization:
        """The normalisation a checkpoint records (``None``: ImageNet's, which every older checkpoint used).

        Raises:
            CheckpointError: ``value`` is not ``{"mean": [3 numbers], "std": [3 positive numbers]}``; names ``where``.
        """
        if value is None:
            return IMAGENET
        if not isinstance(value, Mapping) or set(value) != {"mean", "std"}:
            expected = "{'mean': [r, g, b], 'std': [r, g, b]}"
            raise CheckpointError(f"{where}: normalization is {value!r}, expected {expected}")
        try:
            return cls(mean=value["mean"], std=value["std"])
        except ValueError as exc:
            raise CheckpointError(f"{where}: {exc}") from None

    def scaled(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """``(mean, std)`` on the 0-255 scale of uint8 images."""
        return tuple(255 * m for m in self.mean), tuple(255 * s for s in self.std)


# DeepMind's NFNet reference normalises with the ImageNet statistics.
IMAGENET = Normalization()
# big_vision's ViT inputs are scaled to [-1, 1] (value_range(-1, 1)); timm's ViT weights mostly use the same
# (IMAGENET_INCEPTION_MEAN / _STD, 0.5 per channel).
INCEPTION = Normalization(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

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

__all__ = ["IMAGENET", "IMAGENET_MEAN", "IMAGENET_STD", "INCEPTION", "Normalization", *_LAZY]

__getattr__, __dir__ = attach(__name__, _LAZY, __all__)
