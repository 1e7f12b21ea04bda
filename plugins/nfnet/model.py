"""Flax linen NFNet (Brock et al. 2021, arXiv 2102.06171), numerically following the DeepMind reference.

Reference: github.com/google-deepmind/deepmind-research nfnets/nfnet.py and base.py (``NFNet``, ``NFBlock``,
``WSConv2D``, ``SqueezeExcite``, ``StochDepth``); names (``alpha``, ``beta``, ``skip_gain``, ``stochdepth_rate``,
``se_ratio``, ``conv0``/``conv1``/``conv1b``/``conv2``/``conv_shortcut``) are kept so the two can be read side by side.
The architecture itself (block plan, widths, betas) comes from :mod:`convscale_plugins.nfnet.variants`.

Options and where they depart from the paper text (Brock et al. 2021; DM ``nfnet.py``):
    activation: "gelu" (default) is ``jax.nn.gelu`` as DM calls it, i.e. the tanh approximation; "gelu_exact" is
        the erf GELU of PyTorch/timm (same gamma). Every nonlinearity of DM's table is available, scaled by its gamma.
    se_activation: the SE inner nonlinearity, unscaled. "relu" as in the released code (default); the paper's
        App. C writes GELU: use "gelu".
    plus_stage1_mid ("+" variants only): 128 = the code's rounding (192 // 128 = 1 group of 128); 192 = one
        unrounded group of 192, which reproduces the paper's F4+ at 527M params / 367B MACs (docs/paper-notes.md).
    stochdepth_rate: 0.0 by default (JFT pre-training recipe, Brock et al. 2021 A.5); set 0.25 (ImageNet from scratch)
        or 0.1 for fine-tuning. Per-block rate = stochdepth_rate * block_index / num_blocks, dropped per example, no
        1/keep rescaling (DM ``StochDepth(scale_by_keep=False)``).
    ws_eps, ws_eps_style: Scaled WS computes ``(w - mean) * rsqrt(max(var * fan_in, ws_eps)) * gain`` with
        ws_eps = 1e-4 in DM style ("dm"); timm's ScaledStdConv2d computes ``(w - mean) * rsqrt((var + ws_eps) *
        fan_in) * gain`` with ws_eps = 1e-5 ("timm"), which the timm parity test selects.

Random numbers: dropout and stochastic depth both draw from the ``"dropout"`` RNG stream, so
``model.apply(variables, x, train=True, rngs={"dropout": key})`` is all a training step needs.

Grouped 3x3 convolutions run as one XLA grouped convolution on accelerators and as per-group convolutions (or, on
maps of at most 2x2, one batched matmul over unfolded windows) on CPU, where XLA's grouped kernels are 5-35x slower;
1x1 convolutions run as matmuls (see :func:`grouped_conv`). The arithmetic is the same.

Precision: parameters are float32; with ``dtype=jnp.bfloat16`` weights are standardised in float32 and the
convolutions run in bfloat16 (N A.1). Logits are always returned in float32.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from convscale_plugins.nfnet.variants import GAMMA, BlockPlan, NFNetConfig, block_plan
from jax import lax

Activation = Callable[[jax.Array], jax.Array]

_RAW: dict[str, Activation] = {
    "identity": lambda x: x,
    "celu": jax.nn.celu,
    "elu": jax.nn.elu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_exact": lambda x: jax.nn.gelu(x, approximate=False),
    "leaky_relu": jax.nn.leaky_relu,
    "log_sigmoid": jax.nn.log_sigmoid,
    "log_softmax": jax.nn.log_softmax,
    "relu": jax.nn.relu,
    "relu6": jax.nn.relu6,
    "selu": jax.nn.selu,
    "sigmoid": jax.nn.sigmoid,
    "silu": jax.nn.silu,
    "soft_sign": jax.nn.soft_sign,
    "softplus": jax.nn.softplus,
    "tanh": jnp.tanh,
}
# DM's table also has "glu", which halves the channels and so cannot be the NFNet nonlinearity.
ACTIVATIONS = tuple(_RAW)
WS_EPS_STYLES = ("dm", "timm")


def activation_fn(name: str) -> Activation:
    """The gamma-scaled nonlinearity of DM base.py ``nonlinearities`` (variance-preserving for N(0, 1) inputs)."""
    raw, gamma = _RAW[name], GAMMA[name]
    return lambda x: raw(x) * jnp.asarray(gamma, x.dtype)


def standardize_weight(kernel: jax.Array, gain: jax.Array, eps: float, style: str = "dm") -> jax.Array:
    """Scaled Weight Standardization of an HWIO kernel: zero mean, unit fan-in variance per output channel, x gain.

    The statistics are taken over a ``[fan_in, out]`` view of the kernel: XLA:CPU reduces that 2-D view 3-5x faster
    than the leading three axes of a 1x1 kernel; it is the same mean and variance.
    """
    fan_in = kernel.shape[0] * kernel.shape[1] * kernel.shape[2]
    flat = kernel.reshape(fan_in, kernel.shape[3])
    mean = jnp.mean(flat, axis=0)
    var = jnp.var(flat, axis=0)
    if style == "dm":
        scale = lax.rsqrt(jnp.maximum(var * fan_in, eps)) * gain
    else:
        scale = lax.rsqrt((var + eps) * fan_in) * gain
    return (flat * scale - mean * scale).reshape(kernel.shape)


class WSConv2D(nn.Module):
    """Convolution with Scaled Weight Standardization, a learnable gain (init 1) and a bias (init 0); SAME padding."""

    features: int
    kernel_size: int = 1
    stride: int = 1
    groups: int = 1
    eps: float = 1e-4
    eps_style: str = "dm"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        shape = (k, k, x.shape[-1] // self.groups, self.features)
        # DM: VarianceScaling(1.0, 'fan_in', 'normal'); fan-in is k*k*in/groups, WS is largely insensitive to it.
        kernel = self.param("kernel", nn.initializers.variance_scaling(1.0, "fan_in", "normal"), shape, jnp.float32)
        gain = self.param("gain", nn.initializers.ones, (self.features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        weight = standardize_weight(kernel, gain, self.eps, self.eps_style).astype(self.dtype)
        out = grouped_conv(x.astype(self.dtype), weight, self.stride, self.groups)
        return out + bias.astype(self.dtype)


def grouped_conv(x: jax.Array, weight: jax.Array, stride: int, groups: int, method: str | None = None) -> jax.Array:
    """SAME-padded NHWC convolution with ``groups`` groups (TF/XLA SAME = timm's Conv2dSame padding).

    The arithmetic is always this convolution's; only the XLA operation that carries it changes (measured
    forward + backward with weight standardisation, batch 16 at 64 px, on the 2-core CPU):

    * 1x1 convolutions are the channel matmul they are. As a ``dot_general`` the backward pass reads the kernel in
      place; as a convolution XLA:CPU transposes weight-sized buffers first: 30-40% less CPU time per layer.
    * XLA:CPU runs grouped convolutions 5-12x slower than the same groups as separate convolutions, so on CPU the
      groups are split and concatenated. On maps of at most 2x2 outputs, where most of a 3x3 window is padding,
      the groups are one batched matmul over the unfolded windows instead (3x faster than split convolutions).
      Accelerators keep the native ``feature_group_count``.

    ``method`` forces one of the grouped paths (``native``, ``split`` or ``unfolded``) whatever the backend, so
    the three can be compared on one machine; None chooses as above.
    """
    if method is None:
        if weight.shape[:2] == (1, 1) and stride == 1 and groups == 1:
            return lax.dot_general(x, weight[0, 0], (((3,), (0,)), ((), ())))
        if groups == 1 or jax.default_backend() != "cpu":
            method = "native"
        elif -(-x.shape[1] // stride) * -(-x.shape[2] // stride) <= 4:
            method = "unfolded"
        else:
            method = "split"
    if method == "native":
        return _conv(x, weight, stride, groups)
    if method == "unfolded":
        return _grouped_conv_unfolded(x, weight, stride, groups)
    if method == "split":
        xs, ws = jnp.split(x, groups, axis=-1), jnp.split(weight, groups, axis=-1)
        return jnp.concatenate([_conv(a, b, stride, 1) for a, b in zip(xs, ws, strict=True)], axis=-1)
    raise ValueError(f"grouped_conv method {method!r} is not one of native, split, unfolded")


def _conv(x: jax.Array, weight: jax.Array, stride: int, feature_group_count: int) -> jax.Array:
    """XLA's SAME-padded NHWC convolution."""
    return lax.conv_general_dilated(
        x,
        weight,
        window_strides=(stride, stride),
        padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=feature_group_count,
    )


