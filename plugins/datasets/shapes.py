"""``shapes``: a procedural image-classification dataset standing in for JFT-4B in laptop-scale studies.

The paper's scaling results (Smith et al. 2023, §2, Fig. 2) need a pre-training set so large that models rarely see an
image twice and whose held-out loss keeps falling as compute grows. ``shapes`` provides that on a laptop: millions of
images rendered on the fly from ``(seed, split, index)``, 420 classes built compositionally

    10 shapes x 7 colours x 3 textures (solid, stripes, checker) x 2 layouts (single, pair)

with nuisance factors a model must learn to ignore (background gradients, 0-4 distractor objects of other classes
drawn behind or in front, occluding bars, rotation, scale, hue jitter that makes neighbouring colours overlap,
illumination and sensor noise). Coarse factors (colour, layout) are learned quickly and fine ones (pentagon vs hexagon
under noise at 32 px) slowly, so the held-out loss of a tiny model ladder keeps improving over several decades of
compute (see ``examples/shapes_difficulty.py``).

The eval split renders with a different RNG key, so it never shares an image with the train split. In multi-label mode
the label is a multi-hot vector over every object present (main class plus each distractor's class with the
``single`` layout), like JFT's multiple labels per image.

Options (``--data-option KEY=VALUE``; defaults in ``DEFAULTS``):

- ``size``, ``eval_size``: images in the train and eval splits.
- ``resolution``: image side in pixels (>= 8).
- ``seed``: dataset seed; a different seed is a different dataset.
- ``multi_label``: multi-hot labels over every object present.
- ``clutter``: 0 (clean) to 3; scales distractors, occlusion and noise.
- ``classes``: the label space, one of 420 (shape x colour x texture x layout), 210 (shape x colour x texture),
  70 (shape x colour) or 10 (shape). The images do not change with it: the coarser label is the 420-class label with
  the dropped factors merged, so they become nuisance factors. Fewer classes let a tiny model leave the early
  transient in the few hundred steps a CPU study affords (chance is ln K nats).

A split small enough (``CACHE_BYTES``) is kept in memory as it is read: each image is rendered once per process and
later epochs, evaluations and runs in the same process read it back. Cached and freshly rendered images are the same
bytes, so caching never changes a result.

Augmentation note: the class does not change under horizontal flips, and the main object sits in the central 65% of
the image, but the inception crop's default minimum area (8%) can crop it away at 32 px, so runs on ``shapes``
default to ``min_area`` 0.35 (``DatasetSpec.augment``; a run's ``augment`` settings override it).
"""

from __future__ import annotations

from typing import Any

from convscale_cli.errors import DataError, UsageError
from convscale_cli.hookspecs import hookimpl
from convscale_cli.registry import DatasetInfo, DatasetSpec

NAME = "shapes"
NUM_CLASSES = 420  # checked against the renderer's factor tables in the tests
DEFAULTS: dict[str, Any] = {
    # 2M train images: a 32 px laptop study (<= ~10^15 FLOPs) never sees an image more than a few times.
    "size": 2_000_000,
    "eval_size": 10_000,
    "resolution": 32,
    "seed": 0,
    "multi_label": False,
    "clutter": 1.0,
    "classes": 420,  # label space: 420, 210, 70 or 10 (see the module docstring)
}
# Divisor of the 420-class label for each coarser label space. The renderer's class index varies layout fastest, then
# texture, then colour (``shapes_render.class_index``), so merging the fastest factors is one integer division.
CLASS_DIVISORS = {420: 1, 210: 2, 70: 6, 10: 42}
# Splits up to this many image bytes per process are kept in memory (a 32 px image is 3 KiB: ~87k images).
CACHE_BYTES = 256 << 20
SPLITS = ("train", "eval")


class _RenderCache:
    """Rendered images of one split, filled as indices are first read (memory is committed only for those)."""

    def __init__(self, size: int, resolution: int) -> None:
        import numpy as np

        self.images = np.zeros((size, resolution, resolution, 3), np.uint8)
        self.present: list[list[int] | None] = [None] * size  # None: not rendered yet


# One cache per (seed, split, size, resolution, clutter) and process: the runs of a sweep share it, and a Grain worker
# process builds its own (the cache is never pickled with the source).
_CACHES: dict[tuple, _RenderCache] = {}


def clear_cache() -> None:
    """Drop every split this process has rendered (frees its memory; the next read renders again)."""
    _CACHES.clear()


