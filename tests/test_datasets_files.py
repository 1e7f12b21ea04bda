"""``imagefolder`` and ``arrayrecord`` datasets, and ``convscale data convert`` between them."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from convscale_plugins.datasets import arrayrecord, imagefolder
from PIL import Image
from typer.testing import CliRunner

from convscale_cli.cli import app
from convscale_cli.data import eval_loader, train_loader
from convscale_cli.data.convert import convert_imagefolder
from convscale_cli.data.files import CorruptImageWarning
from convscale_cli.errors import DataError, UsageError

CLASSES = ("cat", "dog", "emu")


def make_folder(root: Path, train_per_class: int = 4, val_per_class: int = 2, corrupt: bool = False) -> Path:
    """A tiny image folder; every image's pixels encode (label, index) so decoding can be checked."""
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.full((20, 24, 3), 40 * label + i, np.uint8)
                ext = "png" if i % 2 else "jpg"
                Image.fromarray(pixels).save(folder / f"img{i}.{ext}")
    if corrupt:
        (root / "train" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    return root


def test_imagefolder_labels_come_from_sorted_class_folders(tmp_path):
    root = make_folder(tmp_path / "imgs")
    train = imagefolder.open_split("train", root=str(root))
    assert train.classes == CLASSES and len(train) == 12
    for i in range(len(train)):
        example = train[i]
        assert example["image"].mode == "RGB" and example["id"] == i  # decoded PIL image: the transforms take it as is
        image = np.asarray(example["image"])
        assert image.shape == (20, 24, 3) and image.dtype == np.uint8
        assert abs(int(image[10, 10, 0]) - 40 * example["label"]) <= 6  # jpg is lossy
    info = imagefolder.info(root=str(root))
    assert info.num_classes == 3 and info.split_sizes == {"train": 12, "eval": 6}
    batch = next(iter(eval_loader(imagefolder.open_split("eval", root=str(root)), global_batch_size=4, resolution=8)))
    assert batch["image"].shape == (4, 8, 8, 3) and batch["label"].tolist() == [0, 0, 1, 1]


def test_imagefolder_bad_layouts_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        imagefolder.open_split("train", root=str(tmp_path / "nope"))
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="no class folders"):
        imagefolder.open_split("train", root=str(tmp_path / "empty"))
    root = make_folder(tmp_path / "imgs")
    (root / "train" / "fox").mkdir()
    with pytest.raises(DataError, match="fox holds no images"):
        imagefolder.open_split("train", root=str(root))
    with pytest.raises(DataError, match="needs the option root"):
        imagefolder.open_split("train")
    with pytest.raises(UsageError, match="unknown imagefolder option 'path'"):
        imagefolder.open_split("train", path="x")
    lone = make_folder(tmp_path / "lone", val_per_class=1)
    (lone / "val" / "yak").mkdir()
    (lone / "val" / "yak" / "a.png").write_bytes((lone / "val" / "cat" / "img0.jpg").read_bytes())
    with pytest.raises(DataError, match="yak has no counterpart"):
        imagefolder.open_split("eval", root=str(lone))


def test_corrupt_images_are_skipped_counted_and_warned_once(tmp_path):
    root = make_folder(tmp_path / "imgs", corrupt=True)
    source = imagefolder.open_split("train", root=str(root))
    assert len(source) == 13
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(train_loader(source, global_batch_size=13, resolution=8, seed=0, num_examples=26))
        source[4]  # the broken file again (sorted: dog/broken.jpg is index 4): counted, no second warning
    messages = [str(w.message) for w in caught if issubclass(w.category, CorruptImageWarning)]
    assert len(messages) == 1 and "broken.jpg" in messages[0]
    assert source.corrupt.count == 3
    assert [int(b["mask"].sum()) for b in batches] == [12, 12]
    strict = imagefolder.open_split("train", root=str(root), strict_data=True)
    with pytest.raises(DataError, match="corrupt image .*broken.jpg"):
        strict[4]


