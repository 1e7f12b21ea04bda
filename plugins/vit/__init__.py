"""Built-in ViT plugin: Vision Transformers (Dosovitskiy et al. 2021) at the shapes of Zhai et al. 2022 and SoViT.

Registers ``vit-{ti,s,b,l,h,g,bigg,so400m}/{16,14}``, ``vit-b/32``, the laptop ladder ``vit-tiny-l0..l5`` (32 px,
patch 4) and ``vit-test``. Pure Python: flax is imported only when a model is built, numpy only when weights are
imported.

Default options, chosen for weight compatibility with timm ``vit_*_patch16_224`` (tests/test_vit_parity.py):
class-token pooling and a learned position embedding with a class slot. Zhai et al. pre-train with a MAP head
(``pool="map"``) and big_vision also offers ``gap`` and ``posemb="sincos2d"``; all are build options. Imported
weights record the options they need (``vit-so400m/14`` imports SigLIP's MAP-pooled timm weights with ``pool="map"``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

from convscale_plugins.vit.variants import VARIANTS, Variant

from convscale_cli.data import IMAGENET, INCEPTION, Normalization
from convscale_cli.errors import UnknownNameError
from convscale_cli.hookspecs import hookimpl
from convscale_cli.recipe import Recipe
from convscale_cli.registry import ArchitectureSpec, MeasuredLr, ModelCount

# AdamW as in Dosovitskiy et al. 2021 (Table 3 and App. B.1): beta1 0.9, beta2 0.999, batch 4096, global-norm
# gradient clipping at 1. lr 1e-3 with decoupled weight decay 0.03 is their ImageNet-21k pre-training row for B/16 and
# L/16 (one value for the family; their JFT rows use 3e-4..8e-4 with 0.1). The decay is optax.adamw's (multiplied by
# the learning rate), as in their flax Adam. Warm-up + cosine is the project's schedule (they use 10k warm-up steps
# and linear decay). No decay on biases, LayerNorm scales, position embedding, class token or MAP probe.
RECIPE = Recipe(
    optimizer="adamw",
    lr=1e-3,
    base_batch_size=4096,
    momentum=0.9,
    nesterov=False,
    beta2=0.999,
    weight_decay=0.03,
    agc_clip=None,
    grad_clip_norm=1.0,
    warmup_fraction=0.05,
    loss="softmax",
    no_decay=(r"(bias|scale)$", r"(^|/)(pos_embedding|cls|probe)$"),
)

DEFAULT_OPTIONS: Mapping[str, Any] = {
    "pool": "tok",
    "posemb": "learn",
    "qkv_bias": True,
    "layernorm_eps": 1e-6,
}


def _build(variant: Variant, **kwargs: Any) -> Any:
    from convscale_plugins.vit.model import build

    kwargs.setdefault("resolution", variant.train_resolution)
    return build(variant.config, **kwargs)


def _count(variant: Variant, resolution: int, num_classes: int) -> ModelCount:
    params, macs = variant.count(resolution, num_classes)
    return ModelCount(params=params, macs=macs)


def _import_weights(variant: Variant, source: str, tensors: Mapping[str, Any], num_classes: int | None) -> Any:
    from convscale_plugins.vit.timm_import import import_weights

    return import_weights(variant, source, tensors, num_classes)


def _export_weights(
    variant: Variant, target: str, params: Mapping[str, Any], num_classes: int, options: Mapping[str, Any]
) -> Any:
    from convscale_plugins.vit.timm_import import SOURCES, export_timm

    if target not in SOURCES:
        raise UnknownNameError("export format", target, SOURCES)
    return export_timm(variant, params, num_classes, options)


# timm's ViT weights are trained on [-1, 1] inputs (its default_cfg: IMAGENET_INCEPTION_MEAN / _STD) except these
# tags, self-supervised in torch with the ImageNet statistics (timm vision_transformer.py default_cfgs: DINO, Caron et
# al. 2021; MAE, He et al. 2022).
TIMM_IMAGENET_TAGS = ("dino", "mae")


def _weights_normalization(source: str, model: str) -> Normalization | None:
    """The normalisation of the timm weights ``model`` (``architecture`` or ``architecture.tag``); None for another
    source (the family's)."""
    if source != "timm":
        return None
    tag = model.partition(".")[2]
    return IMAGENET if tag.split("_")[0] in TIMM_IMAGENET_TAGS else INCEPTION


# timm's ViT computes as big_vision's does (erf GELU, LayerNorm eps 1e-6), so both numerics are the build defaults.
NUMERICS: Mapping[str, Mapping[str, Any]] = {"reference": {"layernorm_eps": 1e-6}, "timm": {"layernorm_eps": 1e-6}}


# The laptop ladder's tuned learning rate, one to two orders of magnitude above the paper's batch-4096 setting moved
# to batch 64 (examples/convnet-vs-vit-quick.toml's header: vit-tiny-l1 for 0.5 epochs of `shapes`, alpha 0.1 ->
# loss 5.59, 0.2 -> 5.28, 0.4 -> 4.98, 0.8 -> 5.01, 1.6 -> 5.19; its cells on l0-l2 kept 0.4-0.8).
LADDER_LR = MeasuredLr(
    alpha=0.8, batch_size=64, epochs=0.5, source="examples/convnet-vs-vit-quick.toml, vit-tiny-l1 at 32 px on shapes"
)


def spec(variant: Variant) -> ArchitectureSpec:
    """The registry entry of one variant."""
    importer: Callable[..., Any] | None = None
    if variant.timm_name:
        importer = functools.partial(_import_weights, variant)
    return ArchitectureSpec(
        name=variant.name,
        family="vit",
        build=functools.partial(_build, variant),
        count=functools.partial(_count, variant),
        train_resolution=variant.train_resolution,
        eval_resolution=variant.eval_resolution,
        recipe=RECIPE,
        description=variant.description,
        tags=variant.tags,
        resolution_multiple=variant.config.patch_size,
        min_resolution=variant.config.patch_size,
        weight_sources={"timm": variant.timm_name} if variant.timm_name else {},
        import_weights=importer,
        options={**DEFAULT_OPTIONS, "resolution": variant.train_resolution},
        numerics=NUMERICS,
        export_weights=functools.partial(_export_weights, variant) if variant.timm_name else None,
        # From scratch a ViT normalises as every convscale model does (ImageNet's statistics), so runs and studies
        # compare ConvNets and ViTs on identical inputs; imported timm weights keep their own (mostly [-1, 1]).
        weights_normalization=_weights_normalization,
        measured_lr=LADDER_LR if "ladder" in variant.tags else None,
    )


@hookimpl
def register_architectures(register: Callable[[ArchitectureSpec], None]) -> None:
    """Register every ViT variant of :data:`~convscale_plugins.vit.variants.VARIANTS`."""
    for variant in VARIANTS.values():
        register(spec(variant))
