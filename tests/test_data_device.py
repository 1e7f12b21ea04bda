"""On-device data helpers: normalisation, MixUp/CutMix/label smoothing, global batch assembly."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from convscale_cli.data import IMAGENET_MEAN, IMAGENET_STD, mix_batch, normalize, one_hot_targets, to_global


def test_normalize_matches_the_imagenet_statistics():
    images = np.stack([np.full((2, 2, 3), v, np.uint8) for v in (0, 128, 255)])
    out = np.asarray(jax.jit(normalize)(images))
    expected = (images.astype(np.float32) - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    assert out.dtype == np.float32
    assert normalize(jnp.asarray(images), jnp.bfloat16).dtype == jnp.bfloat16


def test_label_smoothing_and_multi_hot_targets():
    targets = one_hot_targets(jnp.array([0, 2]), 4, label_smoothing=0.1)
    np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(targets[0], [0.925, 0.025, 0.025, 0.025], rtol=1e-6)
    hot = jnp.array([[1.0, 0.0, 1.0]])
    np.testing.assert_array_equal(one_hot_targets(hot, 3), hot)


def test_mix_batch_mixes_images_and_labels_consistently():
    # Both alphas: MixUp on the first half, CutMix on the second (one compile of the Beta sampler, ~5 s on CPU).
    mixup, cutmix = 0.2, 1.0
    batch = 8
    images = jnp.stack([jnp.full((6, 6, 3), float(i)) for i in range(batch)])
    labels = jnp.arange(batch) % 4
    mixed, targets = jax.jit(lambda r, x, y: mix_batch(r, x, y, num_classes=4, mixup_alpha=mixup, cutmix_alpha=cutmix))(
        jax.random.key(3), images, labels
    )
    assert mixed.shape == images.shape and targets.shape == (batch, 4)
    np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-5)
    # Each image is a convex combination of itself and its mirror; the label weight equals the pixel weight.
    for i in range(batch):
        partner = batch - 1 - i
        if partner == i:
            continue
        own_weight = np.asarray((mixed[i] - partner) / (i - partner)).mean()
        own_label = np.asarray(targets[i, labels[i]]) if labels[i] != labels[partner] else None
        if own_label is not None:
            np.testing.assert_allclose(own_weight, own_label, atol=1e-5)


def test_mix_batch_without_mixing_returns_the_images():
    images = jnp.ones((2, 4, 4, 3))
    out, targets = mix_batch(jax.random.key(0), images, jnp.array([1, 0]), num_classes=2)
    np.testing.assert_array_equal(out, images)
    np.testing.assert_array_equal(targets, [[0.0, 1.0], [1.0, 0.0]])


def test_to_global_builds_batch_sharded_arrays():
    devices = jax.devices()
    mesh = jax.make_mesh((len(devices),), ("data",), devices=devices)
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    local = 2 * len(devices)
    batch = {
        "image": np.zeros((local, 4, 4, 3), np.uint8),
        "label": np.arange(local, dtype=np.int32),
        "id": np.arange(local, dtype=np.int64),
        "mask": np.ones(local, np.float32),
    }
    out = to_global(batch, sharding)
    assert out["image"].shape == (local * jax.process_count(), 4, 4, 3)
    assert out["label"].sharding == sharding
    np.testing.assert_array_equal(np.asarray(out["label"]), batch["label"])
