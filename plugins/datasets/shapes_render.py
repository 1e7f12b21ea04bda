"""Vectorised numpy renderer behind the ``shapes`` dataset (kept apart from the plugin module to stay readable).

An image is fully determined by ``(seed, split, index)``: every random choice comes from one
``numpy.random.Generator`` seeded with that triple, so any worker can render any example in any order and a resumed
run sees bit-identical pixels. Each object is rendered only inside its bounding box, with a one-pixel anti-aliased edge
computed from a polar "boundary radius" function, which keeps generation at well over 5k images/s per core at 32 px.
"""

from __future__ import annotations

import colorsys
import functools
import math

import numpy as np

# Class factors (the label is their product). Shapes are chosen so that neighbours differ by fine detail at 32 px
# (pentagon vs hexagon vs disk), which keeps tiny models improving long after they have learned colour and layout.
SHAPES = ("disk", "ring", "triangle", "square", "pentagon", "hexagon", "star", "cross", "crescent", "ellipse")
# Hue centres in [0, 1); jitter of +-0.045 makes neighbouring hues overlap slightly (irreducible confusion).
COLOURS = {"red": 0.0, "orange": 0.083, "yellow": 0.16, "green": 0.33, "cyan": 0.5, "blue": 0.64, "purple": 0.78}
TEXTURES = ("solid", "stripes", "checker")
LAYOUTS = ("single", "pair")
HUE_JITTER = 0.045

_NUM_UNIFORMS = 96
_MAX_DISTRACTORS = 4
# Poisson(1.6) cumulative probabilities for the number of distractors, inverted with one uniform (cheaper than a
# second generator call in the hot path).
_DISTRACTOR_CDF = np.cumsum([math.exp(-1.6) * 1.6**k / math.factorial(k) for k in range(_MAX_DISTRACTORS)])
_HUES = tuple(COLOURS.values())
_POLYGONS = {"triangle": 3, "square": 4, "pentagon": 5, "hexagon": 6}
_clip = np._core.umath.clip  # the ufunc: np.clip's Python wrapper costs more than the work on a 32x32 array


@functools.lru_cache(maxsize=1)
def _noise_bank() -> np.ndarray:
    # Gaussian sensor noise is read from a fixed bank at a random offset: drawing 3k normals per image would cost
    # more than rendering the whole scene. Offsets are uniform over 4M values, so images never share a noise field
    # in a way a model could exploit.
    return np.random.default_rng(20231026).standard_normal(1 << 22, dtype=np.float32)


def num_classes() -> int:
    """Number of classes: shape x colour x texture x layout."""
    return len(SHAPES) * len(COLOURS) * len(TEXTURES) * len(LAYOUTS)


def class_index(shape: int, colour: int, texture: int, layout: int) -> int:
    """Class id of a factor combination (layout varies fastest)."""
    return ((shape * len(COLOURS) + colour) * len(TEXTURES) + texture) * len(LAYOUTS) + layout


def class_factors(label: int) -> tuple[int, int, int, int]:
    """Inverse of :func:`class_index`: ``(shape, colour, texture, layout)``."""
    label, layout = divmod(label, len(LAYOUTS))
    label, texture = divmod(label, len(TEXTURES))
    shape, colour = divmod(label, len(COLOURS))
    return shape, colour, texture, layout


def class_name(label: int) -> str:
    """Readable class name, e.g. ``red-striped-star-pair``."""
    shape, colour, texture, layout = class_factors(label)
    return f"{list(COLOURS)[colour]}-{TEXTURES[texture]}-{SHAPES[shape]}-{LAYOUTS[layout]}"


@functools.lru_cache(maxsize=8)
def _grid(resolution: int) -> tuple[np.ndarray, np.ndarray]:
    # Pixel centres in units of the image side, so geometry is resolution independent.
    coords = (np.arange(resolution, dtype=np.float32) + 0.5) / resolution
    return coords[:, None], coords[None, :]


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


