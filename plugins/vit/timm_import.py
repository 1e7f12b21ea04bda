"""Convert a timm ``VisionTransformer`` state dict (numpy arrays) into this plugin's Flax parameters.

Accepted: the standard timm layout of ``vit_{tiny,small,base,large}_patch16_224``, ``vit_base_patch32_224`` and
``vit_{huge,giant,gigantic}_patch14_224`` (class token, learned position embedding with a class slot, pre-norm blocks
with a fused qkv projection, final norm, linear head). Anything else (layer scale, register tokens, a MAP pool, a
pre-norm stem, another family's weights) fails on the first tensor that does not fit, by name.

Weights are matched strictly, so that a wrong file never loads silently; the only freedom is the position-embedding
grid (a timm model created with another ``img_size``), which sets the ``resolution`` build option of the result.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from convscale_plugins.vit.variants import Variant, ViTConfig

from convscale_cli.errors import UnknownNameError, UsageError
from convscale_cli.weights import ImportedWeights

SOURCES = ("timm",)


def timm_shapes(config: ViTConfig, grid: int, num_classes: int | None) -> dict[str, tuple[int, ...]]:
    """The tensors of a timm ViT state dict, name -> shape, in timm's order (head omitted when num_classes is None)."""
    d, m, p = config.width, config.mlp_dim, config.patch_size
    shapes: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, d),
        "pos_embed": (1, 1 + grid * grid, d),
        "patch_embed.proj.weight": (d, 3, p, p),
        "patch_embed.proj.bias": (d,),
    }
    for i in range(config.depth):
        b = f"blocks.{i}"
        shapes.update(
            {
                f"{b}.norm1.weight": (d,),
                f"{b}.norm1.bias": (d,),
                f"{b}.attn.qkv.weight": (3 * d, d),
                f"{b}.attn.qkv.bias": (3 * d,),
                f"{b}.attn.proj.weight": (d, d),
                f"{b}.attn.proj.bias": (d,),
                f"{b}.norm2.weight": (d,),
                f"{b}.norm2.bias": (d,),
                f"{b}.mlp.fc1.weight": (m, d),
                f"{b}.mlp.fc1.bias": (m,),
                f"{b}.mlp.fc2.weight": (d, m),
                f"{b}.mlp.fc2.bias": (d,),
            }
        )
    shapes["norm.weight"] = (d,)
    shapes["norm.bias"] = (d,)
    if num_classes is not None:
        shapes["head.weight"] = (num_classes, d)
        shapes["head.bias"] = (num_classes,)
    return shapes


def _grid(variant: Variant, tensors: Mapping[str, Any]) -> int:
    """Side of the position-embedding grid stored in the file (the variant's own when it cannot be read)."""
    default = variant.train_resolution // variant.config.patch_size
    posemb = tensors.get("pos_embed")
    if posemb is None or np.ndim(posemb) != 3:
        return default
    side = math.isqrt(max(posemb.shape[1] - 1, 0))
    return side if side > 0 and side * side == posemb.shape[1] - 1 else default


def _check(variant: Variant, tensors: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]]) -> None:
    what = f"{variant.name} (timm {variant.timm_name})"
    for name, shape in expected.items():
        if name not in tensors:
            raise UsageError(f"tensor {name!r} is missing: these are not the weights of {what}")
        got = tuple(np.shape(tensors[name]))
        if got != shape:
            raise UsageError(f"tensor {name!r} has shape {got}, {what} expects {shape}")
    for name in sorted(tensors):  # sorted: the named tensor does not depend on the file's layout
        if name not in expected:
            raise UsageError(f"unexpected tensor {name!r}: these are not the weights of {what}")


