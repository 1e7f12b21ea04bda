"""Numerical parity with timm: imported weights give timm's logits, and the position-embedding resize is timm's.

timm's ``vit_base_patch16_224`` (every parameter randomised) goes through a real safetensors file and the
``convscale import-weights`` command, then ``load_model``; logits must match to 1e-4 relative error in float32.
"""

from __future__ import annotations

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
        return model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()


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