def _boundary(shape: int, z: np.ndarray) -> np.ndarray:
    """Margin (in units of the object radius) of local coordinates ``z = x + iy``: positive inside the shape."""
    name = SHAPES[shape]
    if name == "disk":
        return 1.0 - np.abs(z)
    if name == "ring":
        return 0.22 - np.abs(np.abs(z) - 0.72)
    if name in _POLYGONS:
        sector = 2 * math.pi / _POLYGONS[name]
        # Regular n-gon with circumradius 1: boundary radius cos(pi/n) / cos(theta mod sector - pi/n).
        limit = math.cos(sector / 2) / np.cos(np.mod(np.angle(z), sector) - sector / 2)
        return limit - np.abs(z)
    if name == "star":
        return 0.62 + 0.38 * np.cos(5 * np.angle(z)) - np.abs(z)
    if name == "cross":
        ax, ay = np.abs(z.real), np.abs(z.imag)
        arm = 0.32
        return np.maximum(np.minimum(arm - ax, 1.0 - ay), np.minimum(arm - ay, 1.0 - ax))
    if name == "crescent":
        return np.minimum(1.0 - np.abs(z), np.abs(z - 0.45) - 0.78)
    # ellipse with axis ratio 0.55
    return 1.0 - np.abs(z.real + 1j * (z.imag * (1 / 0.55)))


def _object_layer(
    resolution: int,
    shape: int,
    cx: float,
    cy: float,
    radius: float,
    angle: float,
) -> tuple[slice, slice, np.ndarray, np.ndarray]:
    """Anti-aliased coverage of one object inside its bounding box, and the local (rotated, radius-unit) coordinates.

    Local coordinates are one complex array (x + iy): rotation, radius and angle are then one ufunc each, which
    matters because per-call overhead, not arithmetic, dominates on a 10x10 pixel box.
    """
    ys, xs = _grid(resolution)
    pad = 1.5 / resolution
    y0 = max(0, int((cy - radius - pad) * resolution))
    y1 = min(resolution, int(math.ceil((cy + radius + pad) * resolution)))
    x0 = max(0, int((cx - radius - pad) * resolution))
    x1 = min(resolution, int(math.ceil((cx + radius + pad) * resolution)))
    rotation = complex(math.cos(angle), -math.sin(angle)) / radius
    z = ((xs[:, x0:x1] - cx) + 1j * (ys[y0:y1] - cy)) * rotation
    margin = _boundary(shape, z)
    # margin is in radius units; convert to pixels for a one-pixel soft edge.
    coverage = _clip(margin * (radius * resolution) + 0.5, 0.0, 1.0)
    return slice(y0, y1), slice(x0, x1), coverage, z


def _paint(
    canvas: np.ndarray,
    u: np.ndarray,
    shape: int,
    hue: float,
    texture: int,
    cx: float,
    cy: float,
    radius: float,
) -> None:
    """Draw one textured object onto ``canvas`` (float32 [H, W, 3] in [0, 1]) in place. ``u``: 6 uniforms."""
    resolution = canvas.shape[0]
    rows, cols, coverage, z = _object_layer(resolution, shape, cx, cy, radius, 2 * math.pi * u[0])
    if coverage.size == 0:
        return
    base = _hsv_to_rgb(hue, 0.65 + 0.35 * u[1], 0.55 + 0.45 * u[2])
    region = canvas[rows, cols]
    if TEXTURES[texture] == "solid":
        region += coverage[..., None] * (base - region)
        return
    # Texture period of ~3.5-5.5 px whatever the resolution, so it stays visible at 32 px.
    freq = 2 * math.pi * resolution * radius / (3.5 + 2.0 * u[3])
    if TEXTURES[texture] == "stripes":
        phase = (z * complex(math.cos(math.pi * u[4]), -math.sin(math.pi * u[4]))).real
        on = np.sin(phase * freq) > 0
    else:
        on = np.sin(z.real * freq) * np.sin(z.imag * freq) > 0
    # Dark cells use a darker shade of the same hue, so texture never changes the colour class.
    shade = np.where(on, np.float32(1.0), np.float32(0.25 + 0.2 * u[5]))
    region += coverage[..., None] * (shade[..., None] * base - region)


