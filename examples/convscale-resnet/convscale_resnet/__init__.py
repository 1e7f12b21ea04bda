"""Example convscale plugin: a CIFAR-style ResNet (He et al. 2016) and a procedural two-class 'bars' dataset.

Written against docs/plugins.md, and using each part of it: a `build` taking every documented keyword argument plus an
option of its own (`width`), stochastic depth and dropout drawn from the "dropout" RNG stream, an analytic `count`,
a recipe that is not the NFNet default (SGD without AGC), a data option validated with a one-line `UsageError`, a
picklable source for `--workers`, and augmentation defaults chosen for the data.

The module is imported by every `convscale` command, so it imports nothing heavy: flax and numpy are imported inside
the callables that need them.
"""

from __future__ import annotations

import functools
from typing import Any

from convscale_cli.errors import UsageError
from convscale_cli.hookspecs import hookimpl
from convscale_cli.recipe import Recipe
from convscale_cli.registry import ArchitectureSpec, DatasetInfo, DatasetSpec, ModelCount

__version__ = "0.1.0"

# (blocks per stage, widths): a ResNet-8 at CIFAR widths, 3 stages of basic blocks.
DEPTHS = (1, 1, 1)
WIDTHS = (16, 32, 64)


def _widths(width: Any) -> tuple[int, ...]:
    """The stage widths for the `width` option (a multiplier of the CIFAR widths), validated."""
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise UsageError(f"resnet option width must be a positive integer multiplier, got {width!r}")
    return tuple(w * width for w in WIDTHS)


def _count(resolution: int, num_classes: int, width: int = 1) -> ModelCount:
    """Parameters and forward MACs of the network built by `_build` (3x3 convs with SAME padding).

    A convolution costs k * k * c_in * c_out MACs per output pixel, every tap counted (docs/plugins.md); the residual
    additions, ReLUs and the pooling are elementwise and not counted.
    """
    widths = _widths(width)
    params = macs = 0
    size, cin = resolution, 3

    def conv(k: int, ci: int, co: int, out_size: int) -> None:
        nonlocal params, macs
        params += k * k * ci * co + co  # kernel + bias
        macs += k * k * ci * co * out_size * out_size

    conv(3, cin, widths[0], size)
    cin = widths[0]
    for stage, (depth, stage_width) in enumerate(zip(DEPTHS, widths, strict=True)):
        for block in range(depth):
            stride = 2 if stage > 0 and block == 0 else 1
            out = -(-size // stride)
            conv(3, cin, stage_width, out)
            conv(3, stage_width, stage_width, out)
            if stride != 1 or cin != stage_width:
                conv(1, cin, stage_width, out)
            size, cin = out, stage_width
    params += cin * num_classes + num_classes
    macs += cin * num_classes
    return ModelCount(params=params, macs=macs)


def _build(
    *, num_classes: int, dtype: str = "float32", stochdepth_rate: float = 0.0, drop_rate: float = 0.0, width: int = 1
) -> Any:
    """The flax module; called with keyword arguments only, exactly as docs/plugins.md lists them.

    ``dtype`` arrives as a string ("bfloat16" or "float32") and is the activations' dtype (parameters stay float32);
    ``stochdepth_rate`` and ``drop_rate`` are 0 in pre-training and 0.1 / 0.25 by default in fine-tuning.
    """
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    widths = _widths(width)
    for name, rate in (("stochdepth_rate", stochdepth_rate), ("drop_rate", drop_rate)):
        if not 0.0 <= rate < 1.0:
            raise UsageError(f"{name} must be in [0, 1), got {rate}")

    class Block(nn.Module):
        width: int
        stride: int

        @nn.compact
        def __call__(self, x: Any, train: bool) -> Any:
            y = nn.relu(nn.Conv(self.width, (3, 3), strides=self.stride, padding="SAME", dtype=dtype)(x))
            y = nn.Conv(self.width, (3, 3), padding="SAME", dtype=dtype)(y)
            if train and stochdepth_rate > 0:
                # Stochastic depth (Huang et al. 2016): drop the residual branch per example, from the "dropout"
                # stream, the only RNG stream convscale provides when training.
                keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - stochdepth_rate, (y.shape[0], 1, 1, 1))
                y = jnp.where(keep, y / (1.0 - stochdepth_rate), 0).astype(y.dtype)
            if self.stride != 1 or x.shape[-1] != self.width:
                x = nn.Conv(self.width, (1, 1), strides=self.stride, dtype=dtype)(x)
            return nn.relu(x + y)

    class ResNet(nn.Module):
        @nn.compact
        def __call__(self, x: Any, *, train: bool = False) -> Any:
            x = nn.relu(nn.Conv(widths[0], (3, 3), padding="SAME", dtype=dtype)(x))
            for stage, (depth, stage_width) in enumerate(zip(DEPTHS, widths, strict=True)):
                for block in range(depth):
                    x = Block(stage_width, 2 if stage > 0 and block == 0 else 1)(x, train)
            x = jnp.mean(x, axis=(1, 2))
            x = nn.Dropout(drop_rate, deterministic=not train)(x)  # also the "dropout" stream
            # The classifier's output size is num_classes: that is how fine-tuning finds the head to replace.
            return nn.Dense(num_classes, dtype=dtype)(x).astype(jnp.float32)

    return ResNet()


