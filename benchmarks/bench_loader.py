"""Throughput of the imagefolder JPEG training pipeline at 224 px vs PyTorch's DataLoader, and vs NFNet-F0's appetite.

Both pipelines do the same work per image with the same number of worker processes: read the file, decode the JPEG
with PIL, Inception random-resized crop to 224 x 224 (bilinear), random horizontal flip, and batch into uint8 NHWC.
The torch side writes the transforms with PIL directly (no torchvision), so the comparison is loader machinery vs
loader machinery. The F0 line converts NFNet-F0's training FLOPs per image (registry count at 224 px) into the
images/s one accelerator consumes at the hardware table's peak and calibrated MFU (an estimate, not a measurement), so
the ratio says how many such loaders one accelerator needs.

Each loader's timed window runs from the end of its warm-up to the arrival of its last timed batch: worker start-up
and shutdown are one-off costs per loader, printed beside the rate but kept out of it (they used to fall inside
Grain's window only, which made 2-worker Grain look 0.4x torch). The torch loader keeps its workers across
epochs (``persistent_workers``), its best setting for a folder re-read several times.

Run (not a test; ~20 s with the defaults on 2 cores):

    python benchmarks/bench_loader.py                     # synthetic 256-image JPEG folder, 2 workers
    python benchmarks/bench_loader.py --root ~/imagenet --workers 8 --batches 50

Figures, with the date and machine, are in docs/benchmarks.md ("Input pipeline"). Per image, Grain's path costs
~1.15x torch's in one process (the source contract hands numpy arrays to the transform: decode to numpy, then back to
PIL for the crop), and Grain's spawned workers take ~1.8 s to start (each imports grain and JAX) against ~0.1 s for
torch's forked ones, so short-lived loaders on small hosts are better off with ``worker_count=0`` (threads).
"""

from __future__ import annotations

import argparse
import gc
import math
import random
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

RESOLUTION = 224


