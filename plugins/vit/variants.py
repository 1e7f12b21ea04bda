"""ViT variants as data, and their analytic parameter / MAC counts (pure Python: no jax, no numpy).

Shapes are Table 2 of Zhai et al. 2022, "Scaling Vision Transformers", plus SoViT-400m (Alabdulmohsin et al. 2023,
"Getting ViT in Shape") and a laptop ladder. :func:`param_shapes` lists exactly the parameters the Flax model in
``model.py`` creates (a test checks the two against ``jax.eval_shape``) and :func:`count_macs` counts the matrix
multiplications of one forward pass (a test checks it against XLA's ``cost_analysis()``).

What the published parameter counts include (checked by tests/test_vit.py):
    * Zhai et al. Table 2 (L/16 303M, g/14 1011M, G/14 1843M) is the encoder alone: patch embedding, learned
      position embedding, blocks and final LayerNorm, with **no head at all** (no MAP head, no classifier), i.e.
      ``count_params(config, num_classes=0, pool="gap")``. With a 1000-way classifier L/16 would print 304M.
    * SoViT's 428M for so400m/14 includes the MAP head but no classifier (``pool="map"``, ``num_classes=0``).
"""

from __future__ import annotations

import dataclasses
import math

from convscale_cli.errors import UnknownNameError, UsageError

