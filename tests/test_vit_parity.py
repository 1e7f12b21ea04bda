"""Numerical parity with timm: imported weights give timm's logits, and the position-embedding resize is timm's.

timm's ``vit_base_patch16_224`` (every parameter randomised) goes through a real safetensors file and the
``convscale import-weights`` command, then ``load_model``; logits must match to 1e-4 relative error in float32.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from _timm import import_timm
from convscale_plugins.vit import spec as vit_spec
from convscale_plugins.vit.model import resample_posemb
from convscale_plugins.vit.timm_import import timm_shapes
from convscale_plugins.vit.variants import VARIANTS, Variant, ViTConfig
from safetensors.numpy import save_file

from convscale_cli import plugins as plugin_loader
from convscale_cli.cli import main
from convscale_cli.hookspecs import hookimpl
from convscale_cli.weights import import_weights, load_model

pytestmark = pytest.mark.parity

TOLERANCE = 1e-4


def _randomise(model, seed: int) -> dict[str, np.ndarray]:  # noqa: ANN001
    """Give every parameter a non-trivial random value (norm gains around 1) and return the numpy state dict."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if p.ndim >= 2 and "embed" not in name and "token" not in name:
                p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))  # fan-in scaled, so activations stay O(1)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.5 * noise)
    model.eval()
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _logits(model, images: np.ndarray) -> np.ndarray:  # noqa: ANN001
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(images.astype(np.float32).transpose(0, 3, 1, 2).copy())).numpy()


def _relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


def test_vit_base_patch16_matches_timm_through_safetensors_and_the_cli(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    timm = import_timm()
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=5, img_size=64)
    file = tmp_path / "vit_base.safetensors"
    save_file(_randomise(model, seed=0), str(file))
    out = tmp_path / "ckpt"
    assert main(["import-weights", "timm", "vit_base_patch16_224", str(file), "--out", str(out)]) == 0
    assert "as vit-b/16" in capsys.readouterr().out
    apply_fn, variables = load_model(out)
    images = np.random.default_rng(1).standard_normal((2, 64, 64, 3)).astype(np.float32)
    want = _logits(model, images)
    assert np.abs(want).max() > 1e-2  # a non-degenerate comparison
    assert _relative_error(apply_fn(variables, jnp.asarray(images)), want) <= TOLERANCE


TINY = Variant("vit-paritytest", ViTConfig(32, 2, 64, 2, 4), 16, 16, "tiny timm-layout ViT", timm_name="vit_paritytest")


@pytest.fixture
def tiny_registered() -> None:
    @hookimpl
    def register_architectures(register):  # noqa: ANN001, ANN202
        register(vit_spec(TINY))

    plugin = types.SimpleNamespace(register_architectures=register_architectures)
    plugin_loader.use_plugins(plugin_loader.load_plugins(extra=[("paritytest", plugin)]))  # reset by conftest


@pytest.mark.parametrize(("pool", "size"), [("tok", 24), ("tok", 12), ("map", 20)])
def test_imported_tiny_vit_matches_timm_at_other_sizes(pool: str, size: int, tmp_path: Path, tiny_registered) -> None:  # noqa: ANN001
    """Created at 16 px, applied at 24 px (grid 4 -> 6), 12 px (4 -> 3) or 20 px: timm's logits, for the class-token
    layout and the MAP layout (timm ``global_pool="map"`` without class token, as SigLIP / SoViT)."""
    import_timm()
    from timm.models.vision_transformer import VisionTransformer

    c = TINY.config
    model = VisionTransformer(
        img_size=16,
        patch_size=c.patch_size,
        embed_dim=c.width,
        depth=c.depth,
        num_heads=c.num_heads,
        mlp_ratio=c.mlp_dim / c.width,
        num_classes=3,
        dynamic_img_size=True,
        class_token=pool == "tok",
        global_pool="token" if pool == "tok" else "map",
    )
    file = tmp_path / "tiny.safetensors"
    save_file(_randomise(model, seed=2), str(file))
    _, meta = import_weights("timm", "vit_paritytest", file, tmp_path / "ckpt")
    assert meta["options"]["pool"] == pool
    apply_fn, variables = load_model(tmp_path / "ckpt")
    images = np.random.default_rng(3).standard_normal((2, size, size, 3)).astype(np.float32)
    assert _relative_error(apply_fn(variables, jnp.asarray(images)), _logits(model, images)) <= TOLERANCE


