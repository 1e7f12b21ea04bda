"""The convscale ArrayRecord layout: shards of (encoded image, labels, id) records plus a JSON manifest.

ArrayRecord gives O(1) random access to records in large shard files, which is what exactly-once global shuffling
needs (Grain's own file format). Layout of a converted dataset ``DIR``::

    DIR/convscale-dataset.json          manifest: format version, class names, multi_label, per-split counts/shards
    DIR/train-00000-of-00004.array_record
    DIR/eval-00000-of-00001.array_record

A record is ``b"CSR1" | int64 id | uint32 n | int32 labels[n] | encoded image bytes`` (little endian). Images keep
their original JPEG/PNG encoding: conversion never re-encodes (no quality loss, fast), decoding happens in the loader.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from convscale_cli.errors import DataError

MANIFEST = "convscale-dataset.json"
FORMAT = "convscale-arrayrecord"
FORMAT_VERSION = 1
_MAGIC = b"CSR1"
_HEADER = struct.Struct("<4sqI")


def shard_name(split: str, index: int, count: int) -> str:
    """File name of shard ``index`` of ``count`` of ``split``."""
    return f"{split}-{index:05d}-of-{count:05d}.array_record"


def encode_record(image: bytes, labels: list[int] | tuple[int, ...], example_id: int) -> bytes:
    """Serialise one example."""
    return _HEADER.pack(_MAGIC, example_id, len(labels)) + struct.pack(f"<{len(labels)}i", *labels) + image


def decode_record(record: bytes) -> tuple[bytes, tuple[int, ...], int]:
    """Inverse of :func:`encode_record`: ``(image bytes, labels, id)``.

    Raises:
        DataError: the record is shorter than its header or than the labels it announces, or has the wrong magic.
    """
    if len(record) < _HEADER.size:
        raise DataError(f"record of {len(record)} bytes is shorter than the {_HEADER.size}-byte record header")
    magic, example_id, count = _HEADER.unpack_from(record)
    if magic != _MAGIC:
        raise DataError(f"record does not start with {_MAGIC!r} (got {magic!r}): not a convscale ArrayRecord shard")
    start = _HEADER.size
    if start + 4 * count > len(record):
        raise DataError(f"record {example_id} announces {count} labels but holds {len(record)} bytes in all")
    labels = struct.unpack_from(f"<{count}i", record, start)
    return record[start + 4 * count :], labels, example_id


def write_manifest(root: Path, *, classes: list[str], splits: dict[str, dict[str, Any]], multi_label: bool) -> None:
    """Write ``root/convscale-dataset.json``."""
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "classes": classes,
        "multi_label": multi_label,
        "splits": splits,
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def read_manifest(root: str | Path) -> dict[str, Any]:
    """Read and check the manifest of a converted dataset; DataError if missing or malformed."""
    root = Path(root).expanduser()
    path = root / MANIFEST
    if not path.is_file():
        raise DataError(f"{path} not found: convert an image folder with `convscale data convert SRC --out {root}`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict):
        raise DataError(f"{path} does not hold a JSON object")
    if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        raise DataError(
            f"{path} has format {manifest.get('format')!r} version {manifest.get('version')!r}: "
            f"expected {FORMAT!r} version {FORMAT_VERSION}"
        )
    _check_manifest(manifest, root, path)
    return manifest


def _check_manifest(manifest: dict[str, Any], root: Path, path: Path) -> None:
    """The manifest's fields have the types :func:`write_manifest` gives them, and every shard lies inside ``root``."""
    classes, splits = manifest.get("classes"), manifest.get("splits")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise DataError(f"{path}: classes is {classes!r}, expected a non-empty list of class names")
    if not isinstance(manifest.get("multi_label", False), bool):
        raise DataError(f"{path}: multi_label is {manifest['multi_label']!r}, expected true or false")
    if not isinstance(splits, dict) or not splits:
        raise DataError(f"{path}: splits is {splits!r}, expected a table of splits (train, eval)")
    for split, entry in splits.items():
        where = f"{path}: split {split!r}"
        if not isinstance(entry, dict):
            raise DataError(f"{where} is {entry!r}, expected a table with count and shards")
        count, shards = entry.get("count"), entry.get("shards")
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise DataError(f"{where}: count is {count!r}, expected a non-negative integer")
        if not isinstance(shards, list) or not all(isinstance(s, str) for s in shards):
            raise DataError(f"{where}: shards is {shards!r}, expected a list of file names")
        for shard in shards:
            # Names, not resolved paths: a shard may be a symlink to another disk, but not "../../etc/hostname".
            parts = Path(shard).parts
            if not parts or Path(shard).is_absolute() or ".." in parts:
                raise DataError(f"{where}: shard {shard!r} lies outside the dataset directory {str(root)!r}")
            if not (root / shard).is_file():
                raise DataError(f"shard {root / shard} of split {split!r} listed in {path} is missing")
