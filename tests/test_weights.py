"""Weights checkpoints: save/load round trip, ``import-weights`` from safetensors, and every way it can be misused.

The import tests use a tiny ViT registered in code with a made-up timm name and numpy tensors laid out like a timm
state dict (no torch needed); numerical parity with timm itself is tests/test_vit_parity.py. The NFNet round trip takes
its tensor layout from timm (skipped without torch).
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from convscale_plugins.vit import spec as vit_spec
from convscale_plugins.vit.timm_import import timm_shapes
from convscale_plugins.vit.variants import Variant, ViTConfig
from safetensors.numpy import save_file

from convscale_cli import plugins as plugin_loader
from convscale_cli.cli import main
from convscale_cli.errors import CheckpointError
from convscale_cli.hookspecs import hookimpl
from convscale_cli.weights import MODEL_JSON, load_model, load_weights, save_weights

TINY = Variant("vit-timmtest", ViTConfig(32, 2, 64, 2, 4), 16, 16, "tiny timm-layout ViT", timm_name="vit_timmtest")


@pytest.fixture
def registry() -> plugin_loader.Registry:
    """The installed plugins plus TINY, as the process-wide registry the CLI uses (reset by conftest)."""

    @hookimpl
    def register_architectures(register):  # noqa: ANN001, ANN202
        register(vit_spec(TINY))

    loaded = plugin_loader.load_plugins(
        extra=[("timmtest", types.SimpleNamespace(register_architectures=register_architectures))]
    )
    plugin_loader.use_plugins(loaded)
    return loaded.registry


def _tensors(config: ViTConfig = TINY.config, grid: int = 4, classes: int | None = 3, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {n: (0.2 * rng.standard_normal(s)).astype(np.float32) for n, s in timm_shapes(config, grid, classes).items()}


def _file(tmp_path: Path, tensors: dict, name: str = "w.safetensors") -> Path:
    path = tmp_path / name
    save_file(tensors, str(path))
    return path


def _images(n: int = 2, size: int = 16) -> jnp.ndarray:
    return jnp.asarray(np.random.default_rng(5).normal(size=(n, size, size, 3)), jnp.float32)


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err.strip()


def test_save_and_load_model_round_trip(tmp_path: Path) -> None:
    spec = plugin_loader.get_registry().architecture("vit-test")
    module = spec.build(num_classes=4, pool="map", resolution=16)
    x = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
    abstract = jax.eval_shape(lambda x: module.init({"params": jax.random.key(0)}, x), x)["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), abstract)
    path = save_weights(
        tmp_path / "ckpt", spec=spec, params=params, num_classes=4, options={"pool": "map", "resolution": 16}
    )
    meta = json.loads((path / MODEL_JSON).read_text())
    assert meta["architecture"] == "vit-test" and meta["num_classes"] == 4 and meta["options"]["pool"] == "map"
    assert meta["params"] == sum(p.size for p in jax.tree.leaves(params))
    apply_fn, variables = load_model(path)
    expected = jax.jit(module.apply)({"params": params}, _images())
    np.testing.assert_array_equal(apply_fn(variables, _images()), expected)


def test_save_weights_rejects_params_of_another_model(tmp_path: Path) -> None:
    spec = plugin_loader.get_registry().architecture("vit-test")
    with pytest.raises(CheckpointError, match="parameter 'cls' is missing"):
        save_weights(tmp_path / "a", spec=spec, params={"head": {}}, num_classes=4)
    module = spec.build(num_classes=4)
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    params = jax.eval_shape(lambda x: module.init({"params": jax.random.key(0)}, x), x)["params"]
    params = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), params)
    params["head"]["kernel"] = np.zeros((32, 5), np.float32)
    with pytest.raises(CheckpointError, match=r"parameter 'head/kernel' has shape \(32, 5\), vit-test expects"):
        save_weights(tmp_path / "b", spec=spec, params=params, num_classes=4)


def test_import_weights_cli_round_trip(tmp_path: Path, registry, capsys) -> None:  # noqa: ANN001
    tensors = _tensors()
    file = _file(tmp_path, tensors)
    code, out, err = _run(["import-weights", "timm", "vit_timmtest", str(file), "--out", str(tmp_path / "c")], capsys)
    assert code == 0, err
    assert "as vit-timmtest" in out and "3 classes" in out
    module, variables, meta = load_weights(tmp_path / "c")
    assert meta["source"] == {"kind": "timm", "model": "vit_timmtest", "file": str(file), "note": "head from the file"}
    # The numerics are build options like any other, recorded so that every loader computes the same way.
    assert meta["options"] == {"pool": "tok", "posemb": "learn", "resolution": 16, "layernorm_eps": 1e-6}
    assert meta["numerics"] == "reference"
    params = variables["params"]
    np.testing.assert_array_equal(params["head"]["kernel"], tensors["head.weight"].T)
    np.testing.assert_array_equal(params["pos_embedding"], tensors["pos_embed"][:, 1:])
    np.testing.assert_allclose(params["cls"], tensors["cls_token"] + tensors["pos_embed"][:, :1])
    # The query kernel is the first third of timm's fused qkv, heads split out of the output axis.
    q = tensors["blocks.1.attn.qkv.weight"][:32].T.reshape(32, 2, 16)
    np.testing.assert_array_equal(params["encoder"]["block1"]["attn"]["query"]["kernel"], q)
    apply_fn, variables = load_model(tmp_path / "c")
    logits = apply_fn(variables, _images())
    assert logits.shape == (2, 3) and logits.dtype == jnp.float32 and np.isfinite(logits).all()


def test_import_with_another_class_count_starts_a_zero_head(tmp_path: Path, registry, capsys) -> None:  # noqa: ANN001
    file = _file(tmp_path, _tensors(grid=6))  # a timm model created at 24 px
    argv = ["import-weights", "timm", "vit_timmtest", str(file), "--out", str(tmp_path / "c"), "--num-classes", "7"]
    code, out, err = _run([*argv, "--json"], capsys)
    assert code == 0, err
    meta = json.loads(out)
    assert meta["num_classes"] == 7 and meta["options"]["resolution"] == 24
    assert meta["source"]["note"] == "new zero-initialised 7-way head"
    apply_fn, variables = load_model(tmp_path / "c")
    np.testing.assert_array_equal(apply_fn(variables, _images(size=24)), np.zeros((2, 7), np.float32))


def test_headless_weights_need_a_class_count(tmp_path: Path, registry, capsys) -> None:  # noqa: ANN001
    file = _file(tmp_path, _tensors(classes=None))
    code, _, err = _run(["import-weights", "timm", "vit_timmtest", str(file), "--out", str(tmp_path / "c")], capsys)
    assert code == 2 and "have no classifier head; pass the number of classes" in err
    argv = ["import-weights", "timm", "vit_timmtest", str(file), "--out", str(tmp_path / "c"), "--num-classes", "2"]
    assert _run(argv, capsys)[0] == 0


def _bad_cases(tmp_path: Path) -> list[tuple[list[str], str]]:
    good = _file(tmp_path, _tensors(), "good.safetensors")
    deeper = _file(tmp_path, _tensors(ViTConfig(32, 3, 64, 2, 4)), "deeper.safetensors")
    wider = _file(tmp_path, _tensors(ViTConfig(48, 2, 64, 2, 4)), "wider.safetensors")
    missing = _tensors()
    del missing["blocks.0.mlp.fc2.bias"]
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x80\x04not a safetensors file at all")
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("taken")
    out = str(tmp_path / "out")
    cmd = ["import-weights", "timm", "vit_timmtest"]
    return [
        ([*cmd, str(tmp_path / "nope.safetensors"), "--out", out], "does not exist"),
        ([*cmd, str(garbage), "--out", out], "is not a readable safetensors file"),
        ([*cmd, str(deeper), "--out", out], "unexpected tensor 'blocks.2.attn.proj.bias'"),
        ([*cmd, str(wider), "--out", out], "tensor 'cls_token' has shape (1, 1, 48), vit-timmtest"),
        ([*cmd, str(_file(tmp_path, missing, "m.safetensors")), "--out", out], "'blocks.0.mlp.fc2.bias' is missing"),
        ([*cmd, str(good), "--out", str(full)], "already exists and is not an empty directory"),
        ([*cmd, str(good), "--out", out, "--num-classes", "0"], "--num-classes must be in [1, 100000], got 0"),
        (["import-weights", "timm", "vit_timmtset", str(good), "--out", out], "did you mean 'vit_timmtest'"),
        (["import-weights", "hf", "vit_timmtest", str(good), "--out", out], "unknown weight source 'hf'"),
    ]


def test_import_errors_are_one_line_exit_2(tmp_path: Path, registry, capsys) -> None:  # noqa: ANN001
    for argv, message in _bad_cases(tmp_path):
        code, _, err = _run(argv, capsys)
        assert code == 2 and len(err.splitlines()) == 1 and message in err, (argv, err)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_load_model_rejects_what_is_not_a_weights_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "missing")
    with pytest.raises(CheckpointError, match=r"or a weights checkpoint \(model.json\)"):
        load_model(tmp_path)
    (tmp_path / MODEL_JSON).write_text(json.dumps({"format": "convscale-weights", "version": 99}))
    with pytest.raises(CheckpointError, match="format version 99"):
        load_model(tmp_path)


def test_import_weights_cli_handles_another_family(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    """The command is family-agnostic: a dm_nfnet_f0 state dict (timm's layout, random values) imports as nfnet-f0."""
    from _timm import import_timm

    timm = import_timm()
    import torch

    with torch.device("meta"):  # shapes only; the values come from numpy
        shapes = {k: tuple(v.shape) for k, v in timm.create_model("dm_nfnet_f0", pretrained=False).state_dict().items()}
    rng = np.random.default_rng(0)
    file = _file(tmp_path, {k: np.asarray(0.01 * rng.standard_normal(s), np.float32) for k, s in shapes.items()})
    argv = ["import-weights", "timm", "dm_nfnet_f0", str(file), "--out", str(tmp_path / "c"), "--num-classes", "3"]
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    assert "as nfnet-f0" in out
    apply_fn, variables = load_model(tmp_path / "c")
    logits = apply_fn(variables, _images(size=32))
    assert logits.shape == (2, 3) and np.isfinite(logits).all()


def _save_bfloat16(tensors: dict, path: Path) -> None:
    """A bfloat16 safetensors file written by hand (numpy's safetensors writer has no bfloat16)."""
    import struct

    import ml_dtypes

    header, chunks, offset = {}, [], 0
    for name, array in tensors.items():
        data = np.asarray(array, ml_dtypes.bfloat16).tobytes()
        header[name] = {"dtype": "BF16", "shape": list(np.shape(array)), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(chunks))


def test_bfloat16_checkpoints_import_as_float32(tmp_path: Path, registry, capsys) -> None:  # noqa: ANN001
    import ml_dtypes

    tensors = _tensors()
    _save_bfloat16(tensors, tmp_path / "bf16.safetensors")
    argv = ["import-weights", "timm", "vit_timmtest", str(tmp_path / "bf16.safetensors"), "--out", str(tmp_path / "c")]
    code, _, err = _run(argv, capsys)
    assert code == 0, err
    _, variables, _ = load_weights(tmp_path / "c")
    head = variables["params"]["head"]["kernel"]
    assert head.dtype == np.float32
    rounded = np.asarray(tensors["head.weight"], ml_dtypes.bfloat16).astype(np.float32).T
    np.testing.assert_array_equal(head, rounded)


def test_import_numerics_are_checked_before_anything_is_written(tmp_path: Path, registry, capsys) -> None:  # noqa: ANN001
    file = _file(tmp_path, _tensors())
    argv = ["import-weights", "timm", "vit_timmtest", str(file), "--out", str(tmp_path / "c"), "--numerics", "tim"]
    code, out, err = _run(argv, capsys)
    assert code == 2 and out == "" and err == "Error: unknown vit-timmtest numerics 'tim': did you mean 'timm'?"
    assert not (tmp_path / "c").exists()
    code, out, err = _run([*argv[:-1], "timm"], capsys)
    assert code == 0 and "timm numerics" in out, err
    assert json.loads((tmp_path / "c" / MODEL_JSON).read_text())["numerics"] == "timm"


def test_timm_pretrained_tags_select_the_architecture(tmp_path: Path, registry, capsys) -> None:  # noqa: ANN001
    # timm names a set of weights model.tag (vit_base_patch16_224.augreg_in21k): the tag picks the weights, not the
    # architecture, and the provenance keeps the whole name.
    file = _file(tmp_path, _tensors())
    name = "vit_timmtest.augreg_in21k_ft_in1k"
    code, out, err = _run(["import-weights", "timm", name, str(file), "--out", str(tmp_path / "c")], capsys)
    assert code == 0, err
    assert "as vit-timmtest" in out
    assert load_weights(tmp_path / "c")[2]["source"]["model"] == name
    code, out, err = _run(
        ["import-weights", "timm", "vit_timmtst.augreg", str(file), "--out", str(tmp_path / "d")], capsys
    )
    assert code == 2 and "unknown timm model 'vit_timmtst.augreg'" in err
