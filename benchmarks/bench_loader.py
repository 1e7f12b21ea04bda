"""Throughput of the imagefolder JPEG training pipeline at 224 px vs PyTorch's DataLoader, and vs NFNet-F0's appetite.

Both pipelines do the same work per image with the same number of worker processes: read the file, decode the JPEG
with PIL, Inception random-resized crop to 224 x 224 (bilinear), random horizontal flip, and batch into uint8 NHWC.
The torch side writes the transforms with PIL directly (no torchvision), so the comparison is loader machinery vs
loader machinery. The F0 line converts NFNet-F0's training FLOPs per image (registry count at 224 px) into the
images/s one accelerator consumes at the hardware table's peak and calibrated MFU (an estimate, not a measurement), so
the ratio says how many such loaders one accelerator needs.

Run (not a test; ~1-2 minutes with the defaults on 2 cores):

    python benchmarks/bench_loader.py                     # synthetic 256-image JPEG folder, 2 workers
    python benchmarks/bench_loader.py --root ~/imagenet --workers 8 --batches 50

Measured (synthetic folder, batch 32, 2-core machine shared with other jobs, so +-40% run to run):

    --workers 0: grain 202 images/s, torch  75 images/s (ratio 2.7: grain's two reader threads overlap PIL decoding,
                 which releases the GIL; torch's in-process loader is single-threaded)
    --workers 2: grain 113 images/s, torch 267 images/s (ratio 0.42: Grain's spawned worker processes cost more than
                 torch's forked ones on 2 cores; per image our path is ~1.4x torch's because the source contract hands
                 numpy arrays to the transform, costing two extra full-size copies)
    NFNet-F0 at 224 px: ~6,200 images/s per H100 (estimate), i.e. ~55 such 2-worker loaders per accelerator.

On small hosts prefer ``worker_count=0`` (threads); on many-core hosts use worker processes.
"""

from __future__ import annotations

import argparse
import math
import random
import tempfile
import time
from pathlib import Path

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


def bench_grain(root: Path, batch_size: int, workers: int, batches: int, warmup: int) -> float:
    """Images/s of ``train_loader`` over the ``imagefolder`` source (``warmup`` batches excluded: start-up)."""
    from convscale_plugins.datasets import imagefolder

    from convscale_cli.data import train_loader

    source = imagefolder.open_split("train", root=str(root))
    loader = train_loader(
        source,
        global_batch_size=batch_size,
        resolution=RESOLUTION,
        seed=0,
        num_examples=batch_size * (batches + warmup),
        worker_count=workers,
    )
    iterator = iter(loader)
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    count = sum(len(batch["id"]) for batch in iterator)
    return count / (time.perf_counter() - start)


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


def bench_torch(root: Path, batch_size: int, workers: int, batches: int, warmup: int) -> float:
    """Images/s of ``torch.utils.data.DataLoader`` (shuffled, same worker count; ``warmup`` batches excluded)."""
    import torch

    loader = torch.utils.data.DataLoader(
        TorchFolder(root),
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        prefetch_factor=2 if workers else None,
        drop_last=True,
    )
    needed = batches + warmup
    count = 0
    start = 0.0
    while needed > 0:  # a small folder is re-read for several epochs, like the Grain loader does
        for images, _ in loader:
            if needed > batches:
                start = time.perf_counter()
            else:
                count += len(images)
            needed -= 1
            if needed == 0:
                break
    return count / (time.perf_counter() - start)


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
    parser.add_argument("--batches", type=int, default=12, help="timed batches per loader")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--warmup", type=int, help="untimed batches first (default 2 x workers + 1: every worker has started)"
    )
    parser.add_argument("--hardware", default="h100", help="hardware table entry for the F0 consumption estimate")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or make_jpeg_folder(Path(tmp) / "jpegs", args.images)
        warmup = args.warmup if args.warmup is not None else 2 * args.workers + 1
        grain_rate = bench_grain(root, args.batch_size, args.workers, args.batches, warmup)
        torch_rate = bench_torch(root, args.batch_size, args.workers, args.batches, warmup)
    print(f"workers={args.workers} batch={args.batch_size} resolution={RESOLUTION}")
    print(f"grain  imagefolder pipeline: {grain_rate:8.1f} images/s")
    print(f"torch  DataLoader + PIL:     {torch_rate:8.1f} images/s")
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
