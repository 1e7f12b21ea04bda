"""NFNet variants as data, and their analytic parameter / MAC counts (pure Python: no jax, no numpy).

The block plan (:func:`block_plan`) is the single description of the network: the Flax model in ``model.py`` builds
exactly these blocks, :func:`param_shapes` lists exactly the parameters it creates (a test checks the two against
``jax.eval_shape``) and :func:`count_macs` follows DeepMind's ``count_flops`` (deepmind-research nfnets/nfnet.py), so
the NFNet paper's Table 3 "FLOPs", which are multiply-accumulates at the test resolution, come out exactly
(docs/paper-notes.md).

One deliberate difference from ``count_flops``: DM divides the feature-map size by each stride as a float, whereas
here it is rounded up like the SAME-padded convolutions really do. For resolutions divisible by 32 (every resolution
in the paper) the two agree.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

# Activation gains gamma of DM base.py `nonlinearities` (timm `_nonlin_gamma`): Var(gamma * act(x)) = 1 for
# x ~ N(0, 1) (Brock et al. 2021 §3). "gelu" is jax.nn.gelu as DM calls it (tanh approximation); "gelu_exact" is the erf
# GELU that PyTorch/timm use, with the same gamma, needed for numerical parity with timm.
GAMMA: dict[str, float] = {
    "identity": 1.0,
    "celu": 1.270926833152771,
    "elu": 1.2716004848480225,
    "gelu": 1.7015043497085571,
    "gelu_exact": 1.7015043497085571,
    "glu": 1.8484294414520264,
    "leaky_relu": 1.70590341091156,
    "log_sigmoid": 1.9193484783172607,
    "log_softmax": 1.0002083778381348,
    "relu": 1.7139588594436646,
    "relu6": 1.7131484746932983,
    "selu": 1.0008515119552612,
    "sigmoid": 4.803835391998291,
    "silu": 1.7881293296813965,
    "soft_sign": 2.338853120803833,
    "softplus": 1.9203323125839233,
    "tanh": 1.5939117670059204,
}

BASE_WIDTHS = (256, 512, 1536, 1536)
PLUS_WIDTHS = (384, 768, 2048, 2048)  # DM base.py "Minor variants FN+, slightly wider"; F4+ in N A.5
STAGE_STRIDES = (1, 2, 2, 2)


@dataclasses.dataclass(frozen=True)
class NFNetConfig:
    """Architecture hyper-parameters of one NFNet (names follow DM nfnet.py)."""

    depths: tuple[int, int, int, int]  # blocks per stage
    widths: tuple[int, int, int, int]  # block output channels per stage
    # Output channels of the first three stem convs; the fourth has widths[0] // 2 (DM `ch = width_pattern[0] // 2`).
    stem_widths: tuple[int, int, int] = (16, 32, 64)
    group_size: int = 128  # channels per group of the 3x3 convs
    expansion: float = 0.5  # bottleneck width = expansion * block output width, rounded down to group_size
    se_ratio: float = 0.5
    alpha: float = 0.2
    final_conv_mult: int = 2  # head 1x1 conv to final_conv_mult x widths[-1] channels
    drop_rate: float = 0.2  # dropout on the pooled features
    # Bottleneck width of stage 1 when not None, instead of the code's rounding (one group of this width if it is
    # smaller than 2 * group_size). 192 reproduces the paper's F4+ (527M / 367B, docs/paper-notes.md).
    stage1_mid: int | None = None

    def __post_init__(self) -> None:
        if len(self.depths) != 4 or len(self.widths) != 4 or min(self.depths) < 1:
            raise ValueError(f"need 4 stages of >= 1 block, got depths={self.depths} widths={self.widths}")
        for w in self.widths:
            if int(w * self.expansion) < self.group_size:
                raise ValueError(f"width {w} x expansion {self.expansion} is below one group of {self.group_size}")

    @property
    def stem_out(self) -> int:
        return self.widths[0] // 2

    @property
    def num_blocks(self) -> int:
        return sum(self.depths)

    @property
    def num_features(self) -> int:
        return int(self.final_conv_mult * self.widths[-1])


@dataclasses.dataclass(frozen=True)
class BlockPlan:
    """One NFBlock, as DM nfnet.py constructs it."""

    stage: int
    index: int  # index within the stage
    in_ch: int
    out_ch: int
    mid: int  # bottleneck width (a multiple of the group width)
    groups: int
    stride: int
    beta: float  # 1 / expected std of the block input
    depth_fraction: float  # overall block index / number of blocks: stochastic-depth rate multiplier
    se_hidden: int

    @property
    def use_projection(self) -> bool:
        return self.stride > 1 or self.in_ch != self.out_ch


def bottleneck(config: NFNetConfig, stage: int) -> tuple[int, int]:
    """(mid width, groups) of the 3x3 convs of a stage: DM `width // group_size` groups of `group_size`."""
    if stage == 0 and config.stage1_mid is not None:
        groups = max(1, config.stage1_mid // config.group_size)
        if config.stage1_mid % groups:
            raise ValueError(f"stage1_mid {config.stage1_mid} does not split into {groups} equal groups")
        return config.stage1_mid, groups
    groups = int(config.widths[stage] * config.expansion) // config.group_size
    return groups * config.group_size, groups


def block_plan(config: NFNetConfig) -> list[BlockPlan]:
    """All blocks in order, with the signal-propagation constants of DM nfnet.py (Brock et al. 2021 §3, App. C)."""
    plan = []
    ch = config.stem_out
    expected_std = 1.0
    index = 0
    for stage, (width, depth, stride) in enumerate(zip(config.widths, config.depths, STAGE_STRIDES, strict=True)):
        mid, groups = bottleneck(config, stage)
        for block in range(depth):
            plan.append(
                BlockPlan(
                    stage=stage,
                    index=block,
                    in_ch=ch,
                    out_ch=width,
                    mid=mid,
                    groups=groups,
                    stride=stride if block == 0 else 1,
                    beta=1.0 / expected_std,
                    depth_fraction=index / config.num_blocks,
                    se_hidden=max(1, int(width * config.se_ratio)),
                )
            )
            ch = width
            index += 1
            if block == 0:  # transition blocks reset the variance, but still give it one block of growth
                expected_std = 1.0
            expected_std = math.sqrt(expected_std**2 + config.alpha**2)
    return plan


def _conv(prefix: str, kh: int, cin: int, cout: int, groups: int = 1) -> Iterator[tuple[str, tuple[int, ...]]]:
    yield f"{prefix}/kernel", (kh, kh, cin // groups, cout)
    yield f"{prefix}/gain", (cout,)
    yield f"{prefix}/bias", (cout,)


def param_shapes(config: NFNetConfig, num_classes: int) -> dict[str, tuple[int, ...]]:
    """Every parameter of the Flax model as '/'-joined path -> shape, in forward order."""
    shapes: dict[str, tuple[int, ...]] = {}
    ch = 3
    for i, out in enumerate((*config.stem_widths, config.stem_out)):
        shapes.update(_conv(f"stem/conv{i}", 3, ch, out))
        ch = out
    for b in block_plan(config):
        p = f"stage{b.stage}/block{b.index}"
        shapes.update(_conv(f"{p}/conv0", 1, b.in_ch, b.mid))
        shapes.update(_conv(f"{p}/conv1", 3, b.mid, b.mid, b.groups))
        shapes.update(_conv(f"{p}/conv1b", 3, b.mid, b.mid, b.groups))
        shapes.update(_conv(f"{p}/conv2", 1, b.mid, b.out_ch))
        if b.use_projection:
            shapes.update(_conv(f"{p}/conv_shortcut", 1, b.in_ch, b.out_ch))
        shapes[f"{p}/se/fc0/kernel"] = (b.out_ch, b.se_hidden)
        shapes[f"{p}/se/fc0/bias"] = (b.se_hidden,)
        shapes[f"{p}/se/fc1/kernel"] = (b.se_hidden, b.out_ch)
        shapes[f"{p}/se/fc1/bias"] = (b.out_ch,)
        shapes[f"{p}/skip_gain"] = ()
    shapes.update(_conv("final_conv", 1, config.widths[-1], config.num_features))
    shapes["fc/kernel"] = (config.num_features, num_classes)
    shapes["fc/bias"] = (num_classes,)
    return shapes


def count_params(config: NFNetConfig, num_classes: int) -> int:
    """Number of trainable parameters (weights, WS gains, biases, SE, skip gains, classifier)."""
    return sum(math.prod(s) for s in param_shapes(config, num_classes).values())


def _same(size: int, stride: int) -> int:
    return -(-size // stride)  # SAME padding: ceil(size / stride)


def count_macs(config: NFNetConfig, resolution: int, num_classes: int) -> int:
    """Forward multiply-accumulates for one square image, following DM ``count_flops``.

    Counted: every convolution and linear layer (SE on the pooled vector, the classifier). Not counted, as in DM:
    activations, biases, weight standardisation, pooling and the SE / residual multiply-adds.
    """
    h = w = resolution
    macs = 0
    ch = 3
    for out, stride in zip((*config.stem_widths, config.stem_out), (2, 1, 1, 2), strict=True):
        h, w = _same(h, stride), _same(w, stride)
        macs += h * w * out * 9 * ch
        ch = out
    for b in block_plan(config):
        macs += h * w * b.mid * b.in_ch  # conv0, at the input resolution
        h, w = _same(h, b.stride), _same(w, b.stride)
        macs += 2 * h * w * b.mid * 9 * (b.mid // b.groups)  # conv1 (strided) and conv1b
        macs += h * w * b.out_ch * b.mid  # conv2
        if b.use_projection:
            macs += h * w * b.out_ch * b.in_ch  # conv_shortcut after the average pool
        macs += 2 * b.se_hidden * b.out_ch
    macs += h * w * config.num_features * config.widths[-1]
    macs += config.num_features * num_classes
    return macs


# ---------------------------------------------------------------------------------------------------------------------
# The variant table (Brock et al. 2021 Table 1; DM base.py nfnet_params). "+" variants keep depth, dropout and
# resolutions.


@dataclasses.dataclass(frozen=True)
class Variant:
    """A registered NFNet: its architecture, default resolutions and registry metadata."""

    name: str
    config: NFNetConfig
    train_resolution: int
    eval_resolution: int
    description: str
    tags: tuple[str, ...] = ()
    timm_name: str | None = None  # timm model whose state dict import_weights accepts

    @property
    def plus(self) -> bool:
        return self.config.widths == PLUS_WIDTHS

    def count(self, resolution: int, num_classes: int) -> tuple[int, int]:
        """(params, MACs) at ``resolution`` with a ``num_classes`` head."""
        return count_params(self.config, num_classes), count_macs(self.config, resolution, num_classes)


# name: (depth multiplier, dropout, train px, test px)
_F = {
    "f0": (1, 0.2, 192, 256),
    "f1": (2, 0.3, 224, 320),
    "f2": (3, 0.4, 256, 352),
    "f3": (4, 0.4, 320, 416),
    "f4": (5, 0.5, 384, 512),
    "f5": (6, 0.5, 416, 544),
    "f6": (7, 0.5, 448, 576),
    "f7": (8, 0.5, 480, 608),
}
_F0_DEPTHS = (1, 2, 6, 3)


def _paper_variants() -> list[Variant]:
    out = []
    for key, (mult, drop, train_px, test_px) in _F.items():
        depths = tuple(d * mult for d in _F0_DEPTHS)
        n = int(key[1:])
        base = NFNetConfig(depths=depths, widths=BASE_WIDTHS, drop_rate=drop)  # type: ignore[arg-type]
        plus = dataclasses.replace(base, widths=PLUS_WIDTHS)
        out.append(
            Variant(
                f"nfnet-{key}",
                base,
                train_px,
                test_px,
                f"NFNet-{key.upper()} (Brock et al. 2021), depths {list(depths)}",
                ("paper",),
                timm_name=f"dm_nfnet_{key}" if n <= 6 else None,
            )
        )
        out.append(
            Variant(
                f"nfnet-{key}+",
                plus,
                train_px,
                test_px,
                f"NFNet-{key.upper()}+ (wider {list(PLUS_WIDTHS)}), depths {list(depths)}",
                ("paper",),
            )
        )
    return out


# The laptop ladder: the NFNet block structure (stem, bottlenecks with two grouped 3x3 convs, SE, transitions, head)
# at 1/16 .. 1/2 of the F-series width (group width scaled alike; stem widths too, but never below 4 channels),
# depths from one block per stage up to F1's. Width and depth grow together, as from F0 to F7+, so each rung costs
# ~2-3x the previous one and the ladder spans 120x in MACs at 32 px (timings: see the package docstring).
# name: (width divisor, depths)
_LADDER = {
    "nfnet-tiny-l0": (16, (1, 1, 1, 1)),
    "nfnet-tiny-l1": (16, (1, 2, 6, 3)),
    "nfnet-tiny-l2": (8, (1, 2, 2, 1)),
    "nfnet-tiny-l3": (8, (2, 4, 12, 6)),
    "nfnet-tiny-l4": (4, (1, 2, 6, 3)),
    "nfnet-tiny-l5": (4, (2, 4, 12, 6)),
    "nfnet-tiny-l6": (2, (1, 2, 6, 3)),
}


def scaled_config(divisor: int, depths: tuple[int, int, int, int], drop_rate: float = 0.0) -> NFNetConfig:
    """The F-series architecture at 1/``divisor`` width: stage, stem and group widths all divided."""
    return NFNetConfig(
        depths=depths,
        widths=tuple(w // divisor for w in BASE_WIDTHS),  # type: ignore[arg-type]
        stem_widths=tuple(max(4, w // divisor) for w in (16, 32, 64)),  # type: ignore[arg-type]
        group_size=128 // divisor,
        drop_rate=drop_rate,
    )


# The width ladder: one depth, (1, 2, 2, 1), and widths doubling from 1/32 to 1/2 of the F-series, so model size is a
# single axis (each rung has ~4x the non-head parameters and MACs of the previous one) and a scaling study's size
# contrast is not confounded with depth. nfnet-w8 is the same network as nfnet-tiny-l2.
WIDTH_LADDER_DEPTHS = (1, 2, 2, 1)
_WIDTH_LADDER = {f"nfnet-w{divisor}": divisor for divisor in (64, 32, 16, 8, 4, 2)}


def _ladder_variants() -> list[Variant]:
    out = []
    for name, (divisor, depths) in _LADDER.items():
        out.append(
            Variant(
                name,
                scaled_config(divisor, depths),
                32,
                32,
                f"NFNet at 1/{divisor} width, depths {list(depths)} (laptop scaling ladder)",
                ("ladder",),
            )
        )
    for name, divisor in _WIDTH_LADDER.items():
        out.append(
            Variant(
                name,
                scaled_config(divisor, WIDTH_LADDER_DEPTHS),
                32,
                32,
                f"NFNet at 1/{divisor} width, depths {list(WIDTH_LADDER_DEPTHS)} (width-only laptop ladder)",
                ("ladder", "width"),
            )
        )
    return out


TEST_VARIANT = Variant(
    "nfnet-test",
    NFNetConfig(
        depths=(1, 1, 1, 1),
        widths=(16, 32, 48, 48),
        stem_widths=(4, 8, 8),
        group_size=8,
        drop_rate=0.1,
    ),
    32,
    32,
    "tiny NFNet for tests: full block structure at 16-48 channels",
    ("tiny",),
)

VARIANTS: dict[str, Variant] = {v.name: v for v in (*_paper_variants(), *_ladder_variants(), TEST_VARIANT)}