@hookimpl
def register_architectures(register: Any) -> None:
    for name, width in (("resnet-mini", 1), ("resnet-mini-x2", 2)):
        register(
            ArchitectureSpec(
                name=name,
                family="resnet",
                build=functools.partial(_build, width=width),
                count=functools.partial(_count, width=width),
                train_resolution=32,
                eval_resolution=32,
                # Not the NFNet default: plain SGD + Nesterov without AGC (the ResNet has no normalizer-free scaling
                # for AGC to assume). lr is alpha at base_batch_size 256, scaled linearly with the run's batch.
                recipe=Recipe(
                    optimizer="sgd", lr=0.1, base_batch_size=256, agc_clip=None, weight_decay=5e-5, no_decay=(r"bias$",)
                ),
                description=f"ResNet-8 (CIFAR widths x{width}) from the example third-party plugin",
                tags=("example",),
                min_resolution=8,
                default_num_classes=10,
                options={"width": width},
            )
        )


class _Bars:
    """Horizontal (label 0) or vertical (label 1) bars with noise, deterministic from the index.

    A top-level class holding plain numbers, so it pickles: `--workers N` sends it to N worker processes.
    """

    def __init__(self, split: str, resolution: int, size: int) -> None:
        self.offset = 0 if split == "train" else 10**6
        self.resolution, self.size = resolution, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        import numpy as np

        rng = np.random.default_rng(self.offset + index)
        label = int(rng.integers(2))
        r = self.resolution
        period = int(rng.integers(2, max(3, r // 4)))
        stripes = ((np.arange(r) // period) % 2).astype(np.float32)
        image = np.tile(stripes[:, None], (1, r)) if label == 0 else np.tile(stripes[None, :], (r, 1))
        image = np.clip(image[..., None] * 200 + rng.normal(0, 40, (r, r, 3)), 0, 255).astype(np.uint8)
        return {"image": image, "label": label, "id": self.offset + index}


_SIZES = {"train": 4096, "eval": 512}


def _resolution(resolution: Any) -> int:
    """The `resolution` data option, validated: it arrives as TOML parsed it (`--data-option resolution=64`: an int)."""
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 8:
        raise UsageError(f"bars data option resolution must be an integer >= 8, got {resolution!r}")
    return resolution


def _info(resolution: Any = 32) -> DatasetInfo:
    return DatasetInfo(num_classes=2, split_sizes=_SIZES, resolution=_resolution(resolution))


def _open(split: str, resolution: Any = 32) -> _Bars:
    return _Bars(split, _resolution(resolution), _SIZES[split])  # splits: "train" and "eval"


@hookimpl
def register_datasets(register: Any) -> None:
    register(
        DatasetSpec(
            name="bars",
            description="horizontal vs vertical noisy bars (example third-party plugin)",
            open=_open,
            info=_info,
            options={"resolution": 32},
            static_info=_info(),
            # A horizontal flip keeps both classes (the default flip stays on), but a small random crop can show a
            # single stripe, which is neither class: crops cover at least half the image. The bars fill the frame, so
            # evaluation keeps the whole image.
            augment={"min_area": 0.5},
            eval_crop=1.0,
        )
    )