def test_convert_round_trip_keeps_counts_and_labels(tmp_path):
    root = make_folder(tmp_path / "imgs", corrupt=True)
    calls = []
    report = convert_imagefolder(root, tmp_path / "ar", shard_size=5, workers=2, progress=lambda d, t: calls.append(t))
    assert report.counts == {"train": 12, "eval": 6} and report.shards == {"train": 3, "eval": 2}
    assert len(report.skipped["train"]) == 1 and report.bytes > 0 and calls[-1] == 19
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ar.")]  # no temporary directory left
    folder = imagefolder.open_split("train", root=str(root))
    records = arrayrecord.open_split("train", root=str(tmp_path / "ar"))
    assert len(records) == 12 and records.classes == CLASSES
    by_id = {records[i]["id"]: records[i] for i in range(len(records))}
    assert sorted(by_id) == [i for i in range(13) if i != 4]
    for example_id, example in by_id.items():
        original = folder[example_id]
        assert example["label"] == original["label"]
        np.testing.assert_array_equal(np.asarray(example["image"]), np.asarray(original["image"]))  # same bytes
    info = arrayrecord.info(root=str(tmp_path / "ar"))
    assert info.num_classes == 3 and info.split_sizes == {"train": 12, "eval": 6}
    loader = train_loader(records, global_batch_size=4, resolution=8, seed=0, num_examples=12, worker_count=0)
    assert sorted(np.concatenate([b["id"] for b in loader]).tolist()) == sorted(by_id)
    with pytest.raises(UsageError, match="already exists"):
        convert_imagefolder(root, tmp_path / "ar")


def test_arrayrecord_bad_roots_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="convscale data convert"):
        arrayrecord.open_split("train", root=str(tmp_path))
    convert_imagefolder(make_folder(tmp_path / "imgs"), tmp_path / "ar", shard_size=100)
    manifest = json.loads((tmp_path / "ar" / "convscale-dataset.json").read_text())
    (tmp_path / "ar" / manifest["splits"]["train"]["shards"][0]).unlink()
    with pytest.raises(DataError, match="is missing"):
        arrayrecord.open_split("train", root=str(tmp_path / "ar"))


def test_cli_data_convert_prints_counts_and_bytes(tmp_path):
    root = make_folder(tmp_path / "imgs")
    result = CliRunner().invoke(app, ["data", "convert", str(root), "--out", str(tmp_path / "ar")])
    assert result.exit_code == 0, result.output
    assert "train: 12 images in 1 shards" in result.output and "eval: 6 images" in result.output
    assert "KiB" in result.output
    result = CliRunner().invoke(app, ["data", "convert", str(root), "--out", str(tmp_path / "ar2"), "--json"])
    assert json.loads(result.output)["counts"] == {"train": 12, "eval": 6}


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_convert_output_has_the_umask_modes(tmp_path, umask):
    # Shared storage: the converted dataset must be as readable as anything else the user creates, not mkdtemp's 700.
    root = make_folder(tmp_path / "imgs")
    old = os.umask(umask)
    try:
        convert_imagefolder(root, tmp_path / "ar", shard_size=5)
    finally:
        os.umask(old)
    out = tmp_path / "ar"
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    for path in out.iterdir():
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path.name


def test_convert_without_val_says_training_will_need_a_held_out_split(tmp_path):
    import shutil

    root = make_folder(tmp_path / "imgs")
    shutil.rmtree(root / "val")
    result = CliRunner().invoke(app, ["data", "convert", str(root), "--out", str(tmp_path / "ar")])
    assert result.exit_code == 0, result.output
    assert "no val/ split" in result.output and "held-out" in result.output and f"{root}/val/" in result.output
    result = CliRunner().invoke(app, ["data", "convert", str(root), "--out", str(tmp_path / "ar2"), "--json"])
    doc = json.loads(result.stdout)
    assert doc["counts"] == {"train": 12} and any("no val/ split" in note for note in doc["notes"])
