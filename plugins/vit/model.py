"""Vision Transformer in Flax linen (Dosovitskiy et al. 2021; shapes of Zhai et al. 2022).

Follows big_vision ``models/vit.py`` (pre-LayerNorm blocks, zero-initialised classifier, xavier-uniform projections,
optional MAP head and 2-D sin-cos position embedding). Deviations, all for numerical parity with timm
``vision_transformer.py`` so that imported timm weights give the same logits:

* GELU is the exact (erf) form, as PyTorch's ``nn.GELU``; big_vision uses the tanh approximation.
* The class token gets a position embedding (timm's "cls slot"); it is folded into the learned ``cls`` parameter,
  which is the same function because both are input-independent constants.
* The patch embedding is a dense layer over flattened (row, column, channel) patches, the same map as a conv with
  stride = kernel = patch size.
* ``drop_rate`` is dropout on the pooled features before the classifier (timm ``drop_rate``, and the same meaning as
  in the NFNet plugin); stochastic depth grows linearly over the blocks from 0 to ``stochdepth_rate`` (timm ``dpr``).
* A learned position embedding created for one grid is resized when the image gives another (fine-tuning at 384 px):
  bicubic with antialiasing, which is what timm ``resample_abs_pos_embed`` computes.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from convscale_plugins.vit.variants import ViTConfig, check_options

from convscale_cli.errors import UnknownNameError, UsageError
from convscale_cli.registry import MAX_RESOLUTION

Dtype = Any


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0) -> jax.Array:
    """Fixed 2-D sin-cos position embedding of big_vision (MoCo-v3 style), shape (1, h*w, width)."""
    y, x = np.mgrid[:h, :w]
    omega = np.arange(width // 4) / max(width // 4 - 1, 1)
    omega = 1.0 / (temperature**omega)
    y = np.einsum("m,d->md", y.flatten(), omega)
    x = np.einsum("m,d->md", x.flatten(), omega)
    table = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
    return jnp.asarray(table, jnp.float32)[None]


def resample_posemb(posemb: jax.Array, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> jax.Array:
    """Resize a (1, gh*gw, D) position embedding to another grid.

    jax's bicubic resize is the Keys kernel with a = -0.5, half-pixel centres, weights renormalised at the borders and
    the kernel widened when shrinking: the same computation as torch's ``interpolate(..., mode="bicubic",
    antialias=True)`` that timm ``resample_abs_pos_embed`` uses, so resized imported weights match timm.
    """
    if tuple(old_grid) == tuple(new_grid):
        return posemb
    d = posemb.shape[-1]
    table = posemb.reshape(old_grid[0], old_grid[1], d).astype(jnp.float32)
    table = jax.image.resize(table, (new_grid[0], new_grid[1], d), method="bicubic", antialias=True)
    return table.reshape(1, new_grid[0] * new_grid[1], d).astype(posemb.dtype)


class DropPath(nn.Module):
    """Stochastic depth: drop the residual branch of whole examples (Huang et al. 2016)."""

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        if deterministic or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(mask, x / keep, jnp.zeros_like(x))


class Attention(nn.Module):
    """Multi-head dot-product attention with separate query/key/value projections (flax/big_vision layout)."""

    num_heads: int
    qkv_bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, queries: jax.Array, inputs: jax.Array) -> jax.Array:
        d = inputs.shape[-1]
        head_dim = d // self.num_heads
        dense = dict(
            features=(self.num_heads, head_dim),
            use_bias=self.qkv_bias,
            dtype=self.dtype,
            kernel_init=nn.initializers.xavier_uniform(),
        )
        q = nn.DenseGeneral(name="query", **dense)(queries)
        k = nn.DenseGeneral(name="key", **dense)(inputs)
        v = nn.DenseGeneral(name="value", **dense)(inputs)
        # jax's attention computes the logits and softmax in float32 even for bfloat16 inputs, and lets XLA pick a
        # fused kernel where the backend has one.
        x = jax.nn.dot_product_attention(q, k, v)
        return nn.DenseGeneral(
            d, axis=(-2, -1), dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(), name="out"
        )(x)


class MlpBlock(nn.Module):
    """Two dense layers with an exact GELU between them."""

    mlp_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # big_vision's init: xavier-uniform kernels, near-zero (not exactly zero) biases.
        inits = dict(kernel_init=nn.initializers.xavier_uniform(), bias_init=nn.initializers.normal(stddev=1e-6))
        d = x.shape[-1]
        x = nn.Dense(self.mlp_dim, dtype=self.dtype, name="fc1", **inits)(x)
        x = nn.gelu(x, approximate=False)
        return nn.Dense(d, dtype=self.dtype, name="fc2", **inits)(x)


class EncoderBlock(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    mlp_dim: int
    num_heads: int
    stochdepth_rate: float = 0.0
    qkv_bias: bool = True
    layernorm_eps: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        norm = dict(epsilon=self.layernorm_eps, dtype=self.dtype)
        y = nn.LayerNorm(name="norm1", **norm)(x)
        y = Attention(self.num_heads, self.qkv_bias, self.dtype, name="attn")(y, y)
        x = x + DropPath(self.stochdepth_rate)(y, deterministic)
        y = nn.LayerNorm(name="norm2", **norm)(x)
        y = MlpBlock(self.mlp_dim, self.dtype, name="mlp")(y)
        return x + DropPath(self.stochdepth_rate)(y, deterministic)


class MAPHead(nn.Module):
    """Multi-head attention pooling (Lee et al. 2019), as in Zhai et al. §3.2 and big_vision."""

    mlp_dim: int
    num_heads: int
    qkv_bias: bool = True
    layernorm_eps: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n, _, d = x.shape
        probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, d), jnp.float32)
        probe = jnp.tile(probe.astype(self.dtype), (n, 1, 1))
        x = Attention(self.num_heads, self.qkv_bias, self.dtype, name="attn")(probe, x)
        y = nn.LayerNorm(epsilon=self.layernorm_eps, dtype=self.dtype, name="norm")(x)
        x = x + MlpBlock(self.mlp_dim, self.dtype, name="mlp")(y)
        return x[:, 0]


class Encoder(nn.Module):
    """The blocks and the final LayerNorm."""

    depth: int
    mlp_dim: int
    num_heads: int
    stochdepth_rate: float = 0.0
    qkv_bias: bool = True
    layernorm_eps: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        for i in range(self.depth):
            # Linear from 0 at the first block to stochdepth_rate at the last (timm `dpr`).
            rate = self.stochdepth_rate * i / max(self.depth - 1, 1)
            x = EncoderBlock(
                self.mlp_dim, self.num_heads, rate, self.qkv_bias, self.layernorm_eps, self.dtype, name=f"block{i}"
            )(x, deterministic)
        return nn.LayerNorm(epsilon=self.layernorm_eps, dtype=self.dtype, name="norm")(x)


class ViT(nn.Module):
    """Vision Transformer classifier: ``__call__(images, train)`` maps float NHWC images to float32 logits.

    Attributes:
        config: width, depth, MLP size, heads, patch size.
        num_classes: classifier size.
        pool: "tok" (class token, timm's default), "gap" (mean of the tokens) or "map" (attention pooling).
        posemb: "learn" or "sincos2d".
        resolution: image side the learned position-embedding grid is created for; other sizes resize it.
        drop_rate: dropout on the pooled features.
        stochdepth_rate: drop-path rate of the last block.
        qkv_bias: biases on the query/key/value projections.
        layernorm_eps: LayerNorm epsilon (timm and big_vision: 1e-6).
        dtype: activation dtype; parameters stay float32.
    """

    config: ViTConfig
    num_classes: int
    pool: str = "tok"
    posemb: str = "learn"
    resolution: int = 224
    drop_rate: float = 0.0
    stochdepth_rate: float = 0.0
    qkv_bias: bool = True
    layernorm_eps: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        cfg, p = self.config, self.config.patch_size
        n, h, w, c = images.shape
        if h % p or w % p:
            raise UsageError(f"image size {h}x{w} is not divisible by the patch size {p}")
        gh, gw = h // p, w // p
        # Patchify in (row, column, channel) order, then one dense layer: the stride-p conv of the paper.
        x = images.astype(self.dtype).reshape(n, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5)
        x = nn.Dense(cfg.width, dtype=self.dtype, name="embedding")(x.reshape(n, gh * gw, p * p * c))

        if self.posemb == "learn":
            grid = self.resolution // p
            table = self.param(
                "pos_embedding", nn.initializers.normal(stddev=cfg.width**-0.5), (1, grid * grid, cfg.width)
            )
            x = x + resample_posemb(table, (grid, grid), (gh, gw)).astype(self.dtype)
        else:
            x = x + posemb_sincos_2d(gh, gw, cfg.width).astype(self.dtype)

        if self.pool == "tok":
            cls = self.param("cls", nn.initializers.zeros, (1, 1, cfg.width))
            x = jnp.concatenate([jnp.tile(cls.astype(self.dtype), (n, 1, 1)), x], axis=1)

        x = Encoder(
            cfg.depth,
            cfg.mlp_dim,
            cfg.num_heads,
            self.stochdepth_rate,
            self.qkv_bias,
            self.layernorm_eps,
            self.dtype,
            name="encoder",
        )(x, deterministic=not train)

        if self.pool == "map":
            x = MAPHead(cfg.mlp_dim, cfg.num_heads, self.qkv_bias, self.layernorm_eps, self.dtype, name="map_head")(x)
        elif self.pool == "gap":
            x = jnp.mean(x, axis=1)
        else:
            x = x[:, 0]
        x = nn.Dropout(self.drop_rate)(x, deterministic=not train)
        # Zero-initialised classifier (big_vision): every class starts at the same logit.
        logits = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.zeros, name="head")(x)
        return logits.astype(jnp.float32)


def build(
    config: ViTConfig,
    *,
    num_classes: int,
    dtype: str = "float32",
    stochdepth_rate: float = 0.0,
    drop_rate: float = 0.0,
    pool: str = "tok",
    posemb: str = "learn",
    resolution: int = 224,
    qkv_bias: bool = True,
    layernorm_eps: float = 1e-6,
) -> ViT:
    """Validate the options and return the module (the ``ArchitectureSpec.build`` of every ViT variant)."""
    if not isinstance(num_classes, int) or num_classes <= 0:
        raise UsageError(f"num_classes must be a positive integer, got {num_classes!r}")
    dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    if dtype not in dtypes:
        raise UnknownNameError("dtype", str(dtype), dtypes)
    for name, rate in (("drop_rate", drop_rate), ("stochdepth_rate", stochdepth_rate)):
        if not 0.0 <= rate < 1.0:
            raise UsageError(f"{name} must be in [0, 1), got {rate}")
    check_options(pool, posemb, config.width)
    if resolution <= 0 or resolution % config.patch_size:
        raise UsageError(f"resolution {resolution} is not a positive multiple of the patch size {config.patch_size}")
    if resolution > MAX_RESOLUTION:  # the position embedding grows with its square: 100000 px asks for 80 GB
        raise UsageError(f"resolution {resolution} is over the limit of {MAX_RESOLUTION} px")
    if layernorm_eps <= 0:
        raise UsageError(f"layernorm_eps must be > 0, got {layernorm_eps}")
    return ViT(
        config=config,
        num_classes=num_classes,
        pool=pool,
        posemb=posemb,
        resolution=resolution,
        drop_rate=drop_rate,
        stochdepth_rate=stochdepth_rate,
        qkv_bias=qkv_bias,
        layernorm_eps=layernorm_eps,
        dtype=dtypes[dtype],
    )
