"""The ViT plugin: registration, analytic counts against Flax and XLA and the papers, training, options, CLI errors."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from convscale_plugins.vit.model import posemb_sincos_2d, resample_posemb
from convscale_plugins.vit.variants import VARIANTS, count_macs, count_params, param_shapes
from flax.traverse_util import flatten_dict

from convscale_cli.cli import main
from convscale_cli.errors import UnknownNameError, UsageError
from convscale_cli.plugins import get_registry


def _abstract(spec, image_size: int, **options):  # noqa: ANN001, ANN202
    module = spec.build(num_classes=options.pop("num_classes", 7), **options)
    x = jax.ShapeDtypeStruct((2, image_size, image_size, 3), jnp.float32)
    return module, jax.eval_shape(lambda x: module.init({"params": jax.random.key(0)}, x, train=False), x)


def _random_variables(module, image_size: int, seed: int = 0, scale: float = 0.1) -> dict:  # noqa: ANN001
    """Random parameters of the right shapes without compiling the initialisers (seconds on a 2-core CPU)."""
    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    abstract = jax.eval_shape(lambda x: module.init({"params": jax.random.key(0)}, x, train=False), x)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), jnp.float32), abstract)


def test_registry_holds_the_paper_shapes_ladder_and_test_model() -> None:
    registry = get_registry()
    names = {s.name for s in registry.architectures if s.family == "vit"}
    for key in ("ti", "s", "b", "l", "h", "g", "bigg", "so400m"):
        assert {f"vit-{key}/16", f"vit-{key}/14"} <= names
    assert {"vit-b/32", "vit-test"} <= names
    assert {f"vit-tiny-l{i}" for i in range(6)} <= names
    b16 = registry.architecture("vit-b/16")
    assert b16.resolution_multiple == 16 and b16.weight_sources == {"timm": "vit_base_patch16_224"}
    assert b16.recipe.optimizer == "adamw" and b16.recipe.agc_clip is None and b16.recipe.grad_clip_norm == 1.0
    assert "tiny" in registry.architecture("vit-test").tags
    assert all("ladder" in registry.architecture(f"vit-tiny-l{i}").tags for i in range(6))


def test_no_decay_covers_exactly_biases_norms_posemb_cls_and_probe() -> None:
    import re

    recipe = get_registry().architecture("vit-test").recipe
    shapes = param_shapes(VARIANTS["vit-test"].config, 10, pool="map")
    shapes.update(param_shapes(VARIANTS["vit-test"].config, 10, pool="tok"))
    exempt = {p for p in shapes if any(re.search(r, p) for r in recipe.no_decay)}
    for path in shapes:
        leaf = path.rsplit("/", 1)[-1]
        assert (path in exempt) == (leaf in {"bias", "scale", "pos_embedding", "cls", "probe"}), path


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("vit-test", {"pool": "tok"}),
        ("vit-test", {"pool": "gap", "posemb": "sincos2d"}),
        ("vit-test", {"pool": "map", "qkv_bias": False}),
        ("vit-tiny-l2", {}),
        ("vit-b/32", {"pool": "map"}),
    ],
)
def test_param_shapes_equal_the_flax_model(name: str, options: dict) -> None:
    spec = get_registry().architecture(name)
    variant = VARIANTS[name]
    _, variables = _abstract(spec, spec.train_resolution, **options)
    flat = {"/".join(k): tuple(v.shape) for k, v in flatten_dict(variables["params"]).items()}
    grid = spec.train_resolution // variant.config.patch_size
    assert flat == param_shapes(variant.config, 7, grid=grid, **options)
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(variables))
    if not options:
        assert spec.count(spec.train_resolution, 7).params == sum(math.prod(s) for s in flat.values())


def test_zhai_table2_and_sovit_params_and_flops() -> None:
    """Zhai et al. Table 2 counts the encoder without any head; SoViT's 428M includes the MAP head (variants.py)."""
    table = {  # name: (params in M, GFLOPs at 224, GFLOPs at 384)
        "vit-l/16": (303, 122.9, 382.8),
        "vit-g/14": (1011, 533.1, 1596.4),
        "vit-bigg/14": (1843, 965.3, 2859.9),
    }
    for name, (params_m, gflops224, gflops384) in table.items():
        config = VARIANTS[name].config
        params = count_params(config, 0, pool="gap", grid=224 // config.patch_size)
        assert round(params / 1e6) == params_m, name
        # 2 FLOPs per MAC; Zhai et al. also count a few non-matmul ops, hence a tolerance rather than equality.
        for resolution, gflops in ((224, gflops224), (384, gflops384)):
            assert 2 * count_macs(config, resolution, 0, pool="gap") / 1e9 == pytest.approx(gflops, rel=5e-3)
    so400m = VARIANTS["vit-so400m/14"].config
    assert round(count_params(so400m, 0, pool="map", grid=16) / 1e6) == 428


@pytest.mark.parametrize("pool", ["tok", "map"])
def test_macs_match_xla_cost_analysis(pool: str) -> None:
    # ViT-S/16 at 64 px: wide enough that matmuls dominate XLA's count, which also includes LayerNorm, softmax and
    # GELU (~12% extra at width 96, ~3% at width 384).
    spec = get_registry().architecture("vit-s/16")
    module, variables = _abstract(spec, 64, num_classes=10, pool=pool, resolution=64)
    x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    cost = jax.jit(lambda v, x: module.apply(v, x, train=False)).lower(variables, x).cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    macs = count_macs(VARIANTS["vit-s/16"].config, 64, 10, pool=pool)
    assert macs <= cost["flops"] / 2 <= 1.05 * macs


def test_tiny_vit_trains_on_cpu() -> None:
    spec = get_registry().architecture("vit-test")
    module = spec.build(num_classes=4, stochdepth_rate=0.1, drop_rate=0.1)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(8, 16, 16, 3)), jnp.float32)
    labels = jnp.arange(8) % 4
    params = jax.jit(lambda x: module.init({"params": jax.random.key(0)}, x, train=False))(images)["params"]
    tx = optax.adamw(3e-3)
    opt_state = tx.init(params)

    def loss_fn(params, key):  # noqa: ANN001, ANN202
        logits = module.apply({"params": params}, images, train=True, rngs={"dropout": key})
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @jax.jit
    def step(params, opt_state, key):  # noqa: ANN001, ANN202
        loss, grads = jax.value_and_grad(loss_fn)(params, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for i in range(8):
        params, opt_state, loss = step(params, opt_state, jax.random.key(i))
        losses.append(float(loss))
    assert np.isfinite(losses).all()
    assert losses[0] == pytest.approx(math.log(4), rel=1e-3)  # zero-initialised head: uniform start
    assert losses[-1] < losses[0] - 0.1


def test_train_mode_uses_the_dropout_stream_and_eval_is_deterministic() -> None:
    spec = get_registry().architecture("vit-test")
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 16, 16, 3)), jnp.float32)
    plain = spec.build(num_classes=3)
    noisy = spec.build(num_classes=3, stochdepth_rate=0.5, drop_rate=0.5)
    variables = _random_variables(plain, 16)
    apply_plain = jax.jit(plain.apply, static_argnames="train")
    apply_noisy = jax.jit(noisy.apply, static_argnames="train")
    eval_logits = apply_noisy(variables, x, train=False)
    np.testing.assert_allclose(eval_logits, apply_plain(variables, x, train=False), rtol=1e-6)
    a = apply_noisy(variables, x, train=True, rngs={"dropout": jax.random.key(2)})
    b = apply_noisy(variables, x, train=True, rngs={"dropout": jax.random.key(3)})
    assert not np.allclose(a, eval_logits) and not np.allclose(a, b)
    np.testing.assert_allclose(
        apply_plain(variables, x, train=True, rngs={"dropout": jax.random.key(2)}), eval_logits, rtol=1e-6
    )


