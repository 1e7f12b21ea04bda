"""Example convscale plugin: a CIFAR-style ResNet (He et al. 2016) and a procedural two-class 'bars' dataset.

The module is imported by every `convscale` command, so it imports nothing heavy: flax and numpy are imported inside
the callables that need them.
"""

from __future__ import annotations

from typing import Any

from convscale_cli.hookspecs import hookimpl
from convscale_cli.recipe import Recipe
from convscale_cli.registry import ArchitectureSpec, DatasetInfo, DatasetSpec, ModelCount

__version__ = "0.1.0"

# (blocks per stage, widths): a ResNet-8 at CIFAR widths, 3 stages of basic blocks.
DEPTHS = (1, 1, 1)
WIDTHS = (16, 32, 64)


def _count(resolution: int, num_classes: int) -> ModelCount:
    """Parameters and forward MACs of the network built by `_build` (3x3 convs with SAME padding)."""
    params = macs = 0
    size, cin = resolution, 3

    def conv(k: int, ci: int, co: int, out_size: int) -> None:
        nonlocal params, macs
        params += k * k * ci * co + co  # kernel + bias
        macs += k * k * ci * co * out_size * out_size

    conv(3, cin, WIDTHS[0], size)
    cin = WIDTHS[0]
    for stage, (depth, width) in enumerate(zip(DEPTHS, WIDTHS, strict=True)):
        for block in range(depth):
            stride = 2 if stage > 0 and block == 0 else 1
            out = -(-size // stride)
            conv(3, cin, width, out)
            conv(3, width, width, out)
            if stride != 1 or cin != width:
                conv(1, cin, width, out)
            size, cin = out, width
    params += cin * num_classes + num_classes
    macs += cin * num_classes
    return ModelCount(params=params, macs=macs)


def _build(*, num_classes: int, dtype: str = "float32", stochdepth_rate: float = 0.0, drop_rate: float = 0.0) -> Any:
    import flax.linen as nn
    import jax.numpy as jnp

    class Block(nn.Module):
        width: int
        stride: int

        @nn.compact
        def __call__(self, x: Any) -> Any:
            y = nn.relu(nn.Conv(self.width, (3, 3), strides=self.stride, padding="SAME", dtype=dtype)(x))
            y = nn.Conv(self.width, (3, 3), padding="SAME", dtype=dtype)(y)
            if self.stride != 1 or x.shape[-1] != self.width:
                x = nn.Conv(self.width, (1, 1), strides=self.stride, dtype=dtype)(x)
            return nn.relu(x + y)

    class ResNet(nn.Module):
        @nn.compact
        def __call__(self, x: Any, *, train: bool = False) -> Any:
            x = nn.relu(nn.Conv(WIDTHS[0], (3, 3), padding="SAME", dtype=dtype)(x))
            for stage, (depth, width) in enumerate(zip(DEPTHS, WIDTHS, strict=True)):
                for block in range(depth):
                    x = Block(width, 2 if stage > 0 and block == 0 else 1)(x)
            x = jnp.mean(x, axis=(1, 2))
            x = nn.Dropout(drop_rate, deterministic=not train)(x)
            return nn.Dense(num_classes, dtype=dtype)(x).astype(jnp.float32)

    return ResNet()


@hookimpl
def register_architectures(register: Any) -> None:
    register(
        ArchitectureSpec(
            name="resnet-mini",
            family="resnet",
            build=_build,
            count=_count,
            train_resolution=32,
            eval_resolution=32,
            recipe=Recipe(optimizer="sgd", lr=0.8, agc_clip=None, weight_decay=5e-5),
            description="ResNet-8 (CIFAR widths 16/32/64) from the example third-party plugin",
            tags=("example",),
        )
    )


class _Bars:
    """Horizontal (label 0) or vertical (label 1) bars with noise, deterministic from the index."""

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


@hookimpl
def register_datasets(register: Any) -> None:
    register(
        DatasetSpec(
            name="bars",
            description="horizontal vs vertical noisy bars (example third-party plugin)",
            open=lambda split, resolution=32: _Bars(split, resolution, _SIZES[split]),
            info=lambda resolution=32: DatasetInfo(num_classes=2, split_sizes=_SIZES, resolution=resolution),
            options={"resolution": 32},
            static_info=DatasetInfo(num_classes=2, split_sizes=_SIZES, resolution=32),
        )
    )
