"""Convert an image folder (``ROOT/{train,val}/CLASS/*``) into ArrayRecord shards (``convscale data convert``).

Shards are written in parallel (one thread per shard at a time: reading files and ArrayRecord's compression release
the GIL), into a temporary directory next to the destination that is renamed into place only when every shard and the
manifest are complete, so an interrupted conversion never leaves a half-written dataset that looks valid. Images are
copied byte for byte (no re-encoding); each is test-decoded first so corrupt files are skipped and reported here rather
than at training time.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from convscale_cli.data.files import SPLIT_DIRS, FolderSplit, scan_split
from convscale_cli.data.records import encode_record, shard_name, write_manifest
from convscale_cli.errors import DataError, UsageError

DEFAULT_SHARD_SIZE = 4096  # examples per shard: ~0.5 GB of ImageNet JPEGs, a good unit for parallel reads


@dataclasses.dataclass
class ConvertReport:
    """What a conversion wrote."""

    out: Path
    counts: dict[str, int]  # examples written per split
    skipped: dict[str, list[str]]  # corrupt files skipped per split
    shards: dict[str, int]
    bytes: int  # total size of the output directory
    num_classes: int


def _write_shard(listing: FolderSplit, start: int, stop: int, path: Path, advance: Callable[[int], None]) -> list[str]:
    from array_record.python.array_record_module import ArrayRecordWriter
    from PIL import Image

    skipped: list[str] = []
    # group_size:1 makes every record individually seekable: the loader reads records in a random order.
    writer = ArrayRecordWriter(str(path), "group_size:1")
    try:
        for index in range(start, stop):
            file = os.path.join(listing.root, listing.files[index])
            with open(file, "rb") as handle:
                data = handle.read()
            try:
                with Image.open(io.BytesIO(data)) as image:
                    image.load()
            except (OSError, ValueError, SyntaxError):
                skipped.append(file)
            else:
                writer.write(encode_record(data, [listing.labels[index]], index))
            advance(1)
    finally:
        writer.close()
    return skipped


def _umask() -> int:
    """The process's umask (read by setting and restoring it: POSIX has no way to only read it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def convert_imagefolder(
    src: str | Path,
    out: str | Path,
    *,
    shard_size: int = DEFAULT_SHARD_SIZE,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ConvertReport:
    """Convert ``src`` (an image folder) into an ArrayRecord dataset at ``out`` (which must not exist).

    Args:
        src: folder holding ``train/CLASS/*`` and optionally ``val/CLASS/*``.
        out: destination directory; created atomically (temporary sibling directory, then rename).
        shard_size: examples per shard.
        workers: parallel shard writers (default: CPU count, at most 16).
        progress: ``progress(done, total)`` called as images are written (thread-safe calls, any thread).

    Raises:
        UsageError: ``out`` already exists, or bad ``shard_size``/``workers``.
        DataError: ``src`` is not a valid image folder, or every image of a split is corrupt.
    """
    src, out = Path(src).expanduser(), Path(out).expanduser()
    if shard_size <= 0:
        raise UsageError(f"shard size must be > 0, got {shard_size}")
    if workers is not None and workers < 0:
        raise UsageError(f"`workers` must be >= 0 (0 or unset: one per CPU, at most 16), got {workers}")
    workers = workers or min(16, os.cpu_count() or 1)
    if out.exists():
        raise UsageError(f"output directory {out} already exists: choose a new `out` or delete it")
    splits = {"train": scan_split(src, "train")}
    if (src / SPLIT_DIRS["eval"]).is_dir():
        splits["eval"] = scan_split(src, "eval")
    total = sum(len(listing) for listing in splits.values())

    lock = threading.Lock()
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        with lock:
            done += n
            if progress is not None:
                progress(done, total)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    # mkdtemp creates the directory 0o700; the dataset it becomes gets the mode any directory the user creates has
    # (0o755 under umask 022, 0o775 under 002), so a dataset on shared storage is readable like its neighbours.
    tmp.chmod(0o777 & ~_umask())
    try:
        jobs = {}
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for split, listing in splits.items():
                count = max(1, math.ceil(len(listing) / shard_size))
                for shard in range(count):
                    start, stop = shard * shard_size, min(len(listing), (shard + 1) * shard_size)
                    path = tmp / shard_name(split, shard, count)
                    jobs[(split, shard_name(split, shard, count))] = pool.submit(
                        _write_shard, listing, start, stop, path, advance
                    )
        skipped: dict[str, list[str]] = {split: [] for split in splits}
        shards: dict[str, list[str]] = {split: [] for split in splits}
        for (split, name), job in jobs.items():
            skipped[split].extend(job.result())
            shards[split].append(name)
        counts = {split: len(listing) - len(skipped[split]) for split, listing in splits.items()}
        for split, count in counts.items():
            if count == 0:
                raise DataError(f"every image of split {split!r} in {src} is corrupt: nothing to convert")
        classes = list(splits["train"].classes)
        write_manifest(
            tmp,
            classes=classes,
            splits={split: {"count": counts[split], "shards": shards[split]} for split in splits},
            multi_label=False,
        )
        os.replace(tmp, out)  # atomic on one file system: `out` appears complete or not at all
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(f.stat().st_size for f in out.iterdir())
    return ConvertReport(
        out=out,
        counts=counts,
        skipped=skipped,
        shards={split: len(names) for split, names in shards.items()},
        bytes=size,
        num_classes=len(classes),
    )
