"""``imagefolder``: images on disk laid out as ``ROOT/{train,val}/CLASS/*.jpg|png`` (option ``root``).

The class index is the position of the class folder in the sorted list of ``ROOT/train``'s folders; ``val`` is the
evaluation split. Images are decoded with PIL inside the source, i.e. inside the Grain worker processes, so decoding
scales with ``worker_count``. A corrupt image is skipped (the loader gives it mask 0), counted, and reported once with
its path; with ``strict_data=True`` it is a :class:`~convscale_cli.errors.DataError` instead.
"""

from __future__ import annotations

from typing import Any

from convscale_cli.errors import DataError, UsageError
from convscale_cli.hookspecs import hookimpl
from convscale_cli.registry import DatasetInfo, DatasetSpec

NAME = "imagefolder"
DEFAULTS: dict[str, Any] = {"root": None, "strict_data": False}
SPLITS = ("train", "eval")


class ImageFolderSource:
    """Random-access source over one split's files; picklable (paths only), decodes in ``__getitem__``."""

    def __init__(self, split: str, root: str, strict: bool) -> None:
        from convscale_cli.data.files import CorruptImages, scan_split

        self.split = split
        self.listing = scan_split(root, split)
        self.corrupt = CorruptImages(strict)

    @property
    def classes(self) -> tuple[str, ...]:
        """Class names, in label order."""
        return self.listing.classes

    def __len__(self) -> int:
        return len(self.listing)

    def __getitem__(self, index: int) -> dict[str, Any]:
        import os

        from convscale_cli.data.files import open_image

        index = int(index)
        path = os.path.join(self.listing.root, self.listing.files[index])
        label = self.listing.labels[index]
        try:
            image = open_image(path)
        except (OSError, ValueError, SyntaxError) as exc:  # PIL raises all three for damaged files
            self.corrupt.report(path, exc)
            return {"image": None, "label": label, "id": index}
        return {"image": image, "label": label, "id": index}

    def __repr__(self) -> str:
        return f"ImageFolderSource(split={self.split!r}, root={self.listing.root!r}, size={len(self)})"


def _options(options: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise UsageError(f"unknown imagefolder option {unknown[0]!r}: choose from {', '.join(DEFAULTS)}")
    resolved = {**DEFAULTS, **options}
    if not resolved["root"]:
        raise DataError("dataset imagefolder needs the option root=DIR (a folder holding train/ and val/)")
    return resolved


def open_split(split: str, **options: Any) -> ImageFolderSource:
    """Open ``train`` (``ROOT/train``) or ``eval`` (``ROOT/val``)."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} of dataset imagefolder: choose from {', '.join(SPLITS)}")
    o = _options(options)
    return ImageFolderSource(split, str(o["root"]), bool(o["strict_data"]))


def info(**options: Any) -> DatasetInfo:
    """Classes and split sizes read from the folder listing (no image is decoded)."""
    from pathlib import Path

    from convscale_cli.data.files import scan_split

    o = _options(options)
    train = scan_split(o["root"], "train")
    sizes = {"train": len(train)}
    if (Path(o["root"]).expanduser() / "val").is_dir():
        sizes["eval"] = len(scan_split(o["root"], "eval"))
    # 224 px: the paper's training resolution, the natural default for photographs.
    return DatasetInfo(num_classes=len(train.classes), split_sizes=sizes, resolution=224)


@hookimpl
def register_datasets(register) -> None:  # noqa: ANN001 (pluggy passes the registry callback)
    """Register ``imagefolder``."""
    register(
        DatasetSpec(
            name=NAME,
            description="JPEG/PNG files in ROOT/{train,val}/CLASS/ (option root=DIR), decoded by PIL in the workers",
            open=open_split,
            info=info,
            options=dict(DEFAULTS),
        )
    )
