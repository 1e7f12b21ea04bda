"""Using what was trained: ``load_model`` on any run or checkpoint, ``convscale eval`` and ``convscale export``.

A tiny CNN is pre-trained and fine-tuned once per module (fp32, 8 px, ``tests/_engine_helpers.py``); every test loads,
evaluates or exports those runs. Parity with timm itself is tests/test_export_timm.py.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import _engine_helpers as helpers
import jax
import numpy as np
import pytest

from convscale_cli import load_model
from convscale_cli import plugins as plugin_loader
from convscale_cli.errors import CheckpointError
from convscale_cli.hookspecs import hookimpl
from convscale_cli.registry import DatasetInfo, DatasetSpec

OTHER_CLASSES = 7


class _Plugin:
    """The tiny CNN and ``colours``, plus ``colours7`` (the same images declared with 7 classes) and ``nfnet-f0``
    (never built here: it makes ``timm`` an export format that the tiny CNN lacks)."""

    @hookimpl
    def register_architectures(self, register: Any) -> None:
        from convscale_plugins.nfnet import spec
        from convscale_plugins.nfnet.variants import VARIANTS

        helpers.TinyPlugin().register_architectures(register)
        register(spec(VARIANTS["nfnet-f0"]))

    @hookimpl
    def register_datasets(self, register: Any) -> None:
        specs: list[DatasetSpec] = []
        helpers.TinyPlugin().register_datasets(specs.append)
        (colours,) = specs
        register(colours)

        def info(**options: Any) -> DatasetInfo:
            base = colours.info(**options)
            return dataclasses.replace(base, num_classes=OTHER_CLASSES)

        register(dataclasses.replace(colours, name="colours7", info=info))


@pytest.fixture(scope="module")
def loaded() -> plugin_loader.Plugins:
    return plugin_loader.load_plugins(extra=[("eval-test", _Plugin())], entry_points=lambda: [])


@pytest.fixture(autouse=True)
def _cli_registry(cli_registry: Any) -> Any:
    """Every test here: the tiny plugins as the process-wide registry (load_model and the CLI use it)."""
    return cli_registry


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory: pytest.TempPathFactory, loaded: plugin_loader.Plugins, pretrained: Path) -> Path:
    from convscale_cli.finetune.api import finetune
    from convscale_cli.finetune.config import FinetuneConfig

    out = tmp_path_factory.mktemp("ft") / "run"
    config = FinetuneConfig(
        pretrained=str(pretrained), dataset="colours", out=str(out), steps=6, batch_size=16, precision="fp32",
        resolution=8, eval_resolution=8, ema_decay=0.9, sam_rho=0.0, log_every=2, checkpoint_every=0,
        progress="none", tensorboard=False,
    )  # fmt: skip
    finetune(config, loaded.registry)
    return out


def _images(n: int = 4, size: int = 8) -> np.ndarray:
    return np.random.default_rng(3).normal(size=(n, size, size, 3)).astype(np.float32)


def _summary(run: Path) -> dict[str, Any]:
    return json.loads((run / "summary.json").read_text())


# --- load_model ----------------------------------------------------------------------------------------------------


def test_load_model_reads_a_pretraining_run_and_one_of_its_checkpoints(pretrained: Path) -> None:
    newest = helpers.restore_tree(pretrained / "checkpoints" / "8", "params")
    apply_fn, variables = load_model(pretrained)
    assert helpers.flat(variables["params"]).keys() == newest.keys()
    for path, value in helpers.flat(variables["params"]).items():
        np.testing.assert_array_equal(value, newest[path], err_msg=path)
    logits = np.asarray(apply_fn(variables, _images()))
    assert logits.shape == (4, helpers.CLASSES) and np.isfinite(logits).all()

    _, older = load_model(pretrained / "checkpoints" / "4")
    np.testing.assert_array_equal(
        helpers.flat(older["params"])["head/kernel"],
        helpers.restore_tree(pretrained / "checkpoints" / "4", "params")["head/kernel"],
    )
    assert not np.array_equal(helpers.flat(older["params"])["head/kernel"], newest["head/kernel"])


def test_load_model_takes_the_ema_of_a_finetuning_run_unless_told_not_to(finetuned: Path) -> None:
    step_dir = finetuned / "checkpoints" / "6"
    ema, raw = helpers.restore_tree(step_dir, "ema"), helpers.restore_tree(step_dir, "params")
    assert not np.array_equal(ema["head/kernel"], raw["head/kernel"])  # the test can tell them apart
    _, variables = load_model(finetuned)
    for path, value in helpers.flat(variables["params"]).items():
        np.testing.assert_array_equal(value, ema[path], err_msg=path)
    _, variables = load_model(finetuned, ema=False)
    for path, value in helpers.flat(variables["params"]).items():
        np.testing.assert_array_equal(value, raw[path], err_msg=path)


def test_load_model_errors_name_the_path(tmp_path: Path, pretrained: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="is not a pre-training or fine-tuning run"):
        load_model(tmp_path)
    with pytest.raises(CheckpointError, match="is a file, expected a run, checkpoint or weights directory"):
        load_model(pretrained / "config.json")


# --- eval ----------------------------------------------------------------------------------------------------------


def test_eval_reproduces_the_pretraining_summary(pretrained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = helpers.run_cli(["eval", str(pretrained), "--dataset", "colours", "--json"], capsys)
    assert code == 0, err
    result, final = json.loads(out), _summary(pretrained)["final"]
    assert result["eval_top1"] == final["eval_top1"]
    assert result["eval_top5"] == final["eval_top5"]
    assert result["eval_loss"] == pytest.approx(final["eval_loss"], rel=1e-6)
    assert (result["resolution"], result["examples"], result["checkpoint"]["step"]) == (8, helpers.EVAL_SIZE, 8)
    assert result["batch_size"] == 16  # the run's batches (batch 16 < 32 held-out images), as training evaluated
    assert result["images_per_sec"] > 0 and result["devices"] == jax.device_count()


def test_eval_at_another_resolution_and_batch_runs_and_reports(
    pretrained: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    batch = 2 * jax.device_count()
    argv = ["eval", str(pretrained), "--dataset", "colours", "--resolution", "16", "--eval-crop", "1.0",
            "--batch-size", str(batch)]  # fmt: skip
    code, out, err = helpers.run_cli(argv, capsys)
    assert code == 0, err
    assert "16 px" in out and "crop 1" in out and "top-1" in out and "images/s" in out
    code, out, _ = helpers.run_cli([*argv, "--json"], capsys)
    result = json.loads(out)
    assert (result["resolution"], result["batch_size"], result["crop_fraction"]) == (16, batch, 1.0)
    final = _summary(pretrained)["final"]
    assert result["eval_loss"] != pytest.approx(final["eval_loss"], rel=1e-6)  # another resolution, other numbers


def test_eval_of_a_finetuning_run_reproduces_its_ema_and_raw_top1(
    finetuned: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    summary = _summary(finetuned)
    code, out, err = helpers.run_cli(["eval", str(finetuned), "--dataset", "colours", "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["checkpoint"]["parameters"] == "ema"
    assert result["eval_top1"] == summary["final_ema"]["eval_top1"]
    assert result["eval_loss"] == pytest.approx(summary["final_ema"]["eval_loss"], rel=1e-6)
    code, out, err = helpers.run_cli(["eval", str(finetuned), "--dataset", "colours", "--no-ema", "--json"], capsys)
    result = json.loads(out)
    assert result["checkpoint"]["parameters"] == "params"
    assert result["eval_loss"] == pytest.approx(summary["final"]["eval_loss"], rel=1e-6)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["{missing}", "--dataset", "colours"], "does not exist"),
        (["{run}", "--dataset", "colorus"], "unknown dataset 'colorus': did you mean 'colours'"),
        (["{run}", "--dataset", "colours7"], "holds a 4-way classifier but dataset 'colours7' has 7 classes"),
        (["{run}", "--dataset", "colours", "--resolution", "0"], "--resolution must be > 0, got 0"),
        (["{run}", "--dataset", "colours", "--split", "val"], "unknown colours split 'val'"),
        (["{run}", "--dataset", "colours", "--batch-size", "3"], "not divisible by"),
        (["{run}", "--dataset", "colours", "--eval-crop", "1.5"], "--eval-crop must be in (0, 1]"),
        (["{run}", "--dataset", "colours", "--precision", "fp16"], "unknown precision 'fp16'"),
    ],
)
def test_eval_bad_input_is_one_line_exit_2(
    args: list[str], needle: str, pretrained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if "--batch-size" in args and jax.device_count() == 1:
        pytest.skip("every batch divides one device")
    argv = ["eval", *(a.format(run=pretrained, missing=tmp_path / "nope") for a in args)]
    code, out, err = helpers.run_cli(argv, capsys)
    assert code == 2 and out == "" and len(err.splitlines()) == 1, err
    assert err.startswith("Error: ") and needle in err, err


# --- export --------------------------------------------------------------------------------------------------------


def test_safetensors_export_loads_anywhere_and_evaluates_the_same(
    finetuned: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = tmp_path / "exported" / "tiny.safetensors"
    code, out, err = helpers.run_cli(["export", str(finetuned), "--format", "safetensors", "--out", str(file)], capsys)
    assert code == 0, err
    assert file.is_file() and (file.parent / "model.json").is_file() and "load_model" in out
    meta = json.loads((file.parent / "model.json").read_text())
    assert meta["params_file"] == "tiny.safetensors" and meta["source"]["parameters"] == "ema"
    apply_fn, variables = load_model(finetuned)
    want = np.asarray(apply_fn(variables, _images()))
    for path in (file, file.parent):
        apply_fn, variables = load_model(path)
        np.testing.assert_array_equal(np.asarray(apply_fn(variables, _images())), want)
    code, out, err = helpers.run_cli(["eval", str(file), "--dataset", "colours", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["eval_top1"] == _summary(finetuned)["final_ema"]["eval_top1"]


def test_finetuning_starts_from_a_safetensors_export(
    pretrained: Path, tmp_path: Path, loaded: plugin_loader.Plugins, capsys: pytest.CaptureFixture[str]
) -> None:
    from convscale_cli.finetune.backbone import load_params, locate

    file = tmp_path / "pre.safetensors"
    assert helpers.run_cli(["export", str(pretrained), "--format", "safetensors", "--out", str(file)], capsys)[0] == 0
    spec = loaded.registry.architecture("tiny-cnn")
    params = helpers.flat(
        load_params(locate(file), spec, num_classes=5, options={}, resolution=8, rng=jax.random.key(0))
    )
    saved = helpers.restore_tree(pretrained / "checkpoints" / "8", "params")
    np.testing.assert_array_equal(params["conv/kernel"], saved["conv/kernel"])
    assert params["head/kernel"].shape == (helpers.WIDTH, 5)


def test_export_refuses_what_it_cannot_write(
    pretrained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    taken = tmp_path / "taken.safetensors"
    taken.write_bytes(b"")
    no_twin = "tiny-cnn has no timm twin to export to; timm export exists for nfnet-f0"
    cases = [
        (["--format", "timm", "--out", str(tmp_path / "t.safetensors")], no_twin),
        (["--format", "onnx", "--out", str(tmp_path / "t.safetensors")], "unknown export format 'onnx'"),
        (["--format", "safetensors", "--out", str(tmp_path / "t.pt")], "must be a .safetensors file"),
        (["--format", "safetensors", "--out", str(taken)], "already exists"),
    ]
    for args, needle in cases:
        code, out, err = helpers.run_cli(["export", str(pretrained), *args], capsys)
        assert code == 2 and len(err.splitlines()) == 1 and needle in err, (args, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.safetensors"]  # nothing half-written


# --- input normalisation -------------------------------------------------------------------------------------------


def test_checkpoints_that_predate_the_normalization_key_mean_imagenet(
    pretrained: Path, tmp_path: Path, loaded: plugin_loader.Plugins, capsys: pytest.CaptureFixture[str]
) -> None:
    """Runs and weights written before checkpoints recorded their input normalisation were trained with ImageNet's:
    they load, evaluate and resume (nothing to do) as before, instead of being refused as another run."""
    import shutil

    from convscale_cli.data import IMAGENET
    from convscale_cli.engine.api import pretrain
    from convscale_cli.loading import load

    imagenet = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    run = tmp_path / "old-run"
    shutil.copytree(pretrained, run)
    config = json.loads((run / "config.json").read_text())
    assert config.pop("normalization") == imagenet  # the tiny CNN's, the default
    (run / "config.json").write_text(json.dumps(config))
    assert load(run, registry=loaded.registry).normalization == IMAGENET
    summary = pretrain(helpers.config(run, steps=8), loaded.registry)
    assert summary["status"] == "finished" and summary["final"] == _summary(pretrained)["final"]

    file = tmp_path / "old-weights" / "tiny.safetensors"
    assert helpers.run_cli(["export", str(run), "--format", "safetensors", "--out", str(file)], capsys)[0] == 0
    meta = json.loads((file.parent / "model.json").read_text())
    assert meta.pop("normalization") == imagenet
    (file.parent / "model.json").write_text(json.dumps(meta))
    assert load(file, registry=loaded.registry).normalization == IMAGENET
    code, out, err = helpers.run_cli(["eval", str(file), "--dataset", "colours", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["eval_loss"] == pytest.approx(_summary(pretrained)["final"]["eval_loss"], rel=1e-5)

    (file.parent / "model.json").write_text(json.dumps({**meta, "normalization": {"mean": [0.5], "std": [0.5]}}))
    code, out, err = helpers.run_cli(["eval", str(file), "--dataset", "colours"], capsys)
    assert code == 2 and err.startswith("Error: ") and "model.json" in err and "normalization mean [0.5]" in err, err


def test_load_model_normalises_pixels_with_the_checkpoints_statistics(pretrained: Path, tmp_path: Path) -> None:
    """``normalize=True``: pixels in, the checkpoint's own normalisation applied (here a run that records 0.5)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(pretrained, run)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "normalization": {"mean": [0.5] * 3, "std": [0.5] * 3}}))
    pixels = np.random.default_rng(4).integers(0, 256, (4, 8, 8, 3)).astype(np.uint8)
    apply_fn, variables = load_model(run)
    want = np.asarray(apply_fn(variables, (pixels / 255.0 - 0.5) / 0.5))
    apply_pixels, variables = load_model(run, normalize=True)
    np.testing.assert_allclose(np.asarray(apply_pixels(variables, pixels)), want, rtol=1e-5, atol=1e-6)