def _cache_for(key: tuple, size: int, resolution: int) -> _RenderCache | None:
    nbytes = size * resolution * resolution * 3
    if nbytes > CACHE_BYTES:
        return None
    if key not in _CACHES:
        # Bounded per process: the oldest splits make way (a study opens the same two splits for every run).
        while _CACHES and nbytes + sum(c.images.nbytes for c in _CACHES.values()) > CACHE_BYTES:
            del _CACHES[next(iter(_CACHES))]
        _CACHES[key] = _RenderCache(size, resolution)
    return _CACHES[key]


class ShapesSource:
    """Random-access source of one split; picklable (holds only its options), so Grain workers can render."""

    def __init__(
        self,
        split: str,
        *,
        size: int,
        resolution: int,
        seed: int,
        multi_label: bool,
        clutter: float,
        classes: int = NUM_CLASSES,
    ) -> None:
        self.split = split
        self.size = size
        self.resolution = resolution
        self.seed = seed
        self.multi_label = multi_label
        self.clutter = clutter
        self.classes = classes
        self._split_key = SPLITS.index(split)

    def __len__(self) -> int:
        return self.size

    def _render(self, index: int) -> tuple[Any, list[int]]:
        """``(image, present)``: the image and the 420-class labels of its objects (main object first)."""
        from convscale_plugins.datasets.shapes_render import render

        key = (self.seed, self._split_key, self.size, self.resolution, self.clutter)
        cache = _cache_for(key, self.size, self.resolution)
        if cache is not None and cache.present[index] is not None:
            return cache.images[index].copy(), cache.present[index]
        image, _, present = render(self.seed, self._split_key, index, self.resolution, self.clutter)
        if cache is not None:
            cache.images[index] = image
            cache.present[index] = present  # set last: a reader on another thread sees a finished image
        return image, present

    def __getitem__(self, index: int) -> dict[str, Any]:
        import numpy as np

        index = int(index)
        if not 0 <= index < self.size:
            raise IndexError(f"shapes {self.split} index {index} out of range [0, {self.size})")
        image, present = self._render(index)
        divisor = CLASS_DIVISORS[self.classes]
        if self.multi_label:
            hot = np.zeros(self.classes, np.float32)
            hot[[label // divisor for label in present]] = 1.0
            return {"image": image, "label": hot, "id": index}
        return {"image": image, "label": present[0] // divisor, "id": index}

    def __repr__(self) -> str:
        return (
            f"ShapesSource(split={self.split!r}, size={self.size}, resolution={self.resolution}, seed={self.seed}, "
            f"classes={self.classes})"
        )


def _options(options: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise UsageError(f"unknown shapes option {unknown[0]!r}: choose from {', '.join(DEFAULTS)}")
    resolved = {**DEFAULTS, **options}
    for key in ("size", "eval_size", "resolution"):
        value = resolved[key]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise DataError(f"shapes option {key}={value!r} must be a positive integer")
    if resolved["resolution"] < 8:
        raise DataError(f"shapes option resolution={resolved['resolution']} is too small (minimum 8 pixels)")
    if not 0.0 <= float(resolved["clutter"]) <= 3.0:
        raise DataError(f"shapes option clutter={resolved['clutter']!r} must be in [0, 3]")
    classes = resolved["classes"]
    if isinstance(classes, bool) or classes not in CLASS_DIVISORS:
        choices = ", ".join(map(str, CLASS_DIVISORS))
        raise DataError(f"shapes option classes={classes!r} is not a label space: choose from {choices}")
    resolved["classes"] = int(classes)
    return resolved


def open_split(split: str, **options: Any) -> ShapesSource:
    """Open the ``train`` or ``eval`` split as a random-access source."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} of dataset shapes: choose from {', '.join(SPLITS)}")
    o = _options(options)
    return ShapesSource(
        split,
        size=o["size"] if split == "train" else o["eval_size"],
        resolution=o["resolution"],
        seed=int(o["seed"]),
        multi_label=bool(o["multi_label"]),
        clutter=float(o["clutter"]),
        classes=o["classes"],
    )


def info(**options: Any) -> DatasetInfo:
    """Classes, split sizes and resolution for the given options."""
    o = _options(options)
    return DatasetInfo(
        num_classes=o["classes"],
        split_sizes={"train": o["size"], "eval": o["eval_size"]},
        resolution=o["resolution"],
        multi_label=bool(o["multi_label"]),
    )


@hookimpl
def register_datasets(register) -> None:  # noqa: ANN001 (pluggy passes the registry callback)
    """Register ``shapes``."""
    register(
        DatasetSpec(
            name=NAME,
            description="Procedural shapes x colours x textures x layouts (420 classes; or 210, 70, 10), JFT stand-in",
            open=open_split,
            info=info,
            options=dict(DEFAULTS),
            static_info=info(),
            augment={"min_area": 0.35},
        )
    )