def _grouped_conv_unfolded(x: jax.Array, weight: jax.Array, stride: int, groups: int) -> jax.Array:
    """:func:`grouped_conv` as one matmul per group over the unfolded (im2col) SAME-padded windows."""
    n, _, _, c = x.shape
    kh, kw, cin, cout = weight.shape
    (top, bottom), (left, right) = lax.padtype_to_pads(x.shape[1:3], (kh, kw), (stride, stride), "SAME")
    x = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    out_h, out_w = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
    windows = [
        lax.slice(x, (0, i, j, 0), (n, i + (out_h - 1) * stride + 1, j + (out_w - 1) * stride + 1, c),
                  (1, stride, stride, 1))
        for i in range(kh)
        for j in range(kw)
    ]  # fmt: skip
    patches = jnp.stack(windows, axis=3).reshape(n * out_h * out_w, kh * kw, groups, cin)
    kernel = weight.reshape(kh * kw, cin, groups, cout // groups)
    out = jnp.einsum("pkgc,kcgo->pgo", patches, kernel)
    return out.reshape(n, out_h, out_w, cout)


class SqueezeExcite(nn.Module):
    """DM base.py SqueezeExcite: pool -> fc0 -> act -> fc1 -> sigmoid (the block multiplies by 2x this)."""

    hidden: int
    activation: str = "relu"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        h = nn.Dense(self.hidden, dtype=self.dtype, name="fc0")(h)
        h = _RAW[self.activation](h)  # plain, unscaled (DM default jax.nn.relu)
        h = nn.Dense(x.shape[-1], dtype=self.dtype, name="fc1")(h)
        return jax.nn.sigmoid(h)[:, None, None, :].astype(x.dtype)


def stochastic_depth(x: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
    """Zero whole examples of a residual branch with probability ``rate``; no 1/keep rescaling (DM StochDepth)."""
    r = jax.random.uniform(rng, (x.shape[0],) + (1,) * (x.ndim - 1), dtype=jnp.float32)
    keep = jnp.floor(1.0 - rate + r)
    return x * keep.astype(x.dtype)


class NFBlock(nn.Module):
    """Pre-activation bottleneck: two grouped 3x3 convs, SE, stochastic depth, skip gain, alpha (NFNet 2021 App. C)."""

    plan: BlockPlan
    alpha: float = 0.2
    activation: str = "gelu"
    se_activation: str = "relu"
    stochdepth_rate: float = 0.0  # this block's rate (already multiplied by block_index / num_blocks)
    ws_eps: float = 1e-4
    ws_eps_style: str = "dm"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        b = self.plan
        act = activation_fn(self.activation)

        def conv(features: int, k: int, name: str, stride: int = 1, groups: int = 1) -> WSConv2D:
            return WSConv2D(features, k, stride, groups, self.ws_eps, self.ws_eps_style, self.dtype, name=name)

        out = act(x) * jnp.asarray(b.beta, x.dtype)
        # Transition blocks take the shortcut from the pre-activated, beta-scaled input: this resets the variance.
        if b.stride > 1:
            shortcut = nn.avg_pool(out, (2, 2), strides=(2, 2), padding="SAME", count_include_pad=False)
            shortcut = conv(b.out_ch, 1, "conv_shortcut")(shortcut)
        elif b.use_projection:
            shortcut = conv(b.out_ch, 1, "conv_shortcut")(out)
        else:
            shortcut = x
        out = conv(b.mid, 1, "conv0")(out)
        out = conv(b.mid, 3, "conv1", b.stride, b.groups)(act(out))
        out = conv(b.mid, 3, "conv1b", 1, b.groups)(act(out))
        out = conv(b.out_ch, 1, "conv2")(act(out))
        out = 2.0 * SqueezeExcite(b.se_hidden, self.se_activation, self.dtype, name="se")(out) * out
        if train and 0.0 < self.stochdepth_rate < 1.0:
            out = stochastic_depth(out, self.stochdepth_rate, self.make_rng("dropout"))
        skip_gain = self.param("skip_gain", nn.initializers.zeros, (), jnp.float32)  # SkipInit
        out = out * skip_gain.astype(out.dtype)
        return out * jnp.asarray(self.alpha, out.dtype) + shortcut.astype(out.dtype)


class NFNet(nn.Module):
    """Normalizer-Free ResNet: deep stem, four stages of :class:`NFBlock`, 2x-wide 1x1 head conv, linear classifier.

    Parameters live at '/'-joined paths ``stem/conv{0..3}``, ``stage{s}/block{b}/{conv0,conv1,conv1b,conv2,
    conv_shortcut,se/fc0,se/fc1}``, ``stage{s}/block{b}/skip_gain``, ``final_conv`` and ``fc``; convs hold
    ``kernel``/``gain``/``bias``. :func:`convscale_plugins.nfnet.variants.param_shapes` lists them exactly.
    """

    config: NFNetConfig
    num_classes: int = 1000
    activation: str = "gelu"
    se_activation: str = "relu"
    stochdepth_rate: float = 0.0
    drop_rate: float | None = None  # None: the variant's rate (config.drop_rate)
    ws_eps: float = 1e-4
    ws_eps_style: str = "dm"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
        cfg = self.config
        act = activation_fn(self.activation)
        ws = {"eps": self.ws_eps, "eps_style": self.ws_eps_style, "dtype": self.dtype}
        x = images.astype(self.dtype)
        stem = _Stem(cfg.stem_widths + (cfg.stem_out,), self.activation, ws, name="stem")
        x = stem(x)
        plan = block_plan(cfg)
        for stage in range(4):
            blocks = tuple(b for b in plan if b.stage == stage)
            x = _Stage(blocks, cfg.alpha, self.activation, self.se_activation, self.stochdepth_rate, ws,
                       name=f"stage{stage}")(x, train=train)  # fmt: skip
        x = act(WSConv2D(cfg.num_features, 1, name="final_conv", **ws)(x))
        pool = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        rate = cfg.drop_rate if self.drop_rate is None else self.drop_rate
        pool = nn.Dropout(rate, deterministic=not train or rate == 0.0)(pool)
        logits = nn.Dense(
            self.num_classes,
            dtype=self.dtype,
            kernel_init=nn.initializers.normal(0.01),  # N(0, 0.01): zero init can be unstable with many classes
            bias_init=nn.initializers.zeros,
            name="fc",
        )(pool)
        return logits.astype(jnp.float32)


class _Stem(nn.Module):
    """DM stem: 3x3 convs with strides 2, 1, 1, 2; activation after all but the last."""

    widths: tuple[int, ...]
    activation: str
    ws: dict[str, Any]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = activation_fn(self.activation)
        for i, (width, stride) in enumerate(zip(self.widths, (2, 1, 1, 2), strict=True)):
            x = WSConv2D(width, 3, stride, name=f"conv{i}", **self.ws)(x)
            if i < 3:
                x = act(x)
        return x


class _Stage(nn.Module):
    blocks: tuple[BlockPlan, ...]
    alpha: float
    activation: str
    se_activation: str
    stochdepth_rate: float
    ws: dict[str, Any]

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        for b in self.blocks:
            x = NFBlock(
                b,
                self.alpha,
                self.activation,
                self.se_activation,
                self.stochdepth_rate * b.depth_fraction,
                self.ws["eps"],
                self.ws["eps_style"],
                self.ws["dtype"],
                name=f"block{b.index}",
            )(x, train=train)
        return x
