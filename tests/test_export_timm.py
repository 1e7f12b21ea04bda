"""Round trips through timm itself: timm -> ``import-weights --numerics timm`` -> ``export --format timm`` -> timm.

Every parameter of timm's ``dm_nfnet_f0`` and ``vit_tiny_patch16_224`` is perturbed (skip gains included, which are 0
at init and would hide the residual branches), so a tensor exported to the wrong place or transposed cannot pass: the
exported state dict must load strictly into timm and give the original model's logits, and ``load_model`` on the
imported checkpoint must give timm's logits to 1e-4 relative (float32). A checkpoint with DeepMind's numerics is
exported with a warning naming each option that differs from timm's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _timm import import_timm
from safetensors.numpy import save_file

from convscale_cli import load_model
from convscale_cli.cli import main

pytestmark = pytest.mark.parity

TOLERANCE = 1e-4
NUM_CLASSES = 10


@pytest.fixture(scope="module")
def timm() -> Any:
    return import_timm()


def _perturb(model: Any, seed: int) -> dict[str, np.ndarray]:
    """Give every parameter a non-trivial random value and return the state dict as numpy."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if name.endswith("skipinit_gain"):
                p.copy_(0.5 + 0.5 * noise)
            elif name.endswith("gain") or ("norm" in name and name.endswith("weight")):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias") or p.ndim < 2 or "embed" in name or "token" in name:
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))  # fan-in scaled: activations and logits stay O(1)
    model.eval()
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _timm_logits(model: Any, images: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()


def _relative(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err.strip()


def _round_trip(
    timm: Any, name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], numerics: str, resolution: int
) -> tuple[Any, dict[str, Any], str, np.ndarray]:
    """Perturb timm's ``name``, import it, export it back; returns (original, export result, stderr, images)."""
    import safetensors.torch

    original = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES)
    file = tmp_path / f"{name}.safetensors"
    save_file(_perturb(original, seed=7), str(file))
    ckpt = tmp_path / "imported"
    argv = ["import-weights", "timm", name, str(file), "--out", str(ckpt), "--numerics", numerics]
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    assert f"{numerics} numerics" in out and json.loads((ckpt / "model.json").read_text())["numerics"] == numerics
    exported = tmp_path / "exported.safetensors"
    code, out, err = _run(["export", str(ckpt), "--format", "timm", "--out", str(exported), "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    twin = timm.create_model(result["model"], pretrained=False, **result["kwargs"])
    twin.load_state_dict(safetensors.torch.load_file(str(exported)), strict=True)  # every tensor, no extra
    twin.eval()
    images = np.random.default_rng(1).standard_normal((2, resolution, resolution, 3), dtype=np.float32)
    assert _relative(_timm_logits(twin, images), _timm_logits(original, images)) <= TOLERANCE
    return original, result, err, images


@pytest.mark.slow
def test_dm_nfnet_f0_round_trips_through_timm_and_loads_with_timms_logits(
    timm: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    original, result, err, images = _round_trip(timm, "dm_nfnet_f0", tmp_path, capsys, "timm", 64)
    assert result["model"] == "dm_nfnet_f0" and result["numerics_note"] == "" and "Warning" not in err
    apply_fn, variables = load_model(tmp_path / "imported")
    assert _relative(apply_fn(variables, images), _timm_logits(original, images)) <= TOLERANCE


@pytest.mark.slow
def test_reference_numerics_are_exported_with_a_warning_saying_how_they_differ(
    timm: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    original, result, err, images = _round_trip(timm, "dm_nfnet_f0", tmp_path, capsys, "reference", 64)
    assert err.startswith("Warning: nfnet-f0 computes with reference numerics (activation='gelu', ws_eps=0.0001, "
                          "ws_eps_style='dm') where timm dm_nfnet_f0 uses activation='gelu_exact', ws_eps=1e-05, "
                          "ws_eps_style='timm'"), err  # fmt: skip
    assert result["numerics_note"] in err
    # The note is true: the imported model computes differently from timm by more than the tolerance.
    apply_fn, variables = load_model(tmp_path / "imported")
    assert _relative(apply_fn(variables, images), _timm_logits(original, images)) > TOLERANCE


def test_vit_tiny_round_trips_through_timm_and_loads_with_timms_logits(
    timm: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    original, result, err, images = _round_trip(timm, "vit_tiny_patch16_224", tmp_path, capsys, "timm", 224)
    assert result["model"] == "vit_tiny_patch16_224" and "Warning" not in err
    assert result["kwargs"] == {"num_classes": NUM_CLASSES, "img_size": 224, "class_token": True,
                                "global_pool": "token"}  # fmt: skip
    apply_fn, variables = load_model(tmp_path / "imported")
    assert _relative(apply_fn(variables, images), _timm_logits(original, images)) <= TOLERANCE


TIMM_NUMERICS = ["model_options.activation=gelu_exact", "model_options.ws_eps=1e-5", "model_options.ws_eps_style=timm"]


@pytest.mark.slow
def test_a_pretrained_nfnet_f0_with_timm_numerics_exports_to_timms_logits(
    timm: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two steps of ``convscale pretrain`` at 64 px, exported: timm computes what ``load_model`` computes."""
    import safetensors.torch

    run = tmp_path / "run"
    argv = ["pretrain", "--model", "nfnet-f0", "--dataset", "digits", "--out", str(run), "--steps", "2",
            "--batch-size", "8", "--resolution", "64", "--eval-resolution", "64", "--eval-examples", "8",
            "--precision", "fp32", "--lr", "0.4"]  # fmt: skip
    for pair in TIMM_NUMERICS:
        argv += ["--set", pair]
    code, _, err = _run(argv, capsys)
    assert code == 0, err
    exported = tmp_path / "f0.safetensors"
    code, out, err = _run(["export", str(run), "--format", "timm", "--out", str(exported), "--json"], capsys)
    assert code == 0 and "Warning" not in err, err
    result = json.loads(out)
    twin = timm.create_model(result["model"], pretrained=False, **result["kwargs"])
    twin.load_state_dict(safetensors.torch.load_file(str(exported)), strict=True)
    twin.eval()
    apply_fn, variables = load_model(run)
    images = np.random.default_rng(2).standard_normal((2, 64, 64, 3), dtype=np.float32)
    assert _relative(_timm_logits(twin, images), np.asarray(apply_fn(variables, images))) <= TOLERANCE
