"""RandAugment (Cubuk et al. 2020) on uint8 images with PIL, as used by the NFNet fine-tuning recipe.

NFNets fine-tune with 4 RandAugment layers at magnitude 5-15 (Brock et al. 2021 A.3; the DeepMind reference uses the
TF ``autoaugment.py`` op list). We keep that op list and its magnitude scale (level / 10, so magnitudes above 10, as in
NFNet-F7, extrapolate), with two deliberate deviations taken from timm: posterize and solarize get *stronger* as the
magnitude grows (the TF level maps make them weaker, e.g. posterize to 0 bits = a black image), and translation and
cutout sizes are fractions of the image side instead of pixels at 224 px, so the ops mean the same at 32 px.
Every random choice is read from the uniforms given by the caller (see :func:`convscale_cli.data.augment.uniforms`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

_FILL = (128, 128, 128)


def _pil(image: np.ndarray):  # noqa: ANN202 (PIL type kept out of the signature: PIL is imported lazily)
    from PIL import Image

    return Image.fromarray(image)


def _affine(image: np.ndarray, matrix: tuple[float, ...]) -> np.ndarray:
    from PIL import Image

    return np.asarray(_pil(image).transform(image.shape[1::-1], Image.AFFINE, matrix, Image.BILINEAR, fillcolor=_FILL))


def _enhance(kind: str) -> Callable[[np.ndarray, float, float], np.ndarray]:
    def op(image: np.ndarray, m: float, sign: float) -> np.ndarray:
        from PIL import ImageEnhance

        # TF level map: factor = 0.1 + 1.8 m / 10, i.e. [0.1, 1.9] over magnitudes 0-10.
        factor = max(0.0, 0.1 + 1.8 * m / 10)
        return np.asarray(getattr(ImageEnhance, kind)(_pil(image)).enhance(factor))

    return op


def _identity(image: np.ndarray, m: float, sign: float) -> np.ndarray:
    return image


def _auto_contrast(image: np.ndarray, m: float, sign: float) -> np.ndarray:
    from PIL import ImageOps

    return np.asarray(ImageOps.autocontrast(_pil(image)))


def _equalize(image: np.ndarray, m: float, sign: float) -> np.ndarray:
    from PIL import ImageOps

    return np.asarray(ImageOps.equalize(_pil(image)))


def _invert(image: np.ndarray, m: float, sign: float) -> np.ndarray:
    return 255 - image


def _rotate(image: np.ndarray, m: float, sign: float) -> np.ndarray:
    from PIL import Image

    return np.asarray(_pil(image).rotate(sign * 30.0 * m / 10, resample=Image.BILINEAR, fillcolor=_FILL))


def _posterize(image: np.ndarray, m: float, sign: float) -> np.ndarray:
    bits = int(np.clip(8 - round(4 * m / 10), 1, 8))
    mask = np.uint8((0xFF << (8 - bits)) & 0xFF)
    return image & mask


def _solarize(image: np.ndarray, m: float, sign: float) -> np.ndarray:
    threshold = int(np.clip(256 - 256 * m / 10, 0, 256))
    return np.where(image >= threshold, 255 - image, image).astype(np.uint8)


def _solarize_add(image: np.ndarray, m: float, sign: float) -> np.ndarray:
    added = np.clip(image.astype(np.int16) + int(110 * m / 10), 0, 255).astype(np.uint8)
    return np.where(image < 128, added, image)


def _shear(axis: int) -> Callable[[np.ndarray, float, float], np.ndarray]:
    def op(image: np.ndarray, m: float, sign: float) -> np.ndarray:
        shear = sign * 0.3 * m / 10
        return _affine(image, (1, shear, 0, 0, 1, 0) if axis == 0 else (1, 0, 0, shear, 1, 0))

    return op


def _translate(axis: int) -> Callable[[np.ndarray, float, float], np.ndarray]:
    def op(image: np.ndarray, m: float, sign: float) -> np.ndarray:
        # 0.45 of the side at magnitude 10 (timm's translate_pct), i.e. ~100 px at 224 as in the TF reference.
        shift = sign * 0.45 * m / 10 * image.shape[1 - axis]
        return _affine(image, (1, 0, shift, 0, 1, 0) if axis == 0 else (1, 0, 0, 0, 1, shift))

    return op


def _cutout(image: np.ndarray, m: float, sign: float, centre: tuple[float, float] = (0.5, 0.5)) -> np.ndarray:
    height, width = image.shape[:2]
    # TF: a grey square of half-side 40 px * m / 10 at 224 px; here as a fraction of the shorter side.
    half = int(round(40 / 224 * m / 10 * min(height, width)))
    cy, cx = int(centre[0] * height), int(centre[1] * width)
    out = image.copy()
    out[max(0, cy - half) : cy + half, max(0, cx - half) : cx + half] = _FILL
    return out


OPS: dict[str, Callable[..., np.ndarray]] = {
    "Identity": _identity,
    "AutoContrast": _auto_contrast,
    "Equalize": _equalize,
    "Invert": _invert,
    "Rotate": _rotate,
    "Posterize": _posterize,
    "Solarize": _solarize,
    "SolarizeAdd": _solarize_add,
    "Color": _enhance("Color"),
    "Contrast": _enhance("Contrast"),
    "Brightness": _enhance("Brightness"),
    "Sharpness": _enhance("Sharpness"),
    "ShearX": _shear(0),
    "ShearY": _shear(1),
    "TranslateX": _translate(0),
    "TranslateY": _translate(1),
    "Cutout": _cutout,
}
_NAMES = tuple(OPS)
UNIFORMS_PER_LAYER = 4


def rand_augment(image: np.ndarray, u: np.ndarray, layers: int, magnitude: float) -> np.ndarray:
    """Apply ``layers`` ops chosen uniformly from :data:`OPS`, each at ``magnitude`` (0-10 scale, may exceed 10).

    Args:
        image: uint8 ``[H, W, 3]``.
        u: at least ``4 * layers`` uniforms in [0, 1): op choice, sign (geometric ops), cutout row and column.
        layers: number of ops applied in sequence (NFNet: 4).
        magnitude: strength of every op.
    """
    for layer in range(layers):
        pick, sign_u, row, col = u[UNIFORMS_PER_LAYER * layer : UNIFORMS_PER_LAYER * (layer + 1)]
        name = _NAMES[min(int(pick * len(_NAMES)), len(_NAMES) - 1)]
        sign = 1.0 if sign_u < 0.5 else -1.0
        if name == "Cutout":
            image = _cutout(image, magnitude, sign, (row, col))
        else:
            image = OPS[name](image, magnitude, sign)
    return np.ascontiguousarray(image, dtype=np.uint8)