@pytest.mark.parametrize(("old", "new"), [((7, 7), (12, 12)), ((12, 12), (5, 5)), ((4, 6), (6, 3))])
def test_resample_posemb_is_timm_resample_abs_pos_embed(old: tuple[int, int], new: tuple[int, int]) -> None:
    import_timm()
    import torch
    from timm.layers import resample_abs_pos_embed

    table = np.random.default_rng(4).standard_normal((1, old[0] * old[1], 8)).astype(np.float32)
    want = resample_abs_pos_embed(torch.from_numpy(table), list(new), list(old), num_prefix_tokens=0).numpy()
    got = np.asarray(resample_posemb(jnp.asarray(table), old, new))
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_every_timm_source_has_the_layout_import_weights_expects() -> None:
    """Built on torch's meta device: shapes only, so even ViT-G/14 costs no memory."""
    timm = import_timm()
    import torch

    for variant in VARIANTS.values():
        if variant.timm_name is None:
            continue
        with torch.device("meta"):
            model = timm.create_model(variant.timm_name, pretrained=False)
        state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        grid = variant.train_resolution // variant.config.patch_size
        pool = "map" if model.global_pool == "map" else "tok"
        expected = timm_shapes(variant.config, grid, model.num_classes or None, pool)
        assert list(state.items()) == list(expected.items()), variant.name


def _timm_tiny(num_classes: int):  # noqa: ANN202
    from timm.models.vision_transformer import VisionTransformer

    c = TINY.config
    return VisionTransformer(
        img_size=16, patch_size=c.patch_size, embed_dim=c.width, depth=c.depth, num_heads=c.num_heads,
        mlp_ratio=c.mlp_dim / c.width, num_classes=num_classes,
    )  # fmt: skip


def _timm_loss(model, batches: list[dict[str, np.ndarray]], normalization: tuple[float, float]) -> float:  # noqa: ANN001
    """Mean softmax cross-entropy of timm's ``model`` over the real rows of ``batches``, its inputs normalised with
    ``(mean, std)`` as timm's own transforms do (``x / 255``, then ``(x - mean) / std``)."""
    import torch

    mean, std = normalization
    total, count = 0.0, 0.0
    for batch in batches:
        logits = _logits(model, (batch["image"].astype(np.float32) / 255.0 - mean) / std)
        losses = torch.nn.functional.cross_entropy(
            torch.from_numpy(logits), torch.from_numpy(np.asarray(batch["label"], np.int64)), reduction="none"
        ).numpy()
        total += float((losses * batch["mask"]).sum())
        count += float(batch["mask"].sum())
    return total / count


