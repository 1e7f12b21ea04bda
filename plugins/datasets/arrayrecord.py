"""``arrayrecord``: a dataset converted to ArrayRecord shards by ``convscale data convert`` (option ``root``).

ArrayRecord is Grain's random-access file format: reading example ``i`` of a 1M-image dataset is one seek, so the
loader's global per-epoch shuffle costs nothing extra, and a few large shard files are much kinder to network file
systems than a million small JPEGs. Layout and record format: :mod:`convscale_cli.data.records`. Images are decoded
with PIL in the source (so in the Grain workers); corrupt images are handled as by ``imagefolder``.
"""

from __future__ import annotations

from typing import Any

from convscale_cli.errors import DataError, UsageError
from convscale_cli.hookspecs import hookimpl
from convscale_cli.registry import DatasetInfo, DatasetSpec

NAME = "arrayrecord"
DEFAULTS: dict[str, Any] = {"root": None, "strict_data": False}
SPLITS = ("train", "eval")


class ArrayRecordSource:
    """Random-access source over one split's shards; picklable (Grain's reader reopens files after unpickling)."""

    def __init__(self, split: str, root: str, strict: bool) -> None:
        from pathlib import Path

        from convscale_cli.data.files import CorruptImages
        from convscale_cli.data.records import read_manifest

        manifest = read_manifest(root)
        if split not in manifest["splits"]:
            raise DataError(f"{root} has no {split!r} split: it holds {', '.join(manifest['splits'])}")
        self.split = split
        self.root = str(Path(root).expanduser())
        self.classes = tuple(manifest["classes"])
        self.multi_label = bool(manifest["multi_label"])
        self.paths = [str(Path(self.root) / shard) for shard in manifest["splits"][split]["shards"]]
        self.size = int(manifest["splits"][split]["count"])
        self.corrupt = CorruptImages(strict)
        self._reader: Any = None

    def _records(self) -> Any:
        if self._reader is None:
            from grain.sources import ArrayRecordDataSource

            self._reader = ArrayRecordDataSource(self.paths)
            if len(self._reader) != self.size:
                raise DataError(
                    f"shards of split {self.split!r} in {self.root} hold {len(self._reader)} records, "
                    f"the manifest says {self.size}"
                )
        return self._reader

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        import numpy as np

        from convscale_cli.data.files import open_image
        from convscale_cli.data.records import decode_record

        encoded, labels, example_id = decode_record(self._records()[int(index)])
        bad = [label for label in labels if not 0 <= label < len(self.classes)]
        if bad or (not labels and not self.multi_label):
            what = f"label {bad[0]}" if bad else "no label"
            raise DataError(
                f"{self.root} {self.split} record {index} (id {example_id}) has {what}; the manifest lists "
                f"{len(self.classes)} classes (labels 0..{len(self.classes) - 1})"
            )
        if self.multi_label:
            label: Any = np.zeros(len(self.classes), np.float32)
            label[list(labels)] = 1.0
        else:
            label = labels[0]
        try:
            image = open_image(encoded)
        except (OSError, ValueError, SyntaxError) as exc:
            self.corrupt.report(f"{self.root} {self.split} record {index} (id {example_id})", exc)
            return {"image": None, "label": label, "id": example_id}
        return {"image": image, "label": label, "id": example_id}

    def __getstate__(self) -> dict[str, Any]:
        # Readers hold open files; each process (Grain worker) opens its own on first access.
        return {**self.__dict__, "_reader": None}

    def __repr__(self) -> str:
        return f"ArrayRecordSource(split={self.split!r}, root={self.root!r}, size={self.size})"


def _options(options: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise UsageError(f"unknown arrayrecord option {unknown[0]!r}: choose from {', '.join(DEFAULTS)}")
    resolved = {**DEFAULTS, **options}
    if not resolved["root"]:
        raise DataError("dataset arrayrecord needs the option root=DIR (the output of `convscale data convert`)")
    return resolved


def open_split(split: str, **options: Any) -> ArrayRecordSource:
    """Open the ``train`` or ``eval`` split."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} of dataset arrayrecord: choose from {', '.join(SPLITS)}")
    o = _options(options)
    return ArrayRecordSource(split, str(o["root"]), bool(o["strict_data"]))


def info(**options: Any) -> DatasetInfo:
    """Classes and split sizes from the manifest (no shard is opened)."""
    from convscale_cli.data.records import read_manifest

    manifest = read_manifest(_options(options)["root"])
    return DatasetInfo(
        num_classes=len(manifest["classes"]),
        split_sizes={split: int(entry["count"]) for split, entry in manifest["splits"].items()},
        resolution=224,  # photographs: the paper's training resolution
        multi_label=bool(manifest["multi_label"]),
    )


@hookimpl
def register_datasets(register) -> None:  # noqa: ANN001 (pluggy passes the registry callback)
    """Register ``arrayrecord``."""
    register(
        DatasetSpec(
            name=NAME,
            description="ArrayRecord shards written by `convscale data convert` (option root=DIR)",
            open=open_split,
            info=info,
            options=dict(DEFAULTS),
        )
    )
