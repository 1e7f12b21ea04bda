"""Convert between a timm ``VisionTransformer`` state dict (numpy arrays) and this plugin's Flax parameters.

Accepted: the two standard timm layouts, told apart by the presence of ``attn_pool.latent``:

* class token (``vit_{tiny,small,base,large}_patch16_224``, ``vit_base_patch32_224``,
  ``vit_{huge,giant,gigantic}_patch14_224``): learned position embedding with a class slot, pre-norm blocks with a
  fused qkv projection, final norm, linear head;
* MAP pooling without a class token (``vit_so400m_patch14_siglip_224``): the same blocks, a position embedding
  without class slot, and timm's ``AttentionPoolLatent``, which is big_vision's MAP head.

Anything else (layer scale, register tokens, a pre-norm stem, fc_norm after average pooling, another family's
weights) fails on the first tensor that does not fit, by name.

Weights are matched strictly, so that a wrong file never loads silently. The result records the build options the
weights need: ``pool`` from the layout, and ``resolution`` from the position-embedding grid (a timm model created
with another ``img_size`` imports too). :func:`export_timm` is the reverse, for the options timm can hold.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from convscale_plugins.vit.variants import Variant, ViTConfig

from convscale_cli.errors import UnknownNameError, UsageError
from convscale_cli.weights import ExportedWeights, ImportedWeights

SOURCES = ("timm",)


def _mlp_shapes(prefix: str, d: int, m: int) -> dict[str, tuple[int, ...]]:
    fc1 = {f"{prefix}.fc1.weight": (m, d), f"{prefix}.fc1.bias": (m,)}
    return {**fc1, f"{prefix}.fc2.weight": (d, m), f"{prefix}.fc2.bias": (d,)}


def timm_shapes(config: ViTConfig, grid: int, num_classes: int | None, pool: str = "tok") -> dict[str, tuple[int, ...]]:
    """The tensors of a timm ViT state dict, name -> shape, in timm's order.

    Args:
        config: the ViT shape.
        grid: side of the position-embedding grid.
        num_classes: classifier size, or None for a headless model (timm ``num_classes=0``).
        pool: "tok" (class token) or "map" (``global_pool="map"``, no class token).
    """
    d, m, p = config.width, config.mlp_dim, config.patch_size
    shapes: dict[str, tuple[int, ...]] = {"cls_token": (1, 1, d)} if pool == "tok" else {}
    shapes.update(
        {
            "pos_embed": (1, (pool == "tok") + grid * grid, d),
            "patch_embed.proj.weight": (d, 3, p, p),
            "patch_embed.proj.bias": (d,),
        }
    )
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
                **_mlp_shapes(f"{b}.mlp", d, m),
            }
        )
    shapes["norm.weight"] = (d,)
    shapes["norm.bias"] = (d,)
    if pool == "map":
        shapes.update(
            {
                "attn_pool.latent": (1, 1, d),
                "attn_pool.q.weight": (d, d),
                "attn_pool.q.bias": (d,),
                "attn_pool.kv.weight": (2 * d, d),
                "attn_pool.kv.bias": (2 * d,),
                "attn_pool.proj.weight": (d, d),
                "attn_pool.proj.bias": (d,),
                "attn_pool.norm.weight": (d,),
                "attn_pool.norm.bias": (d,),
                **_mlp_shapes("attn_pool.mlp", d, m),
            }
        )
    if num_classes is not None:
        shapes["head.weight"] = (num_classes, d)
        shapes["head.bias"] = (num_classes,)
    return shapes


def _grid(variant: Variant, tensors: Mapping[str, Any], prefix: int) -> int:
    """Side of the position-embedding grid stored in the file (the variant's own when it cannot be read)."""
    default = variant.train_resolution // variant.config.patch_size
    posemb = tensors.get("pos_embed")
    if posemb is None or np.ndim(posemb) != 3:
        return default
    side = math.isqrt(max(posemb.shape[1] - prefix, 0))
    return side if side > 0 and side * side == posemb.shape[1] - prefix else default


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


def _heads(kernel: np.ndarray, bias: np.ndarray, config: ViTConfig) -> dict[str, np.ndarray]:
    """A torch (out, in) projection onto all heads -> flax DenseGeneral (in, heads, head_dim)."""
    h, hd = config.num_heads, config.head_dim
    return {"kernel": kernel.T.reshape(-1, h, hd), "bias": bias.reshape(h, hd)}


def _attention(q: tuple, k: tuple, v: tuple, proj: tuple, config: ViTConfig) -> dict[str, Any]:
    """Query/key/value/out params from (weight, bias) pairs of torch linear layers."""
    d, h, hd = config.width, config.num_heads, config.head_dim
    pairs = zip(("query", "key", "value"), (q, k, v), strict=True)
    out = {name: _heads(_f32(w), _f32(b), config) for name, (w, b) in pairs}
    out["out"] = {"kernel": _f32(proj[0]).T.reshape(h, hd, d), "bias": _f32(proj[1])}
    return out


def _block_attention(prefix: str, config: ViTConfig, tensors: Mapping[str, Any]) -> dict[str, Any]:
    d = config.width
    # timm's fused qkv output is laid out (3, heads, head_dim): split it, then put heads on their own axis.
    w = _f32(tensors[f"{prefix}.qkv.weight"]).reshape(3, d, d)
    b = _f32(tensors[f"{prefix}.qkv.bias"]).reshape(3, d)
    proj = (tensors[f"{prefix}.proj.weight"], tensors[f"{prefix}.proj.bias"])
    return _attention((w[0], b[0]), (w[1], b[1]), (w[2], b[2]), proj, config)


def _mlp(prefix: str, tensors: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "fc1": _dense(tensors[f"{prefix}.fc1.weight"], tensors[f"{prefix}.fc1.bias"]),
        "fc2": _dense(tensors[f"{prefix}.fc2.weight"], tensors[f"{prefix}.fc2.bias"]),
    }


def _map_head(config: ViTConfig, tensors: Mapping[str, Any]) -> dict[str, Any]:
    """timm ``AttentionPoolLatent`` (latent query, fused kv laid out (2, heads, head_dim)) -> the MAP head."""
    d = config.width
    kv_w = _f32(tensors["attn_pool.kv.weight"]).reshape(2, d, d)
    kv_b = _f32(tensors["attn_pool.kv.bias"]).reshape(2, d)
    q = (tensors["attn_pool.q.weight"], tensors["attn_pool.q.bias"])
    proj = (tensors["attn_pool.proj.weight"], tensors["attn_pool.proj.bias"])
    return {
        "probe": _f32(tensors["attn_pool.latent"]),
        "attn": _attention(q, (kv_w[0], kv_b[0]), (kv_w[1], kv_b[1]), proj, config),
        "norm": _norm("attn_pool.norm", tensors),
        "mlp": _mlp("attn_pool.mlp", tensors),
    }


def import_weights(
    variant: Variant, source: str, tensors: Mapping[str, Any], num_classes: int | None
) -> ImportedWeights:
    """Convert a timm state dict into the params of ``variant`` (class-token or MAP pool, learned posemb).

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
    pool = "map" if "attn_pool.latent" in tensors else "tok"
    grid = _grid(variant, tensors, prefix=1 if pool == "tok" else 0)
    head = tensors.get("head.weight")
    file_classes = int(np.shape(head)[0]) if head is not None and np.ndim(head) == 2 else None
    _check(variant, tensors, timm_shapes(config, grid, file_classes, pool))
    classes = num_classes if num_classes is not None else file_classes
    if classes is None:
        raise UsageError(f"the {variant.timm_name} weights have no classifier head; pass the number of classes")

    d, p = config.width, config.patch_size
    posemb = _f32(tensors["pos_embed"])
    params: dict[str, Any] = {
        "embedding": {
            # (D, C, p, p) conv -> (p, p, C, D) -> dense over (row, column, channel)-flattened patches.
            "kernel": _f32(tensors["patch_embed.proj.weight"]).transpose(2, 3, 1, 0).reshape(p * p * 3, d),
            "bias": _f32(tensors["patch_embed.proj.bias"]),
        },
    }
    if pool == "tok":
        # The class slot of the position embedding is a constant added to the (constant) class token: fold it in.
        params["pos_embedding"] = posemb[:, 1:]
        params["cls"] = _f32(tensors["cls_token"]) + posemb[:, :1]
    else:
        params["pos_embedding"] = posemb
    encoder: dict[str, Any] = {}
    for i in range(config.depth):
        b = f"blocks.{i}"
        encoder[f"block{i}"] = {
            "norm1": _norm(f"{b}.norm1", tensors),
            "attn": _block_attention(f"{b}.attn", config, tensors),
            "norm2": _norm(f"{b}.norm2", tensors),
            "mlp": _mlp(f"{b}.mlp", tensors),
        }
    encoder["norm"] = _norm("norm", tensors)
    params["encoder"] = encoder
    if pool == "map":
        params["map_head"] = _map_head(config, tensors)
    if classes == file_classes:
        params["head"] = _dense(tensors["head.weight"], tensors["head.bias"])
        head_note = "head from the file"
    else:
        params["head"] = {"kernel": np.zeros((d, classes), np.float32), "bias": np.zeros((classes,), np.float32)}
        head_note = f"new zero-initialised {classes}-way head"
    return ImportedWeights(
        params=params,
        num_classes=classes,
        options={"pool": pool, "posemb": "learn", "resolution": grid * p},
        note=head_note,
    )


def _linear(dense: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """A flax Dense (or a DenseGeneral over heads) -> a torch linear layer's (weight (out, in), bias (out,))."""
    kernel, bias = _f32(dense["kernel"]), _f32(dense["bias"])
    if kernel.ndim == 3 and bias.ndim == 2:  # (in, heads, head_dim): a query/key/value projection
        kernel = kernel.reshape(kernel.shape[0], -1)
    elif kernel.ndim == 3:  # (heads, head_dim, out): the output projection
        kernel = kernel.reshape(-1, kernel.shape[-1])
    return np.ascontiguousarray(kernel.T), bias.reshape(-1)


def _put(out: dict[str, np.ndarray], prefix: str, pair: tuple[np.ndarray, np.ndarray]) -> None:
    out[f"{prefix}.weight"], out[f"{prefix}.bias"] = pair


def _unnorm(out: dict[str, np.ndarray], prefix: str, norm: Mapping[str, Any]) -> None:
    out[f"{prefix}.weight"], out[f"{prefix}.bias"] = _f32(norm["scale"]), _f32(norm["bias"])


def _unmlp(out: dict[str, np.ndarray], prefix: str, mlp: Mapping[str, Any]) -> None:
    _put(out, f"{prefix}.fc1", _linear(mlp["fc1"]))
    _put(out, f"{prefix}.fc2", _linear(mlp["fc2"]))


def export_timm(
    variant: Variant, params: Mapping[str, Any], num_classes: int, options: Mapping[str, Any]
) -> ExportedWeights:
    """Our ``params`` as a timm ``VisionTransformer`` state dict (the reverse of :func:`import_weights`).

    The class slot of timm's position embedding is exported as zeros and the class token carries the sum the import
    folded into it, so timm computes exactly what this model does. The returned kwargs name timm's pooling, class
    token and image size, since a model trained here may differ from the twin's defaults in those.

    Raises:
        UsageError: options timm's ViT cannot hold (average pooling, a fixed sin-cos position embedding, no qkv
            bias), or a variant without a timm twin.
    """
    if not variant.timm_name:
        raise UsageError(f"{variant.name} has no timm twin to export to")
    config = variant.config
    pool, posemb = options.get("pool", "tok"), options.get("posemb", "learn")
    for key, value, allowed in (("pool", pool, ("tok", "map")), ("posemb", posemb, ("learn",))):
        if value not in allowed:
            raise UsageError(f"{variant.name} with {key}={value!r} has no timm layout (timm: {key} in {allowed})")
    if not options.get("qkv_bias", True):
        raise UsageError(f"{variant.name} with qkv_bias=False has no timm layout (timm's vit_* use qkv biases)")
    d, p = config.width, config.patch_size
    out: dict[str, np.ndarray] = {}
    posemb_table = _f32(params["pos_embedding"])
    if pool == "tok":
        out["cls_token"] = _f32(params["cls"])
        out["pos_embed"] = np.concatenate([np.zeros((1, 1, d), np.float32), posemb_table], axis=1)
    else:
        out["pos_embed"] = posemb_table
    embed = params["embedding"]
    patches = _f32(embed["kernel"]).reshape(p, p, 3, d)  # (row, column, channel)-flattened, as the import wrote it
    out["patch_embed.proj.weight"] = np.ascontiguousarray(patches.transpose(3, 2, 0, 1))
    out["patch_embed.proj.bias"] = _f32(embed["bias"])
    encoder = params["encoder"]
    for i in range(config.depth):
        block, b = encoder[f"block{i}"], f"blocks.{i}"
        _unnorm(out, f"{b}.norm1", block["norm1"])
        q, k, v = (_linear(block["attn"][n]) for n in ("query", "key", "value"))
        out[f"{b}.attn.qkv.weight"] = np.concatenate([q[0], k[0], v[0]], axis=0)
        out[f"{b}.attn.qkv.bias"] = np.concatenate([q[1], k[1], v[1]], axis=0)
        _put(out, f"{b}.attn.proj", _linear(block["attn"]["out"]))
        _unnorm(out, f"{b}.norm2", block["norm2"])
        _unmlp(out, f"{b}.mlp", block["mlp"])
    _unnorm(out, "norm", encoder["norm"])
    if pool == "map":
        head = params["map_head"]
        out["attn_pool.latent"] = _f32(head["probe"])
        _put(out, "attn_pool.q", _linear(head["attn"]["query"]))
        k, v = _linear(head["attn"]["key"]), _linear(head["attn"]["value"])
        out["attn_pool.kv.weight"] = np.concatenate([k[0], v[0]], axis=0)
        out["attn_pool.kv.bias"] = np.concatenate([k[1], v[1]], axis=0)
        _put(out, "attn_pool.proj", _linear(head["attn"]["out"]))
        _unnorm(out, "attn_pool.norm", head["norm"])
        _unmlp(out, "attn_pool.mlp", head["mlp"])
    _put(out, "head", _linear(params["head"]))
    grid = math.isqrt(posemb_table.shape[1])
    expected = timm_shapes(config, grid, num_classes, pool)
    for name, shape in expected.items():  # the same strict check as the import, from the other side
        if tuple(out[name].shape) != shape:
            raise UsageError(f"exported tensor {name!r} has shape {tuple(out[name].shape)}, timm expects {shape}")
    kwargs = {
        "num_classes": num_classes,
        "img_size": grid * p,
        "class_token": pool == "tok",
        "global_pool": "token" if pool == "tok" else "map",
    }
    return ExportedWeights(tensors=out, model=variant.timm_name, kwargs=kwargs)
