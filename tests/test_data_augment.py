"""Host-side augmentation: counter-based uniforms, inception crops, RandAugment ops, evaluation crops, config checks."""

from __future__ import annotations

import numpy as np
import pytest

from convscale_cli.data.augment import (
    NUM_UNIFORMS,
    AugmentConfig,
    augment_from_dict,
    eval_transform,
    inception_crop_box,
    train_transform,
    uniforms,
)
from convscale_cli.data.randaugment import OPS, rand_augment
from convscale_cli.errors import UsageError

IMAGE = (np.random.default_rng(0).random((24, 30, 3)) * 255).astype(np.uint8)


def test_uniforms_are_counter_based():
    a = uniforms(3, np.array([5]))
    b = uniforms(3, np.array([1, 5, 9]))
    np.testing.assert_array_equal(a[0], b[1])  # a row depends only on (seed, position)
    assert a.shape == (1, NUM_UNIFORMS) and 0.0 <= b.min() and b.max() < 1.0
    assert not np.array_equal(uniforms(4, np.array([5])), a)
    many = uniforms(0, np.arange(2000))
    assert abs(many.mean() - 0.5) < 0.01 and abs(np.corrcoef(many[:, 0], many[:, 1])[0, 1]) < 0.05


def test_inception_crops_respect_area_and_aspect_bounds():
    cfg = AugmentConfig(min_area=0.2, max_area=0.6)
    areas = []
    for row in uniforms(1, np.arange(300)):
        left, top, right, bottom = inception_crop_box(100, 120, row, cfg)
        assert 0 <= left < right <= 120 and 0 <= top < bottom <= 100
        w, h = right - left, bottom - top
        areas.append(w * h / 12000)
        assert 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05
    assert 0.18 <= min(areas) and max(areas) <= 0.62
    # No crop of the requested shape fits a 1-pixel-high image: fall back to the central crop.
    assert inception_crop_box(1, 50, np.zeros(NUM_UNIFORMS), AugmentConfig(min_area=0.9)) == (24, 0, 25, 1)


def test_train_transform_flips_and_resizes():
    u = np.zeros(NUM_UNIFORMS)
    cfg = AugmentConfig(crop="resize")
    flipped = train_transform(IMAGE[:, :24], 24, u, cfg)  # flip slot 0.0 < 0.5: flipped, no resampling
    np.testing.assert_array_equal(flipped, IMAGE[:, :24][:, ::-1])
    kept = train_transform(IMAGE[:, :24], 24, np.full(NUM_UNIFORMS, 0.9), cfg)
    np.testing.assert_array_equal(kept, IMAGE[:, :24])
    out = train_transform(IMAGE[..., 0], 16, u, AugmentConfig())  # grey input becomes RGB
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8 and out.flags.c_contiguous


@pytest.mark.parametrize("name", sorted(OPS))
def test_every_randaugment_op_keeps_shape_and_type(name):
    out = OPS[name](IMAGE, 9.0, -1.0)
    assert out.shape == IMAGE.shape and out.dtype == np.uint8
    if name not in ("Identity",):
        assert not np.array_equal(out, IMAGE), f"{name} at magnitude 9 changed nothing"


def test_randaugment_magnitudes_mean_what_they_say():
    assert np.array_equal(OPS["Rotate"](IMAGE, 0.0, 1.0), IMAGE)
    assert (OPS["Posterize"](IMAGE, 10.0, 1.0) & 0x0F == 0).all()  # 4 bits kept at magnitude 10
    assert np.array_equal(OPS["Solarize"](IMAGE, 10.0, 1.0), 255 - IMAGE)
    u = uniforms(0, np.array([0]))[0]
    once = rand_augment(IMAGE, u, 4, 15.0)
    np.testing.assert_array_equal(once, rand_augment(IMAGE, u, 4, 15.0))
    assert once.shape == IMAGE.shape


def test_eval_transform_takes_the_central_crop():
    image = np.zeros((40, 60, 3), np.uint8)
    image[10:30, 20:40] = 200  # a bright central square, 20 px = half the shorter side
    out = eval_transform(image, 20, crop_fraction=0.5)
    assert out.shape == (20, 20, 3) and out[2:-2, 2:-2].min() > 180
    full = eval_transform(image, 40, crop_fraction=1.0)
    assert full[:, :5].max() < 30  # the left margin is outside the central square
    np.testing.assert_array_equal(eval_transform(image[:20, :20], 20, 1.0), image[:20, :20])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"crop": "random"}, "unknown crop mode 'random'"),
        ({"min_area": 0.0}, "crop areas"),
        ({"aspect_ratio": (2.0, 1.0)}, "aspect_ratio"),
        ({"randaugment_layers": 17}, "RandAugment layers"),
        ({"mixup_alpha": -1.0}, "mixup_alpha"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
        ({"repeats": 0}, "repeats"),
    ],
)
def test_augment_config_rejects_bad_values(kwargs, match):
    with pytest.raises(UsageError, match=match):
        AugmentConfig(**kwargs)


def test_augment_from_dict():
    cfg = augment_from_dict({"randaugment_layers": 4, "randaugment_magnitude": 5, "aspect_ratio": [0.5, 2]})
    assert cfg.randaugment_layers == 4 and cfg.aspect_ratio == (0.5, 2.0)
    assert augment_from_dict(None) == AugmentConfig()
    assert not AugmentConfig().mixes and AugmentConfig(label_smoothing=0.1).mixes
    with pytest.raises(UsageError, match="unknown augmentation option 'mixup'"):
        augment_from_dict({"mixup": 0.2})


def test_train_transform_applies_randaugment_when_configured():
    u = uniforms(2, np.array([7]))[0]
    plain = train_transform(IMAGE, 16, u, AugmentConfig())
    augmented = train_transform(IMAGE, 16, u, AugmentConfig(randaugment_layers=3, randaugment_magnitude=10))
    assert augmented.shape == plain.shape and not np.array_equal(augmented, plain)


@pytest.mark.parametrize(
    "cfg",
    [AugmentConfig(), AugmentConfig(crop="resize"), AugmentConfig(flip=False), AugmentConfig(randaugment_layers=2)],
    ids=["inception+flip", "resize", "no-flip", "randaugment"],
)
def test_a_pil_source_image_gives_the_same_pixels_as_its_array(cfg: AugmentConfig) -> None:
    """File sources hand over decoded PIL images (no numpy round trip); the transforms' output must not change."""
    from PIL import Image

    rgb, grey = Image.fromarray(IMAGE), Image.fromarray(IMAGE[..., 0])
    for position in range(8):
        u = uniforms(3, np.array([position]))[0]
        for resolution in (16, 24):
            want = train_transform(IMAGE, resolution, u, cfg)
            np.testing.assert_array_equal(train_transform(rgb, resolution, u, cfg), want)
            np.testing.assert_array_equal(
                train_transform(grey, resolution, u, cfg), train_transform(IMAGE[..., 0], resolution, u, cfg)
            )
    for resolution, fraction in ((16, 0.875), (24, 1.0), (20, 1.0)):
        np.testing.assert_array_equal(
            eval_transform(rgb, resolution, fraction), eval_transform(IMAGE, resolution, fraction)
        )
    square = IMAGE[:, :24]  # the no-resampling shortcut: a full-image crop already at the output size
    u = uniforms(3, np.array([0]))[0]
    np.testing.assert_array_equal(
        train_transform(Image.fromarray(square), 24, u, cfg), train_transform(square, 24, u, cfg)
    )
    np.testing.assert_array_equal(eval_transform(Image.fromarray(square), 24, 1.0), square)