def test_bfloat16_activations_keep_float32_params_and_logits() -> None:
    spec = get_registry().architecture("vit-test")
    module = spec.build(num_classes=5, dtype="bfloat16", pool="map")
    x = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
    abstract = jax.eval_shape(lambda x: module.init({"params": jax.random.key(0)}, x, train=False), x)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(abstract))
    logits = jax.jit(module.apply)(_random_variables(module, 16), jnp.ones((2, 16, 16, 3)))
    assert logits.dtype == jnp.float32 and logits.shape == (2, 5) and np.isfinite(logits).all()


def test_learned_posemb_is_resized_for_other_resolutions() -> None:
    spec = get_registry().architecture("vit-test")
    module = spec.build(num_classes=3, resolution=32)
    variables = _random_variables(module, 32)
    assert variables["params"]["pos_embedding"].shape == (1, 64, 32)
    x48 = jnp.asarray(np.random.default_rng(3).normal(size=(2, 48, 48, 3)), jnp.float32)
    assert np.isfinite(jax.jit(module.apply)(variables, x48)).all()
    # A constant table stays constant, and resizing to the same grid is the identity.
    table = jnp.full((1, 16, 8), 0.5)
    np.testing.assert_allclose(resample_posemb(table, (4, 4), (6, 6)), jnp.full((1, 36, 8), 0.5), rtol=1e-6)
    assert resample_posemb(table, (4, 4), (4, 4)) is table


