"""A third-party plugin written from docs/plugins.md alone (installed by tests/test_contract_plugin.py).

- `linear-tiny` / `linear-small` (family `linear`): a flattening linear classifier with dropout, trained with an AdamW
  recipe (no AGC), the non-NFNet path of the contract.
- `arrows`: images whose brightness rises to the right (label 0) or to the left (label 1). A horizontal flip turns one
  class into the other, so the spec turns flips (and random crops) off; a model trained on it can only beat chance if
  the pipeline honours that.

Nothing heavy is imported at module level: every convscale command imports this module.
"""

from __future__ import annotations

from typing import Any

from convscale_cli.errors import UsageError
from convscale_cli.hookspecs import hookimpl
from convscale_cli.recipe import Recipe
from convscale_cli.registry import ArchitectureSpec, DatasetInfo, DatasetSpec, ModelCount

RESOLUTION = 8
WIDTHS = {"linear-tiny": 4, "linear-small": 8}

RECIPE = Recipe(
    optimizer="adamw",
    lr=0.01,
    base_batch_size=32,
    momentum=0.9,
    nesterov=False,
    weight_decay=1e-4,
    agc_clip=None,  # AGC is for normalizer-free ConvNets; the docs say to turn it off for AdamW
    warmup_fraction=0.0,
    no_decay=(r"bias$",),
)


def build(
    *, num_classes: int, dtype: str = "float32", drop_rate: float = 0.0, stochdepth_rate: float = 0.0, width: int = 4
) -> Any:
    """Flatten -> Dense(width) -> dropout -> Dense(num_classes); stochastic depth does not apply (no residuals)."""
    import flax.linen as nn
    import jax.numpy as jnp

    if not 0.0 <= drop_rate < 1.0:
        raise UsageError(f"drop_rate must be in [0, 1), got {drop_rate}")
    if not (isinstance(width, int) and width > 0):
        raise UsageError(f"width must be a positive integer, got {width!r}")

    class Linear(nn.Module):
        @nn.compact
        def __call__(self, images: Any, *, train: bool) -> Any:
            x = images.reshape((images.shape[0], -1)).astype(dtype)
            x = nn.Dense(width, dtype=dtype)(x)
            x = nn.Dropout(drop_rate, deterministic=not train)(x)  # the "dropout" RNG stream
            return nn.Dense(num_classes, dtype=dtype)(x).astype(jnp.float32)

    return Linear()


def count(resolution: int, num_classes: int, width: int) -> ModelCount:
    """Dense layers: d_in x d_out MACs; parameters are their kernels and biases."""
    inputs = resolution * resolution * 3
    return ModelCount(
        params=inputs * width + width + width * num_classes + num_classes, macs=inputs * width + width * num_classes
    )


def _spec(name: str, width: int) -> ArchitectureSpec:
    return ArchitectureSpec(
        name=name,
        family="linear",
        build=lambda width=width, **kwargs: build(width=width, **kwargs),
        count=lambda resolution, num_classes: count(resolution, num_classes, width),
        train_resolution=RESOLUTION,
        eval_resolution=RESOLUTION,
        recipe=RECIPE,
        description=f"flattening linear classifier, {width} hidden units (contract test plugin)",
        tags=("tiny",),
        min_resolution=RESOLUTION,
        resolution_multiple=RESOLUTION,  # the flattened input size fixes the resolution
        default_num_classes=2,
        options={"width": width},
    )


@hookimpl
def register_architectures(register: Any) -> None:
    for name, width in WIDTHS.items():
        register(_spec(name, width))


class ArrowSource:
    """Random-access, deterministic and picklable (plain numbers only): what `--workers` needs."""

    def __init__(self, split: str, size: int) -> None:
        self.offset = 0 if split == "train" else 10**6  # ids unique across the splits
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        import numpy as np

        rng = np.random.default_rng(self.offset + index)
        label = int(rng.integers(2))
        ramp = np.linspace(40.0, 215.0, RESOLUTION)
        row = ramp if label == 0 else ramp[::-1]
        image = np.tile(row[None, :, None], (RESOLUTION, 1, 3)) + rng.normal(0.0, 20.0, (RESOLUTION, RESOLUTION, 3))
        return {"image": np.clip(image, 0, 255).astype(np.uint8), "label": label, "id": self.offset + index}


EVAL_SIZE = 128


def _size(size: Any) -> int:
    """The `size` option, validated as the docs ask (it may arrive as an int or a string)."""
    try:
        value = int(size)
    except (TypeError, ValueError):
        value = 0
    if value <= 0 or str(value) != str(size).strip():
        raise UsageError(f"arrows data option size must be a positive integer, got {size!r}")
    return value


def info(size: Any = 512) -> DatasetInfo:
    return DatasetInfo(num_classes=2, split_sizes={"train": _size(size), "eval": EVAL_SIZE}, resolution=RESOLUTION)


def open_split(split: str, size: Any = 512) -> ArrowSource:
    if split not in ("train", "eval"):
        raise UsageError(f"arrows has splits 'train' and 'eval', not {split!r}")
    return ArrowSource(split, _size(size) if split == "train" else EVAL_SIZE)


@hookimpl
def register_datasets(register: Any) -> None:
    register(
        DatasetSpec(
            name="arrows",
            description="brightness rising to the right or to the left: must not be flipped (contract test plugin)",
            open=open_split,
            info=info,
            options={"size": 512},
            static_info=info(),
            augment={"flip": False, "crop": "resize"},  # a flip swaps the classes; a crop is not needed
            eval_crop=1.0,
        )
    )