def test_timm_vit_weights_are_normalised_as_timm_does_everywhere(tmp_path: Path, capsys, monkeypatch) -> None:  # noqa: ANN001
    """timm's ViT weights expect inputs scaled to [-1, 1] (mean = std = 0.5), not the ImageNet statistics: a tagged
    import records that in model.json, and load_model, convscale eval and fine-tuning (its compiled steps, checked
    through its exported weights) all compute timm's losses and logits with timm's own normalisation."""
    import_timm()
    import _engine_helpers as helpers
    import torch

    from convscale_cli import data
    from convscale_cli.evaluate import evaluate
    from convscale_cli.export import export

    @hookimpl
    def register_architectures(register):  # noqa: ANN001, ANN202
        register(vit_spec(TINY))

    extra = [("paritytest", types.SimpleNamespace(register_architectures=register_architectures))]
    loaded = plugin_loader.load_plugins(extra=[*extra, ("colours", helpers.TinyPlugin())])
    monkeypatch.setattr(plugin_loader, "_CACHE", loaded)

    model = _timm_tiny(helpers.CLASSES)
    file = tmp_path / "tiny.safetensors"
    save_file(_randomise(model, seed=5), str(file))
    name = "vit_paritytest.augreg_in21k"  # a tagged timm name: the tag is kept, the architecture is the base name
    _, meta = import_weights("timm", name, file, tmp_path / "ckpt")
    assert meta["normalization"] == {"mean": [0.5] * 3, "std": [0.5] * 3}
    assert meta["source"]["model"] == name and meta["architecture"] == TINY.name
    inception, imagenet = (0.5, 0.5), (np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225]))

    # load_model(normalize=True) takes pixels and normalises them as the weights expect.
    pixels = np.random.default_rng(6).integers(0, 256, (2, 16, 16, 3)).astype(np.uint8)
    apply_fn, variables = load_model(tmp_path / "ckpt", normalize=True)
    got = np.asarray(apply_fn(variables, jnp.asarray(pixels)))
    want = _logits(model, (pixels / 255.0 - 0.5) / 0.5)
    assert _relative_error(got, want) <= TOLERANCE
    assert _relative_error(_logits(model, (pixels / 255.0 - imagenet[0]) / imagenet[1]), want) > 100 * TOLERANCE

    # convscale eval: the held-out loss timm computes on the very batches the pipeline makes.
    source = loaded.registry.dataset("colours").open("eval")
    batches = list(data.eval_loader(source, global_batch_size=8, resolution=16, crop_fraction=1.0))
    result = evaluate(tmp_path / "ckpt", "colours", resolution=16, crop_fraction=1.0, batch_size=8)
    timm_loss = _timm_loss(model, batches, inception)
    assert result["checkpoint"]["normalization"] == meta["normalization"]
    assert abs(result["eval_loss"] - timm_loss) <= TOLERANCE * timm_loss
    assert abs(_timm_loss(model, batches, imagenet) - timm_loss) > 100 * TOLERANCE * timm_loss  # the check can fail

    # Fine-tuning trains and evaluates with the weights' normalisation: its final held-out loss is timm's loss of the
    # fine-tuned weights under timm's preprocessing.
    out = tmp_path / "ft"
    argv = [
        "finetune", "--from", str(tmp_path / "ckpt"), "--dataset", "colours", "--out", str(out), "--steps", "2",
        "--batch-size", "8", "--resolution", "16", "--eval-resolution", "16", "--precision", "fp32", "--lr", "0.01",
        "--sam-rho", "0", "--set", "eval_crop_fraction=1.0", "--set", "ema_decay=0", "--set", "progress=none",
        "--set", "tensorboard=false", "--json",
    ]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out)
    assert json.loads((out / "config.json").read_text())["normalization"] == meta["normalization"]
    exported = export(out, "timm", tmp_path / "ft.safetensors")
    tuned = _timm_tiny(helpers.CLASSES)
    from safetensors.torch import load_file

    tuned.load_state_dict(load_file(str(tmp_path / "ft.safetensors")))
    tuned.eval()
    assert exported["normalization"] == meta["normalization"]
    with torch.no_grad():
        tuned_loss = _timm_loss(tuned, batches, inception)
    assert abs(summary["final"]["eval_loss"] - tuned_loss) <= TOLERANCE * tuned_loss
    assert abs(tuned_loss - timm_loss) > 100 * TOLERANCE * timm_loss  # fine-tuning moved the weights


def test_timm_vit_tags_trained_on_imagenet_statistics_record_them(tmp_path: Path, tiny_registered) -> None:  # noqa: ANN001
    import_timm()
    file = tmp_path / "tiny.safetensors"
    save_file(_randomise(_timm_tiny(3), seed=7), str(file))
    _, meta = import_weights("timm", "vit_paritytest.dino", file, tmp_path / "ckpt")
    assert meta["normalization"] == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
