"""Built-in NFNet plugin (Brock et al. 2021, arXiv 2102.06171; DeepMind reference deepmind-research/nfnets).

Registers, through the same ``register_architectures`` hook a third-party plugin uses:

* ``nfnet-f0`` .. ``nfnet-f7`` and the wider ``nfnet-f0+`` .. ``nfnet-f7+`` (tag ``paper``), whose analytic counts
  reproduce the NFNet paper's Table 3 and docs/paper-notes.md; F0-F6 import timm ``dm_nfnet_fN`` state dicts.
* the laptop ladder ``nfnet-tiny-l0`` .. ``nfnet-tiny-l6`` (tag ``ladder``): the same block structure at 1/16 .. 1/2
  width and F0/F1-style depths, trained and evaluated at 32 px, spanning 120x in MACs;
* the width-only ladder ``nfnet-w64``, ``nfnet-w32``, ``nfnet-w16``, ``nfnet-w8``, ``nfnet-w4``, ``nfnet-w2`` (tags
  ``ladder`` and ``width``): 1/64 .. 1/2 width at one depth (1, 2, 2, 1), ~4x non-head parameters per rung (8.5k,
  31k, 118k, 466k, 1.85M, 7.37M), so size is one clean axis (at 32 px with 70 classes: 0.14M, 0.23M, 0.59M, 2.05M,
  7.98M, 31.8M MACs);
* ``nfnet-test`` (tag ``tiny``) for unit tests.

Laptop ladder at 32 px, 10 classes: analytic MACs per image, and one jitted train step (forward + backward +
Nesterov SGD, float32, batch 64) measured with ``python -m convscale_plugins.nfnet.ladder_timing`` on the idle 2-core
AMD EPYC CI VM (2026-11-23, after the CPU matmul rewrites of ``model.py``). CPU ms count all threads of the process
and do not grow with competing load; wall ms do.

==============  =====  ========  ======  ========  ==========
model           width  depths    MACs    CPU ms    wall ms
==============  =====  ========  ======  ========  ==========
nfnet-tiny-l0   1/16   1,1,1,1   0.45M   25        16
nfnet-tiny-l1   1/16   1,2,6,3   0.92M   45        29
nfnet-tiny-l2   1/8    1,2,2,1   2.02M   42        27
nfnet-tiny-l3   1/8    2,4,12,6  6.28M   147       93
nfnet-tiny-l4   1/4    1,2,6,3   13.5M   177       102
nfnet-tiny-l5   1/4    2,4,12,6  24.9M   373       226
nfnet-tiny-l6   1/2    1,2,6,3   53.8M   511       282
==============  =====  ========  ======  ========  ==========

The three smallest rungs train at 1,400-2,600 images per CPU-second, so a 3 rungs x 3 epoch budgets study over
16k images is minutes of compute (plus XLA compilation, 10-60 s per model here). On CPU the grouped 3x3 convs run
per group (see ``model.grouped_conv``): XLA's native grouped convolution made the same steps 2.5-5x slower.

This module stays importable without jax: the model lives in ``model.py`` (imported by ``build``), the counts in
``variants.py`` and the timm conversion in ``timm_import.py`` (numpy only).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from convscale_plugins.nfnet.variants import VARIANTS, NFNetConfig, Variant, bottleneck

from convscale_cli.errors import UnknownNameError, UsageError
from convscale_cli.hookspecs import hookimpl
from convscale_cli.recipe import Recipe
from convscale_cli.registry import ArchitectureSpec, MeasuredLr, ModelCount

__all__ = ["NUMERICS", "RECIPE", "VARIANTS", "build", "count", "options", "register_architectures", "spec"]

# The NFNet 2021 JFT pre-training recipe that 2310.16764 says it reused (Brock et al. 2021 A.1, A.5): SGD + Nesterov
# 0.9, peak lr 0.1 x B/256 = 1.6 at batch 4096, AGC lambda 0.01 (eps 1e-3) on everything but the classifier weight, L2
# weight decay 1e-6 except on WS gains, biases and skip gains, softmax cross-entropy (the JFT loss is not stated).
RECIPE = Recipe(
    optimizer="sgd",
    lr=1.6,
    base_batch_size=4096,
    momentum=0.9,
    nesterov=True,
    weight_decay=1e-6,
    agc_clip=0.01,
    agc_eps=1e-3,
    loss="softmax",
    label_smoothing=0.0,
    # Anchored so they select the same parameters under re.search and re.fullmatch.
    no_decay=(r"^(.*/)?(gain|bias|skip_gain)$",),
    agc_exclude=(r"^(.*/)?fc/kernel$",),  # the final classifier only: not the SE layers' se/fc0, se/fc1
)

_PLUS_STAGE1_MID = 128  # the code's rounding of the 192-wide "+" stage-1 bottleneck; 192 gives the paper's F4+
# The widest stage of any published NFNet has 1536 output channels (F0-F7); a stage-1 bottleneck past this many
# channels is a typo, and its parameters would not fit an accelerator.
_MAX_STAGE1_MID = 8192


def options(variant: Variant) -> dict[str, Any]:
    """Build overrides a variant accepts, with their defaults (shown by ``convscale models --json``)."""
    opts: dict[str, Any] = {
        "activation": "gelu",
        "se_activation": "relu",
        "stochdepth_rate": 0.0,
        "drop_rate": variant.config.drop_rate,
        "ws_eps": 1e-4,
        "ws_eps_style": "dm",
    }
    if variant.plus:
        opts["plus_stage1_mid"] = _PLUS_STAGE1_MID
    return opts


def _config(variant: Variant, plus_stage1_mid: int | None) -> NFNetConfig:
    import dataclasses

    if plus_stage1_mid is None or plus_stage1_mid == _PLUS_STAGE1_MID:
        return variant.config
    if not isinstance(plus_stage1_mid, int) or isinstance(plus_stage1_mid, bool) or plus_stage1_mid < 1:
        raise UsageError(f"plus_stage1_mid must be a positive integer, got {plus_stage1_mid!r}")
    if plus_stage1_mid > _MAX_STAGE1_MID:
        raise UsageError(f"plus_stage1_mid={plus_stage1_mid} is over the limit of {_MAX_STAGE1_MID} channels")
    try:
        config = dataclasses.replace(variant.config, stage1_mid=plus_stage1_mid)
        bottleneck(config, 0)  # the groups must divide it; found here rather than when the model is traced
    except ValueError as exc:
        raise UsageError(f"plus_stage1_mid={plus_stage1_mid}: {exc}") from None
    return config


def build(variant: Variant | str, num_classes: int | None = None, dtype: Any = "float32", **overrides: Any) -> Any:
    """The Flax ``NFNet`` module of a variant; ``overrides`` are the keys of :func:`options`.

    Raises:
        UsageError: an unknown option or an out-of-range value, naming the valid choices.
    """
    if isinstance(variant, str):
        if variant not in VARIANTS:
            raise UnknownNameError("model", variant, VARIANTS)
        variant = VARIANTS[variant]
    valid = options(variant)
    for key in overrides:
        if key not in valid:
            raise UnknownNameError(f"{variant.name} option", key, valid)
    opts = {**valid, **{k: v for k, v in overrides.items() if v is not None}}

    import jax.numpy as jnp
    from convscale_plugins.nfnet.model import ACTIVATIONS, WS_EPS_STYLES, NFNet

    for key, choices in (("activation", ACTIVATIONS), ("se_activation", ACTIVATIONS), ("ws_eps_style", WS_EPS_STYLES)):
        if opts[key] not in choices:
            raise UnknownNameError(key, str(opts[key]), choices)
    for key in ("stochdepth_rate", "drop_rate"):
        if not 0.0 <= float(opts[key]) < 1.0:
            raise UsageError(f"{key} must be in [0, 1), got {opts[key]}")
    if float(opts["ws_eps"]) <= 0:
        raise UsageError(f"ws_eps must be > 0, got {opts['ws_eps']}")
    num_classes = 1000 if num_classes is None else int(num_classes)
    if num_classes < 1:
        raise UsageError(f"num_classes must be >= 1, got {num_classes}")
    try:
        dtype = jnp.dtype(dtype or "float32")
    except TypeError:
        raise UsageError(f"unknown dtype {dtype!r}: use float32 or bfloat16") from None
    return NFNet(
        config=_config(variant, opts.get("plus_stage1_mid")),
        num_classes=num_classes,
        activation=opts["activation"],
        se_activation=opts["se_activation"],
        stochdepth_rate=float(opts["stochdepth_rate"]),
        drop_rate=float(opts["drop_rate"]),
        ws_eps=float(opts["ws_eps"]),
        ws_eps_style=opts["ws_eps_style"],
        dtype=dtype,
    )


def count(variant: Variant | str, resolution: int, num_classes: int) -> ModelCount:
    """Analytic parameters and forward MACs per image (pure Python)."""
    if isinstance(variant, str):
        variant = VARIANTS[variant]
    params, macs = variant.count(resolution, num_classes)
    return ModelCount(params=params, macs=macs)


def _import_weights(variant: Variant, source: str, tensors: Mapping[str, Any], num_classes: int | None) -> Any:
    if source != "timm":
        raise UnknownNameError("weight source", source, ["timm"])
    from convscale_plugins.nfnet.timm_import import import_timm

    return import_timm(variant, tensors, num_classes)


# How the model computes. "reference" is DeepMind's code (deepmind-research/nfnets: jax.nn.gelu, the tanh form, and
# Scaled WS with rsqrt(max(var * fan_in, 1e-4))); "timm" is timm's port (erf GELU, rsqrt((var + 1e-5) * fan_in)),
# whose logits differ by ~1e-3 relative for the same weights.
NUMERICS = {
    "reference": {"activation": "gelu", "ws_eps": 1e-4, "ws_eps_style": "dm"},
    "timm": {"activation": "gelu_exact", "ws_eps": 1e-5, "ws_eps_style": "timm"},
}


def _export_weights(
    variant: Variant, target: str, params: Mapping[str, Any], num_classes: int, options: Mapping[str, Any]
) -> Any:
    if target != "timm":
        raise UnknownNameError("export format", target, ["timm"])
    from convscale_plugins.nfnet.timm_import import export_timm

    return export_timm(variant, params, num_classes, options)


# The laptop ladders' tuned learning rate: at batch 64 and 32 px the paper's JFT optimum barely moves the weights
# (examples/quickstart.toml's header: nfnet-tiny-l1 for 0.5 epochs of `shapes`, alpha 1.6 -> loss 6.04 (chance),
# 25.6 -> 5.44, 51.2 -> 5.15, 102.4 -> 5.15; its cells on l0-l2 kept 25.6-51.2).
LADDER_LR = MeasuredLr(
    alpha=51.2, batch_size=64, epochs=0.5, source="examples/quickstart.toml, nfnet-tiny-l1 at 32 px on shapes"
)


def spec(variant: Variant) -> ArchitectureSpec:
    """The registry entry of one variant."""
    return ArchitectureSpec(
        name=variant.name,
        family="nfnet",
        build=functools.partial(build, variant),
        count=functools.partial(count, variant),
        train_resolution=variant.train_resolution,
        eval_resolution=variant.eval_resolution,
        recipe=RECIPE,
        description=variant.description,
        tags=variant.tags,
        resolution_multiple=1,  # SAME padding accepts any size; multiples of 32 keep every stage's map whole
        min_resolution=32,
        default_num_classes=1000,
        weight_sources={"timm": variant.timm_name} if variant.timm_name else {},
        import_weights=functools.partial(_import_weights, variant) if variant.timm_name else None,
        options=options(variant),
        numerics=NUMERICS,
        export_weights=functools.partial(_export_weights, variant) if variant.timm_name else None,
        measured_lr=LADDER_LR if "ladder" in variant.tags else None,
    )


@hookimpl
def register_architectures(register: Any) -> None:
    """Register every NFNet variant of :data:`VARIANTS`."""
    for variant in VARIANTS.values():
        register(spec(variant))
