"""The built-in ``shapes`` and ``digits`` dataset plugins."""

from __future__ import annotations

import numpy as np
import pytest
from convscale_plugins.datasets import digits, shapes
from convscale_plugins.datasets import shapes_render as render

from convscale_cli.errors import DataError, UsageError
from convscale_cli.plugins import get_registry


def test_builtin_datasets_register_through_entry_points():
    registry = get_registry()
    for name in ("shapes", "digits"):
        spec = registry.dataset(name)
        assert registry.datasets.owner(name) == name
        assert spec.static_info is not None and spec.static_info.num_classes >= 10


def test_shapes_class_table_is_compositional():
    assert shapes.NUM_CLASSES == render.num_classes() >= 100
    for label in (0, 1, 137, shapes.NUM_CLASSES - 1):
        assert render.class_index(*render.class_factors(label)) == label
    assert render.class_name(0) == "red-solid-disk-single"


def test_shapes_is_deterministic_and_splits_never_share_an_image():
    train = shapes.open_split("train", size=1000)
    again = shapes.open_split("train", size=1000)
    evals = shapes.open_split("eval", eval_size=50)
    a, b = train[7], again[7]
    np.testing.assert_array_equal(a["image"], b["image"])
    assert a["label"] == b["label"] and a["id"] == 7
    assert a["image"].dtype == np.uint8 and a["image"].shape == (32, 32, 3)
    train_images = {train[i]["image"].tobytes() for i in range(50)}
    assert not train_images & {evals[i]["image"].tobytes() for i in range(50)}
    assert len(train_images) == 50
    other_seed = shapes.open_split("train", size=1000, seed=1)
    assert not np.array_equal(other_seed[7]["image"], a["image"])


def test_shapes_labels_cover_the_classes_and_resolution_is_an_option():
    source = shapes.open_split("train", size=100_000, resolution=20)
    labels = [source[i]["label"] for i in range(3000)]
    # 3000 uniform draws over 420 classes leave ~0.03% of classes unseen on average.
    assert len(set(labels)) > 400
    assert source[0]["image"].shape == (20, 20, 3)
    info = shapes.info(size=100_000)
    assert info.split_sizes == {"train": 100_000, "eval": 10_000} and info.num_classes == 420


def test_shapes_multi_label_mode_marks_every_object():
    source = shapes.open_split("train", multi_label=True)
    single = shapes.open_split("train")
    for i in range(20):
        hot = source[i]["label"]
        assert hot.dtype == np.float32 and hot.shape == (420,)
        assert hot[single[i]["label"]] == 1.0
        assert 1 <= hot.sum() <= 5
    assert shapes.info(multi_label=True).multi_label


def test_shapes_coarser_classes_merge_factors_of_the_same_images():
    full = shapes.open_split("train", size=2000)
    coarse = {k: shapes.open_split("train", size=2000, classes=k) for k in (210, 70, 10)}
    seen = {k: set() for k in coarse}
    for i in range(600):
        shape, colour, texture, _ = render.class_factors(full[i]["label"])
        expected = {210: (shape * 7 + colour) * 3 + texture, 70: shape * 7 + colour, 10: shape}
        for k, source in coarse.items():
            item = source[i]
            np.testing.assert_array_equal(item["image"], full[i]["image"])  # only the label changes
            assert item["label"] == expected[k]
            seen[k].add(item["label"])
    assert seen[70] == set(range(70)) and seen[10] == set(range(10))
    assert shapes.info(classes=70).num_classes == 70
    hot = shapes.open_split("train", size=2000, classes=70, multi_label=True)[5]["label"]
    assert hot.shape == (70,) and hot[coarse[70][5]["label"]] == 1.0


def test_shapes_small_split_is_rendered_once_and_reads_back_the_same_bytes(monkeypatch):
    calls = []
    real = render.render

    def counting(*args, **kwargs):
        calls.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(render, "render", counting)
    shapes.clear_cache()
    fresh = [real(0, 0, i, 32, 0.5)[0] for i in range(40)]
    source = shapes.open_split("train", size=40, clutter=0.5)
    for i in range(40):
        source[i]["image"][:] = 0  # a caller writing into its batch must not corrupt the cache
        source[i]["image"][:] = 0  # (the second read comes from the cache)
    again = [shapes.open_split("train", size=40, clutter=0.5)[i]["image"] for i in range(40)]
    assert sorted(calls) == list(range(40))  # every image rendered exactly once across two sources
    for image, expected in zip(again, fresh, strict=True):
        np.testing.assert_array_equal(image, expected)
    # A split over the memory bound is rendered on every read, as before.
    monkeypatch.setattr(shapes, "CACHE_BYTES", 39 * 32 * 32 * 3)
    calls.clear()
    big = shapes.open_split("train", size=40, seed=3)
    big[1], big[1]
    assert calls == [1, 1]


def test_shapes_clutter_zero_gives_clean_images():
    clean = shapes.open_split("train", clutter=0.0)[3]["image"]
    noisy = shapes.open_split("train", clutter=1.0)[3]["image"]
    assert not np.array_equal(clean, noisy)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"size": 0}, DataError, "size=0"),
        ({"resolution": 4}, DataError, "resolution=4"),
        ({"colour": 1}, UsageError, "unknown shapes option 'colour'"),
        ({"clutter": 9}, DataError, "clutter=9"),
        ({"classes": 71}, DataError, "classes=71 is not a label space: choose from 420, 210, 70, 10"),
        ({"classes": True}, DataError, "classes=True"),
    ],
)
def test_shapes_rejects_bad_options(options, error, match):
    with pytest.raises(error, match=match):
        shapes.open_split("train", **options)


def test_unknown_split_is_a_data_error():
    with pytest.raises(DataError, match="unknown split 'val'.*train, eval"):
        shapes.open_split("val")
    with pytest.raises(DataError, match="unknown split 'test'"):
        digits.open_split("test")


def test_digits_split_is_fixed_stratified_and_disjoint():
    train, evals = digits.open_split("train"), digits.open_split("eval", resolution=16)
    assert len(train) == digits.SPLIT_SIZES["train"] and len(evals) == digits.SPLIT_SIZES["eval"]
    assert len(train) + len(evals) == digits.TOTAL
    train_ids = {train[i]["id"] for i in range(len(train))}
    eval_ids = {evals[i]["id"] for i in range(len(evals))}
    assert not train_ids & eval_ids
    counts = np.bincount([evals[i]["label"] for i in range(len(evals))], minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38  # stratified: ~36 per class
    image = evals[0]["image"]
    assert image.shape == (16, 16, 3) and image.dtype == np.uint8
    assert (image[..., 0] == image[..., 1]).all() and image.max() > 200
    assert digits.info().split_sizes == digits.SPLIT_SIZES


def test_digits_rejects_unknown_options():
    with pytest.raises(UsageError, match="unknown digits option 'size'"):
        digits.open_split("train", size=3)