def test_sincos_posemb_has_no_parameters_and_works_at_any_grid() -> None:
    table = posemb_sincos_2d(3, 5, 8)
    assert table.shape == (1, 15, 8)
    np.testing.assert_allclose(table[0, 0], [0, 0, 1, 1, 0, 0, 1, 1], atol=1e-7)  # sin(0), cos(0) at the origin


def test_bad_options_are_usage_errors_with_choices() -> None:
    spec = get_registry().architecture("vit-test")
    with pytest.raises(UnknownNameError, match="unknown pool 'mop': did you mean 'map'"):
        spec.build(num_classes=3, pool="mop")
    with pytest.raises(UnknownNameError, match="posemb"):
        spec.build(num_classes=3, posemb="rope")
    with pytest.raises(UsageError, match="num_classes must be a positive integer, got 0"):
        spec.build(num_classes=0)
    with pytest.raises(UsageError, match="resolution 30 is not a positive multiple of the patch size 4"):
        spec.build(num_classes=3, resolution=30)
    with pytest.raises(UnknownNameError, match="did you mean 'vit-b/16'"):
        get_registry().architecture("vit-b/61")
    module = spec.build(num_classes=3)
    with pytest.raises(UsageError, match="image size 18x18 is not divisible by the patch size 4"):
        jax.eval_shape(lambda x: module.init({"params": jax.random.key(0)}, x), jnp.zeros((1, 18, 18, 3)))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["models", "vit-b/16", "--resolution", "100"], "resolution 100 is not divisible by 16 as vit-b/16 requires"),
        (["models", "vit-test", "--num-classes", "0"], "--num-classes must be > 0, got 0"),
        (
            ["import-weights", "timm", "vit_base_patch16_244", "w.safetensors", "--out", "x"],
            "unknown timm model 'vit_base_patch16_244': did you mean 'vit_base_patch16_224'",
        ),
    ],
)
def test_cli_errors_are_one_line_with_exit_code_2(argv: list[str], message: str, capsys) -> None:  # noqa: ANN001
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_models_lists_vit_counts_from_the_plugin(capsys) -> None:  # noqa: ANN001
    import json

    assert main(["models", "vit-l/16", "--json", "--num-classes", "1000"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    config = VARIANTS["vit-l/16"].config
    assert row["params"] == count_params(config, 1000, grid=14)
    assert row["macs"] == count_macs(config, 224, 1000)
