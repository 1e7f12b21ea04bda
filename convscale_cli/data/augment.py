"""Per-example image transforms run on the host (in Grain workers): training crops and flips, evaluation crops.

Training default follows the NFNet JFT pre-training recipe the paper reuses (Smith et al. 2023 §2; Brock et al.
2021 §6.2/A.5: "no augmentation beyond random crops and flips"): an Inception-style random-resized crop and a
horizontal flip. Fine-tuning adds RandAugment (host, :mod:`convscale_cli.data.randaugment`), and MixUp/CutMix and
label smoothing (device, :func:`convscale_cli.data.device.mix_batch`, because they mix pairs of examples), and
repeated augmentation (the loader draws each example ``repeats`` times in a row, Smith et al. 2023 §3, footnote 4).

Every random choice is a slot of a vector of uniforms hashed from ``(seed, position in the example stream)``
(counter-based, like JAX's PRNG: no generator state to save, and far cheaper than seeding a numpy Generator per
image), so a resumed run reproduces the exact pixels it would have produced without the interruption.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import numpy as np

from convscale_cli.errors import UnknownNameError, UsageError

CropMode = Literal["inception", "resize"]
CROP_MODES = ("inception", "resize")

# The paper's evaluation resizes to (target + 32) then centre-crops at 224 -> 256 px (NFNet 2021 A.3); as a fraction
# that is 224/256 = 0.875, which we apply at every resolution so 32 px datasets keep the same framing.
DEFAULT_EVAL_CROP_FRACTION = 0.875


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation; the default is the pre-training recipe (inception crop + flip, nothing else)."""

    # "inception": random-resized crop (Szegedy et al. 2015); "resize": the whole image resized to the resolution.
    crop: CropMode = "inception"
    # Inception crop: the crop covers an area fraction in [min_area, max_area] with aspect ratio in `aspect_ratio`.
    min_area: float = 0.08
    max_area: float = 1.0
    aspect_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    flip: bool = True  # random horizontal flip with probability 1/2
    # RandAugment (Cubuk et al. 2020) as in the NFNet fine-tuning recipe: `randaugment_layers` ops per image at
    # `randaugment_magnitude` on the 0-10 scale (NFNet: 4 layers, magnitude 5-15). 0 layers disables it.
    randaugment_layers: int = 0
    randaugment_magnitude: float = 0.0
    # MixUp / CutMix Beta(alpha, alpha) parameters; NFNet applies MixUp (0.2) to half the batch and CutMix to the
    # other half. Applied on device by `mix_batch`, which the training step calls; 0 disables.
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    # Label smoothing applied to the one-hot targets by `mix_batch` (0 = none).
    label_smoothing: float = 0.0
    # Repeated augmentation multiplicity k (Hoffer et al. 2019): each drawn example appears k times in a row with
    # independent augmentations; the run's example count includes the repeats, so k=4 makes 4x fewer passes at the
    # same compute (the paper's footnote 4).
    repeats: int = 1

    def __post_init__(self) -> None:
        if self.crop not in CROP_MODES:
            raise UsageError(f"unknown crop mode {self.crop!r}: choose from {', '.join(CROP_MODES)}")
        if not 0.0 < self.min_area <= self.max_area <= 1.0:
            raise UsageError(
                f"crop areas must satisfy 0 < min_area <= max_area <= 1, got {self.min_area}, {self.max_area}"
            )
        low, high = self.aspect_ratio
        if not 0.0 < low <= high:
            raise UsageError(f"aspect_ratio must be (low, high) with 0 < low <= high, got {self.aspect_ratio}")
        if not 0 <= self.randaugment_layers <= 16 or self.randaugment_magnitude < 0:
            raise UsageError(
                f"RandAugment layers must be in [0, 16] and magnitude >= 0, got {self.randaugment_layers}, "
                f"{self.randaugment_magnitude}"
            )
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0:
            raise UsageError(f"mixup_alpha and cutmix_alpha must be >= 0, got {self.mixup_alpha}, {self.cutmix_alpha}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise UsageError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.repeats < 1:
            raise UsageError(f"repeats (augmentation multiplicity) must be >= 1, got {self.repeats}")

    @property
    def mixes(self) -> bool:
        """Whether :func:`~convscale_cli.data.device.mix_batch` has anything to do."""
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0 or self.label_smoothing > 0


# Slots of the per-example uniform vector (fixed layout so enabling one augmentation never shifts another's draws).
_CROP_TRIES = 10
_FLIP_SLOT = 4 * _CROP_TRIES
_RANDAUGMENT_SLOT = _FLIP_SLOT + 1
NUM_UNIFORMS = _RANDAUGMENT_SLOT + 4 * 16  # room for 16 RandAugment layers (op, sign, cutout row and column)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(z: np.ndarray) -> np.ndarray:
    # splitmix64 finaliser (Steele et al. 2014): a bijective avalanche mix of 64-bit words.
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def uniforms(seed: int, positions: np.ndarray, count: int = NUM_UNIFORMS) -> np.ndarray:
    """Counter-based uniforms in [0, 1): row ``i`` depends only on ``(seed, positions[i])``; shape ``[n, count]``."""
    with np.errstate(over="ignore"):
        key = _mix64(np.asarray([seed], np.uint64) + _GOLDEN)
        rows = _mix64(np.asarray(positions, np.uint64)[:, None] ^ key)
        z = _mix64(rows + (np.arange(1, count + 1, dtype=np.uint64) * _GOLDEN)[None, :])
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _to_rgb(image: Any) -> tuple[Any, int, int]:
    """A source image as ``(image, height, width)``: a PIL image in RGB mode, or a ``uint8[H, W, 3]`` array."""
    from PIL import Image

    if isinstance(image, Image.Image):  # file sources hand over the decoded PIL image: kept as one
        width, height = image.size
        return (image if image.mode == "RGB" else image.convert("RGB")), height, width
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise TypeError(f"source images must be uint8, got {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    elif image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    else:
        image = image[..., :3]
    return image, image.shape[0], image.shape[1]


def _pil(image: Any) -> Any:
    from PIL import Image

    return image if isinstance(image, Image.Image) else Image.fromarray(image)


def inception_crop_box(height: int, width: int, u: np.ndarray, cfg: AugmentConfig) -> tuple[int, int, int, int]:
    """Sample an Inception crop ``(left, top, right, bottom)`` from uniforms ``u``: 10 tries, then a central crop."""
    area = height * width
    log_low, log_high = math.log(cfg.aspect_ratio[0]), math.log(cfg.aspect_ratio[1])
    for t in range(_CROP_TRIES):
        a, r, y, x = u[4 * t : 4 * t + 4]
        target = area * (cfg.min_area + (cfg.max_area - cfg.min_area) * a)
        aspect = math.exp(log_low + (log_high - log_low) * r)
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(y * (height - h + 1))
            left = int(x * (width - w + 1))
            return left, top, left + w, top + h
    # Fallback: the largest central crop within the aspect-ratio range.
    ratio = width / height
    if ratio < cfg.aspect_ratio[0]:
        w, h = width, int(round(width / cfg.aspect_ratio[0]))
    elif ratio > cfg.aspect_ratio[1]:
        h, w = height, int(round(height * cfg.aspect_ratio[1]))
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


def train_transform(image: Any, resolution: int, u: np.ndarray, cfg: AugmentConfig) -> np.ndarray:
    """Crop, resize, flip (and RandAugment) one uint8 image to ``uint8[resolution, resolution, 3]``.

    Args:
        image: uint8 ``[H, W, 3]`` (grey ``[H, W]`` is replicated to RGB), or a PIL image (converted to RGB).
        resolution: output side in pixels.
        u: this example's :data:`NUM_UNIFORMS` uniforms (see :func:`uniforms`).
        cfg: the augmentation to apply.
    """
    from PIL import Image

    image, height, width = _to_rgb(image)
    if cfg.crop == "inception":
        box = inception_crop_box(height, width, u, cfg)
    else:
        box = (0, 0, width, height)
    flip = cfg.flip and u[_FLIP_SLOT] < 0.5
    if box == (0, 0, width, height) and height == resolution and width == resolution:
        out = np.asarray(image)  # the common 32 px "resize" case: no resampling at all
    else:
        # One PIL call crops and resamples (box=...), avoiding an intermediate copy of a large decoded JPEG.
        resized = _pil(image).resize((resolution, resolution), Image.BILINEAR, box=box)
        if flip and cfg.randaugment_layers == 0:
            # Same pixels as out[:, ::-1], 4x cheaper: numpy's reversed copy of 3-byte pixels took 0.25 ms at 224 px,
            # an eighth of an image's whole decode-and-augment cost (loader benchmark).
            resized, flip = resized.transpose(Image.FLIP_LEFT_RIGHT), False
        out = np.asarray(resized)
    if cfg.randaugment_layers > 0:
        from convscale_cli.data.randaugment import rand_augment

        out = rand_augment(out, u[_RANDAUGMENT_SLOT:], cfg.randaugment_layers, cfg.randaugment_magnitude)
    if flip:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def eval_transform(image: Any, resolution: int, crop_fraction: float = DEFAULT_EVAL_CROP_FRACTION) -> np.ndarray:
    """Resize the shorter side to ``resolution / crop_fraction`` (bicubic), then take the central square crop."""
    from PIL import Image

    image, height, width = _to_rgb(image)
    if height == width == resolution and crop_fraction >= 1.0:
        return np.ascontiguousarray(np.asarray(image))
    # Central region of the source that maps onto the output: a square of side crop_fraction * shorter side.
    side = min(height, width) * min(crop_fraction, 1.0)
    top, left = (height - side) / 2.0, (width - side) / 2.0
    box = (left, top, left + side, top + side)
    return np.asarray(_pil(image).resize((resolution, resolution), Image.BICUBIC, box=box))


def augment_from_dict(values: dict[str, Any] | None) -> AugmentConfig:
    """Build an :class:`AugmentConfig` from a plain mapping (a config file section); unknown keys are errors."""
    if values is None:
        return AugmentConfig()
    fields = {f.name for f in dataclasses.fields(AugmentConfig)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise UnknownNameError("augmentation option", unknown[0], fields)
    from convscale_cli.config import from_dict

    return from_dict(AugmentConfig, dict(values), prefix="augment.")  # types checked: min_area = "x" is named