def render(
    seed: int, split: int, index: int, resolution: int, clutter: float = 1.0
) -> tuple[np.ndarray, int, list[int]]:
    """Render one example.

    Args:
        seed: dataset seed (a different seed is a different dataset).
        split: 0 for train, 1 for eval; part of the RNG key so the splits never share an image.
        index: example index within the split.
        resolution: image side in pixels.
        clutter: scales the number of distractors, occlusion and noise (0 = clean, 1 = default difficulty).

    Returns:
        ``(image uint8[H, W, 3], label, present)`` where ``present`` lists the classes of every visible object
        (the main class first) for the multi-label mode.
    """
    # One generator call per image: every random choice below is a slot of `u` (fixed slot layout, so changing one
    # factor's distribution never shifts the others).
    u = np.random.Generator(np.random.PCG64((seed, split, index))).random(_NUM_UNIFORMS)
    label = int(u[95] * num_classes())
    shape, colour, texture, layout = class_factors(label)
    hue = _HUES[colour] + HUE_JITTER * (2 * u[0] - 1)

    # Background: a random two-colour gradient, dim and desaturated so objects are usually (not always) salient.
    ys, xs = _grid(resolution)
    bg_a = _hsv_to_rgb(u[1], 0.5 * u[2], 0.2 + 0.6 * u[3])
    bg_b = _hsv_to_rgb(u[4], 0.5 * u[5], 0.2 + 0.6 * u[6])
    phi = 2 * math.pi * u[7]
    ramp = _clip((xs - 0.5) * math.cos(phi) + ((ys - 0.5) * math.sin(phi) + 0.5), 0.0, 1.0)[..., None]
    canvas = ramp * (bg_b - bg_a) + bg_a

    present = [label]
    # Distractors: smaller objects of random classes, some behind and some in front of the main object(s).
    num_distractors = int(np.searchsorted(_DISTRACTOR_CDF, u[42] ** (1.0 / clutter))) if clutter > 0 else 0
    behind, front = [], []
    for k in range(num_distractors):
        du = u[44 + 12 * k : 56 + 12 * k]
        d_label = int(du[8] * num_classes())
        d_shape, d_colour, d_texture, _ = class_factors(d_label)
        d_hue = _HUES[d_colour] + HUE_JITTER * (2 * du[9] - 1)
        d_radius = 0.07 + 0.07 * du[10]
        d_pos = (0.05 + 0.9 * du[11], 0.05 + 0.9 * du[6])
        (front if du[7] < 0.3 else behind).append((du, d_shape, d_hue, d_texture, d_pos, d_radius))
        present.append(class_index(d_shape, d_colour, d_texture, 0))
    for du, d_shape, d_hue, d_texture, d_pos, d_radius in behind:
        _paint(canvas, du, d_shape, d_hue, d_texture, d_pos[0], d_pos[1], d_radius)

    # Main object(s): one large, or two equal copies side by side (the "layout" factor); positions keep them mostly
    # inside the central crop so random-resized crops rarely remove them.
    if LAYOUTS[layout] == "single":
        radius = 0.2 + 0.12 * u[8]
        centres = [(0.35 + 0.3 * u[9], 0.35 + 0.3 * u[10])]
    else:
        radius = 0.13 + 0.06 * u[8]
        angle = 2 * math.pi * u[9]
        sep = radius * (1.1 + 0.35 * u[10])
        mx, my = 0.4 + 0.2 * u[11], 0.4 + 0.2 * u[12]
        dx, dy = sep * math.cos(angle), sep * math.sin(angle)
        centres = [(mx + dx, my + dy), (mx - dx, my - dy)]
    for i, (cx, cy) in enumerate(centres):
        _paint(canvas, u[16 + 8 * i : 24 + 8 * i], shape, hue, texture, cx, cy, radius)
    for du, d_shape, d_hue, d_texture, d_pos, d_radius in front:
        _paint(canvas, du, d_shape, d_hue, d_texture, d_pos[0], d_pos[1], d_radius)

    # Occluder: a random bar across the image, covering part of the scene.
    if u[32] < 0.35 * clutter:
        bar = _hsv_to_rgb(u[33], 0.3 * u[34], 0.15 + 0.7 * u[35])
        theta = math.pi * u[36]
        offset = xs * math.cos(theta) + (
            ys * math.sin(theta) - 0.5 * (math.cos(theta) + math.sin(theta)) - (u[37] - 0.5) * 0.6
        )
        width = (0.04 + 0.06 * u[38]) * resolution
        alpha = _clip(np.abs(offset) * -resolution + (width / 2 + 0.5), 0.0, 1.0)[..., None]
        canvas += alpha * (bar - canvas)

    # Global illumination change and sensor noise.
    gain = np.float32(255.0 * (0.7 + 0.6 * u[40]))
    sigma = 0.09 * clutter * u[41]
    canvas *= gain
    if sigma > 0:
        bank = _noise_bank()
        start = int(u[43] * (bank.size - canvas.size))
        canvas += bank[start : start + canvas.size].reshape(canvas.shape) * np.float32(255.0 * sigma)
    canvas += 0.5
    image = _clip(canvas, 0.0, 255.0).astype(np.uint8)
    return image, label, present