POOLS = ("tok", "gap", "map")  # class token (timm default), global average pooling, multi-head attention pooling
POSEMBS = ("learn", "sincos2d")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Shape of one ViT (names follow big_vision ``vit.py``)."""

    width: int  # token dimension D
    depth: int  # number of encoder blocks
    mlp_dim: int  # hidden size of the block MLPs (and of the MAP head's MLP)
    num_heads: int
    patch_size: int

    def __post_init__(self) -> None:
        if min(self.width, self.depth, self.mlp_dim, self.num_heads, self.patch_size) < 1:
            raise ValueError(f"every ViT dimension must be >= 1, got {self}")
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by {self.num_heads} heads")

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads


def check_options(pool: str, posemb: str, width: int) -> None:
    """Raise a UsageError for a pool or position-embedding choice the model does not implement."""
    if pool not in POOLS:
        raise UnknownNameError("pool", pool, POOLS)
    if posemb not in POSEMBS:
        raise UnknownNameError("posemb", posemb, POSEMBS)
    if posemb == "sincos2d" and width % 4:
        raise UsageError(f"posemb 'sincos2d' needs a width divisible by 4, got {width}")


def _dense(prefix: str, din: int, dout: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}/kernel": (din, dout), f"{prefix}/bias": (dout,)}


def _norm(prefix: str, width: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}/scale": (width,), f"{prefix}/bias": (width,)}


def _attention(prefix: str, config: ViTConfig, qkv_bias: bool) -> dict[str, tuple[int, ...]]:
    d, h, hd = config.width, config.num_heads, config.head_dim
    shapes: dict[str, tuple[int, ...]] = {}
    for name in ("query", "key", "value"):
        shapes[f"{prefix}/{name}/kernel"] = (d, h, hd)
        if qkv_bias:
            shapes[f"{prefix}/{name}/bias"] = (h, hd)
    shapes[f"{prefix}/out/kernel"] = (h, hd, d)
    shapes[f"{prefix}/out/bias"] = (d,)
    return shapes


def _mlp(prefix: str, config: ViTConfig) -> dict[str, tuple[int, ...]]:
    fc1 = _dense(f"{prefix}/fc1", config.width, config.mlp_dim)
    return {**fc1, **_dense(f"{prefix}/fc2", config.mlp_dim, config.width)}


def param_shapes(
    config: ViTConfig,
    num_classes: int,
    *,
    pool: str = "tok",
    posemb: str = "learn",
    grid: int = 14,
    qkv_bias: bool = True,
) -> dict[str, tuple[int, ...]]:
    """Every parameter of the Flax model as '/'-joined path -> shape, in forward order.

    Args:
        config: the ViT shape.
        num_classes: classifier size; 0 means no classifier (the backbone counts of the papers).
        pool: "tok", "gap" or "map".
        posemb: "learn" (a ``grid`` x ``grid`` table) or "sincos2d" (no parameters).
        grid: side of the learned position-embedding grid (resolution // patch size at creation).
        qkv_bias: whether query/key/value projections have biases (timm and big_vision: yes).
    """
    d, p = config.width, config.patch_size
    shapes: dict[str, tuple[int, ...]] = _dense("embedding", p * p * 3, d)
    if posemb == "learn":
        shapes["pos_embedding"] = (1, grid * grid, d)
    if pool == "tok":
        shapes["cls"] = (1, 1, d)
    for i in range(config.depth):
        block = f"encoder/block{i}"
        shapes.update(_norm(f"{block}/norm1", d))
        shapes.update(_attention(f"{block}/attn", config, qkv_bias))
        shapes.update(_norm(f"{block}/norm2", d))
        shapes.update(_mlp(f"{block}/mlp", config))
    shapes.update(_norm("encoder/norm", d))
    if pool == "map":
        shapes["map_head/probe"] = (1, 1, d)
        shapes.update(_attention("map_head/attn", config, qkv_bias))
        shapes.update(_norm("map_head/norm", d))
        shapes.update(_mlp("map_head/mlp", config))
    if num_classes:
        shapes.update(_dense("head", d, num_classes))
    return shapes


def count_params(config: ViTConfig, num_classes: int, **options: object) -> int:
    """Number of parameters; ``options`` as for :func:`param_shapes`."""
    return sum(math.prod(s) for s in param_shapes(config, num_classes, **options).values())  # type: ignore[arg-type]


def _attention_macs(config: ViTConfig, queries: int, keys: int) -> int:
    d = config.width
    projections = queries * d * d + 2 * keys * d * d + queries * d * d  # query, key and value, out
    return projections + 2 * queries * keys * d  # q.k scores over all heads, then the weighted sum of values


def count_macs(config: ViTConfig, resolution: int, num_classes: int, *, pool: str = "tok") -> int:
    """Forward multiply-accumulates for one square image.

    Counted: every matrix multiplication (patch embedding, attention projections, attention scores and weighted sums,
    MLPs, MAP head, classifier). Not counted, as in Zhai et al. and DeepMind's ``count_flops``: LayerNorm, softmax,
    GELU, biases, residual adds and the position-embedding resize. The position-embedding type does not matter.
    """
    d, m, p = config.width, config.mlp_dim, config.patch_size
    patches = (resolution // p) ** 2
    tokens = patches + (1 if pool == "tok" else 0)
    macs = patches * p * p * 3 * d
    macs += config.depth * (_attention_macs(config, tokens, tokens) + 2 * tokens * d * m)
    if pool == "map":
        macs += _attention_macs(config, 1, tokens) + 2 * d * m
    return macs + d * num_classes


# ---------------------------------------------------------------------------------------------------------------------
# The variant table.


@dataclasses.dataclass(frozen=True)
class Variant:
    """A registered ViT: its shape, default resolutions and registry metadata."""

    name: str
    config: ViTConfig
    train_resolution: int
    eval_resolution: int
    description: str
    tags: tuple[str, ...] = ()
    timm_name: str | None = None  # timm model whose state dict import_weights accepts

    def count(self, resolution: int, num_classes: int) -> tuple[int, int]:
        """(params, MACs) of the registered defaults (class token, learned posemb) applied at ``resolution``.

        Parameters are those of the model as created, with its position-embedding grid at ``train_resolution``
        (a model applied at another resolution resizes that grid; it does not gain parameters).
        """
        grid = self.train_resolution // self.config.patch_size
        return count_params(self.config, num_classes, grid=grid), count_macs(self.config, resolution, num_classes)


# Zhai et al. 2022 Table 2 (Ti/S/B/L/H from Dosovitskiy et al. 2021 and Steiner et al. 2021), SoViT-400m.
# key: (display name, width, depth, mlp, heads, timm names by patch size)
_SHAPES: dict[str, tuple[str, int, int, int, int, dict[int, str]]] = {
    "ti": ("Ti", 192, 12, 768, 3, {16: "vit_tiny_patch16_224"}),
    "s": ("S", 384, 12, 1536, 6, {16: "vit_small_patch16_224"}),
    "b": ("B", 768, 12, 3072, 12, {16: "vit_base_patch16_224", 32: "vit_base_patch32_224"}),
    "l": ("L", 1024, 24, 4096, 16, {16: "vit_large_patch16_224"}),
    "h": ("H", 1280, 32, 5120, 16, {14: "vit_huge_patch14_224"}),
    "g": ("g", 1408, 40, 6144, 16, {14: "vit_giant_patch14_224"}),
    # Registry names are lower-case, so "G" cannot sit beside "g": it takes OpenCLIP's name for the same shape.
    "bigg": ("G", 1664, 48, 8192, 16, {14: "vit_gigantic_patch14_224"}),
    "so400m": ("SoViT-400m", 1152, 27, 4304, 16, {14: "vit_so400m_patch14_siglip_224"}),
}


def _paper_variants() -> list[Variant]:
    out = []
    for key, (display, width, depth, mlp, heads, timm_names) in _SHAPES.items():
        patches = (16, 14, 32) if key == "b" else (16, 14)
        for patch in patches:
            # Pre-training at 224 px as in Zhai et al. and 2310.16764 §2; fine-tuning raises
            # the resolution and resizes the position embedding.
            out.append(
                Variant(
                    f"vit-{key}/{patch}",
                    ViTConfig(width, depth, mlp, heads, patch),
                    224,
                    224,
                    f"ViT-{display}/{patch}: width {width}, depth {depth}, MLP {mlp}, {heads} heads",
                    ("paper",),
                    timm_name=timm_names.get(patch),
                )
            )
    return out


# The laptop ladder at 32 px, patch 4 (64 patches + class token): width and depth grow together (Zhai et al. §3.1
# scale both), head dimension 16, MLP 4x. Forward MACs at 32 px run from ~0.7M to ~83M, spanning the NFNet ladder
# (nfnet-tiny-l0..l6, ~0.4M to ~25M) so the two families can be compared at equal compute.
# name: (width, depth)
_LADDER = {
    "vit-tiny-l0": (16, 2),
    "vit-tiny-l1": (32, 2),
    "vit-tiny-l2": (48, 3),
    "vit-tiny-l3": (64, 4),
    "vit-tiny-l4": (96, 4),
    "vit-tiny-l5": (128, 6),
}


def _ladder_variants() -> list[Variant]:
    return [
        Variant(
            name,
            ViTConfig(width, depth, 4 * width, width // 16 if width >= 32 else 2, 4),
            32,
            32,
            f"ViT at width {width}, depth {depth}, patch 4 (laptop scaling ladder)",
            ("ladder",),
        )
        for name, (width, depth) in _LADDER.items()
    ]


TEST_VARIANT = Variant(
    "vit-test",
    ViTConfig(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=4),
    32,
    32,
    "tiny ViT for tests: 2 blocks of width 32, patch 4",
    ("tiny",),
)

VARIANTS: dict[str, Variant] = {v.name: v for v in (*_paper_variants(), *_ladder_variants(), TEST_VARIANT)}