def _f32(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def _dense(weight: Any, bias: Any) -> dict[str, np.ndarray]:
    return {"kernel": _f32(weight).T, "bias": _f32(bias)}


def _norm(prefix: str, tensors: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {"scale": _f32(tensors[f"{prefix}.weight"]), "bias": _f32(tensors[f"{prefix}.bias"])}


def _attention(prefix: str, config: ViTConfig, tensors: Mapping[str, Any]) -> dict[str, Any]:
    d, h, hd = config.width, config.num_heads, config.head_dim
    # timm's fused qkv output is laid out (3, heads, head_dim): split it, then put heads on their own axis.
    qkv_w = _f32(tensors[f"{prefix}.qkv.weight"]).reshape(3, d, d)
    qkv_b = _f32(tensors[f"{prefix}.qkv.bias"]).reshape(3, h, hd)
    out = {
        name: {"kernel": qkv_w[i].T.reshape(d, h, hd), "bias": qkv_b[i]}
        for i, name in enumerate(("query", "key", "value"))
    }
    out["out"] = {
        "kernel": _f32(tensors[f"{prefix}.proj.weight"]).T.reshape(h, hd, d),
        "bias": _f32(tensors[f"{prefix}.proj.bias"]),
    }
    return out


def import_weights(
    variant: Variant, source: str, tensors: Mapping[str, Any], num_classes: int | None
) -> ImportedWeights:
    """Convert a timm state dict into the params of ``variant`` (class-token pool, learned position embedding).

    Args:
        variant: the registered variant the weights are for.
        source: weight format; only "timm".
        tensors: state-dict name -> array (as ``safetensors.numpy.load_file`` returns).
        num_classes: classifier size of the result; None keeps the file's head. A size other than the file's
            starts a new zero-initialised head (the fine-tuning convention of big_vision).

    Raises:
        UnknownNameError: ``source`` is not "timm".
        UsageError: a tensor is missing, has the wrong shape or is not part of this model, named; or the file has
            no head and ``num_classes`` is None.
    """
    if source not in SOURCES:
        raise UnknownNameError("weight source", source, SOURCES)
    if num_classes is not None and num_classes <= 0:
        raise UsageError(f"num_classes must be > 0, got {num_classes}")
    config = variant.config
    grid = _grid(variant, tensors)
    head = tensors.get("head.weight")
    file_classes = int(np.shape(head)[0]) if head is not None and np.ndim(head) == 2 else None
    _check(variant, tensors, timm_shapes(config, grid, file_classes))
    classes = num_classes if num_classes is not None else file_classes
    if classes is None:
        raise UsageError(f"the {variant.timm_name} weights have no classifier head; pass the number of classes")

    d, p = config.width, config.patch_size
    posemb = _f32(tensors["pos_embed"])
    # The class slot of the position embedding is a constant added to the (constant) class token: fold it in.
    params: dict[str, Any] = {
        "embedding": {
            # (D, C, p, p) conv -> (p, p, C, D) -> dense over (row, column, channel)-flattened patches.
            "kernel": _f32(tensors["patch_embed.proj.weight"]).transpose(2, 3, 1, 0).reshape(p * p * 3, d),
            "bias": _f32(tensors["patch_embed.proj.bias"]),
        },
        "pos_embedding": posemb[:, 1:],
        "cls": _f32(tensors["cls_token"]) + posemb[:, :1],
    }
    encoder: dict[str, Any] = {}
    for i in range(config.depth):
        b = f"blocks.{i}"
        encoder[f"block{i}"] = {
            "norm1": _norm(f"{b}.norm1", tensors),
            "attn": _attention(f"{b}.attn", config, tensors),
            "norm2": _norm(f"{b}.norm2", tensors),
            "mlp": {
                "fc1": _dense(tensors[f"{b}.mlp.fc1.weight"], tensors[f"{b}.mlp.fc1.bias"]),
                "fc2": _dense(tensors[f"{b}.mlp.fc2.weight"], tensors[f"{b}.mlp.fc2.bias"]),
            },
        }
    encoder["norm"] = _norm("norm", tensors)
    params["encoder"] = encoder
    if classes == file_classes:
        params["head"] = _dense(tensors["head.weight"], tensors["head.bias"])
        head_note = "head from the file"
    else:
        params["head"] = {"kernel": np.zeros((d, classes), np.float32), "bias": np.zeros((classes,), np.float32)}
        head_note = f"new zero-initialised {classes}-way head"
    return ImportedWeights(
        params=params,
        num_classes=classes,
        options={"pool": "tok", "posemb": "learn", "resolution": grid * p},
        note=head_note,
    )
