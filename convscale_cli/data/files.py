"""Image files on disk: the ``ROOT/{train,val}/CLASS/*.jpg|png`` layout, decoding, and corrupt-file bookkeeping.

Shared by the ``imagefolder`` dataset plugin and ``convscale data convert`` (which turns the same layout into
ArrayRecord shards), so both agree on class indices (sorted folder names of the train split) and example ids (the
position of a file in the sorted listing of its split).
"""

from __future__ import annotations

import dataclasses
import io
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from convscale_cli.errors import DataError

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# The on-disk folder of each loader split: "val" holds the evaluation images (the ImageNet convention).
SPLIT_DIRS = {"train": "train", "eval": "val"}


class CorruptImageWarning(UserWarning):
    """An image could not be decoded and was skipped."""


@dataclasses.dataclass(frozen=True)
class FolderSplit:
    """The files of one split: paths relative to the split folder, their labels, and the class names."""

    root: str  # the split folder, e.g. ROOT/train
    classes: tuple[str, ...]
    files: tuple[str, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.files)


def list_classes(root: Path) -> tuple[str, ...]:
    """Sorted class folder names of ``root/train`` (the class index is the position in this list)."""
    train = _split_dir(root, "train")
    classes = tuple(sorted(entry.name for entry in os.scandir(train) if entry.is_dir()))
    if not classes:
        raise DataError(f"no class folders in {train}: expected {train}/CLASS/*.jpg")
    return classes


def _split_dir(root: Path, split: str) -> Path:
    if split not in SPLIT_DIRS:
        raise DataError(f"unknown split {split!r}: choose from {', '.join(SPLIT_DIRS)}")
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist or is not a directory")
    path = root / SPLIT_DIRS[split]
    if not path.is_dir():
        raise DataError(f"missing split folder {path}: expected {root}/{{train,val}}/CLASS/*.jpg")
    return path


def scan_split(root: str | Path, split: str) -> FolderSplit:
    """List the images of ``split`` ("train" -> ``root/train``, "eval" -> ``root/val``), sorted, with labels.

    Raises:
        DataError: missing folder, no class folders, an empty class folder, a ``val`` class that ``train`` lacks.
    """
    root = Path(root).expanduser()
    classes = list_classes(root)
    folder = _split_dir(root, split)
    index = {name: i for i, name in enumerate(classes)}
    files: list[str] = []
    labels: list[int] = []
    present = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    if not present:
        raise DataError(f"no class folders in {folder}: expected {folder}/CLASS/*.jpg")
    for name in present:
        if name not in index:
            raise DataError(f"class folder {folder / name} has no counterpart in {root / 'train'}")
        images = sorted(
            entry.name
            for entry in os.scandir(folder / name)
            if entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS)
        )
        if not images:
            raise DataError(f"class folder {folder / name} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        files.extend(f"{name}/{image}" for image in images)
        labels.extend([index[name]] * len(images))
    return FolderSplit(root=str(folder), classes=classes, files=tuple(files), labels=tuple(labels))


def open_image(data: bytes | str | Path) -> PILImage:
    """Decode JPEG/PNG bytes (or a file) to a loaded RGB PIL image; raises ``OSError``/``ValueError`` if corrupt.

    File sources hand this to the pipeline as it is: the transforms crop and resize PIL images directly, which saves
    the decoded image's round trip through numpy (~0.3 ms of ~1.7 ms per 224 px image, benchmarks/bench_loader.py).
    """
    from PIL import Image

    handle = io.BytesIO(data) if isinstance(data, bytes) else open(data, "rb")  # noqa: SIM115 (closed below)
    with handle:
        image = Image.open(handle)
        image.load()
    return image if image.mode == "RGB" else image.convert("RGB")


def decode_image(data: bytes | str | Path) -> np.ndarray:
    """Decode JPEG/PNG bytes (or a file) to ``uint8[H, W, 3]`` RGB; raises ``OSError``/``ValueError`` if corrupt."""
    return np.asarray(open_image(data))


class CorruptImages:
    """Counts undecodable images of one source; warns once (with the path), or raises in strict mode.

    Counts are per process: with Grain worker processes each worker counts (and warns about) its own share.
    """

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.count = 0
        self.first: str | None = None

    def report(self, where: str, exc: BaseException) -> None:
        """Record one corrupt image at ``where``; raise DataError in strict mode."""
        if self.strict:
            raise DataError(f"corrupt image {where}: {exc} (drop strict_data to skip corrupt images)") from exc
        self.count += 1
        if self.first is None:
            self.first = where
            warnings.warn(
                f"skipping corrupt image {where} ({type(exc).__name__}: {exc}); further corrupt images are skipped "
                "and counted without a warning",
                CorruptImageWarning,
                stacklevel=3,
            )