def make_jpeg_folder(root: Path, images: int, classes: int = 8, seed: int = 0) -> Path:
    """ImageNet-like JPEGs (~500 x 375, smooth random content, quality 90) under ``root/train/CLASS``."""
    rng = np.random.default_rng(seed)
    for i in range(images):
        folder = root / "train" / f"class{i % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        width, height = int(rng.integers(400, 520)), int(rng.integers(300, 400))
        # Low-frequency colour noise upsampled, plus fine noise: compresses like a photograph, not like flat colour.
        coarse = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
        image = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC)).astype(np.int16)
        image = np.clip(image + rng.integers(-12, 13, image.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(folder / f"img{i:05d}.jpg", quality=90)
    return root


class Rates(NamedTuple):
    """One loader's figures: steady throughput, and the one-off costs kept out of it."""

    images_per_s: float  # timed batches only, clock stopped when the last one arrives
    startup_s: float  # iterator creation to the first batch (worker start-up, first decode)
    shutdown_s: float  # closing the iterator after the last batch (joining the workers)


def bench_grain(root: Path, batch_size: int, workers: int, batches: int, warmup: int) -> Rates:
    """Figures of ``train_loader`` over the ``imagefolder`` source (``warmup`` batches excluded: start-up)."""
    from convscale_plugins.datasets import imagefolder

    from convscale_cli.data import train_loader

    source = imagefolder.open_split("train", root=str(root))
    loader = train_loader(
        source,
        global_batch_size=batch_size,
        resolution=RESOLUTION,
        seed=0,
        num_examples=batch_size * (batches + warmup + 1),  # one spare: the timed batches never end the stream
        worker_count=workers,
    )
    created = time.perf_counter()
    iterator = iter(loader)
    next(iterator)
    first = time.perf_counter()
    for _ in range(warmup - 1):
        next(iterator)
    start = time.perf_counter()
    count = sum(len(next(iterator)["id"]) for _ in range(batches))
    end = time.perf_counter()
    loader.close()
    return Rates(count / (end - start), first - created, time.perf_counter() - end)


class TorchFolder:
    """A map-style torch dataset doing the same PIL work as the Grain pipeline."""

    def __init__(self, root: Path) -> None:
        self.files = sorted((root / "train").glob("*/*.jpg"))
        classes = sorted({f.parent.name for f in self.files})
        self.labels = [classes.index(f.parent.name) for f in self.files]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        with Image.open(self.files[index]) as handle:
            image = handle.convert("RGB")
        width, height = image.size
        box = (0, 0, width, height)
        for _ in range(10):  # torchvision's RandomResizedCrop(scale=(0.08, 1), ratio=(3/4, 4/3))
            area = width * height * random.uniform(0.08, 1.0)
            aspect = math.exp(random.uniform(math.log(3 / 4), math.log(4 / 3)))
            w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < w <= width and 0 < h <= height:
                left, top = random.randint(0, width - w), random.randint(0, height - h)
                box = (left, top, left + w, top + h)
                break
        out = image.resize((RESOLUTION, RESOLUTION), Image.BILINEAR, box=box)
        if random.random() < 0.5:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        return np.asarray(out), self.labels[index]


def bench_torch(root: Path, batch_size: int, workers: int, batches: int, warmup: int) -> Rates:
    """Figures of ``torch.utils.data.DataLoader`` (shuffled, same worker count; ``warmup`` batches excluded).

    Workers persist across epochs (torch's best setting: a small folder is re-read for several epochs, as the Grain
    loader does in one stream, and re-forking at every epoch would charge torch a start-up per epoch).
    """
    import itertools

    import torch

    loader = torch.utils.data.DataLoader(
        TorchFolder(root),
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        prefetch_factor=2 if workers else None,
        persistent_workers=workers > 0,
        drop_last=True,
    )
    created = time.perf_counter()
    stream = itertools.chain.from_iterable(itertools.repeat(loader))
    next(stream)
    first = time.perf_counter()
    for _ in range(warmup - 1):
        next(stream)
    start = time.perf_counter()
    count = sum(len(next(stream)[0]) for _ in range(batches))
    end = time.perf_counter()
    del stream, loader  # shuts the (persistent) workers down
    gc.collect()
    return Rates(count / (end - start), first - created, time.perf_counter() - end)


def f0_consumption(hardware_name: str) -> tuple[float, str]:
    """Estimated NFNet-F0 training images/s on one unit of ``hardware_name`` at 224 px, and a description."""
    from convscale_cli.budget import get_hardware
    from convscale_cli.plugins import get_registry

    spec = get_registry().architecture("nfnet-f0")
    flops = spec.count(RESOLUTION, 1000).train_flops
    hardware = get_hardware(hardware_name)
    rate = hardware.peak_flops * hardware.mfu / flops
    return rate, f"{hardware.description} at MFU {hardware.mfu:.2f}, {flops / 1e9:.1f} GFLOPs/image"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, help="image folder (ROOT/train/CLASS/*.jpg); default: synthetic")
    parser.add_argument("--images", type=int, default=256, help="synthetic folder size")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=40, help="timed batches per loader")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--warmup", type=int, help="untimed batches first (default 2 x workers + 2: every worker has started)"
    )
    parser.add_argument("--hardware", default="h100", help="hardware table entry for the F0 consumption estimate")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or make_jpeg_folder(Path(tmp) / "jpegs", args.images)
        warmup = max(args.warmup if args.warmup is not None else 2 * args.workers + 2, 1)
        grain = bench_grain(root, args.batch_size, args.workers, args.batches, warmup)
        torch = bench_torch(root, args.batch_size, args.workers, args.batches, warmup)
    grain_rate, torch_rate = grain.images_per_s, torch.images_per_s
    print(f"workers={args.workers} batch={args.batch_size} resolution={RESOLUTION} timed batches={args.batches}")
    for name, rates in (("grain  imagefolder pipeline:", grain), ("torch  DataLoader + PIL:    ", torch)):
        print(
            f"{name} {rates.images_per_s:8.1f} images/s  (start-up {rates.startup_s:.2f} s, "
            f"shutdown {rates.shutdown_s:.2f} s, not timed)"
        )
    print(f"ratio grain / torch:         {grain_rate / torch_rate:8.2f}")
    try:
        f0_rate, what = f0_consumption(args.hardware)
    except Exception as exc:  # the NFNet plugin may be absent: the loader rates still stand on their own
        print(f"NFNet-F0 consumption rate unavailable ({type(exc).__name__}: {exc}); loader rates only")
        return
    print(f"NFNet-F0 training consumes:  {f0_rate:8.1f} images/s per device (estimate: {what})")
    print(
        f"ratio grain / F0:            {grain_rate / f0_rate:8.3f}  (loaders of this size per device: "
        f"{math.ceil(f0_rate / grain_rate)})"
    )


if __name__ == "__main__":
    main()
