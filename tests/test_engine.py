"""Unit tests of the engine's pieces: durations, optimiser (AGC, decay masks, schedule), losses, config, ledger."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from convscale_cli.budget import parse_budget
from convscale_cli.engine.config import PretrainConfig
from convscale_cli.engine.ledger import Ledger
from convscale_cli.engine.mesh import check_batch, fsdp_spec
from convscale_cli.engine.optim import (
    WarmupStableDecay,
    clip_by_global_norm,
    current_learning_rate,
    learning_rate_schedule,
    make_optimizer,
    param_path,
    peak_learning_rate,
    recipe_schedule,
)
from convscale_cli.engine.step import per_example_loss, topk_correct
from convscale_cli.engine.steps import resolve_duration
from convscale_cli.errors import ConfigError, UsageError
from convscale_cli.recipe import Recipe


def test_fractional_epochs_are_exact_examples() -> None:
    d = resolve_duration(train_size=1000, batch_size=64, epochs=0.25)
    assert (d.examples, d.steps, d.epochs) == (250, 4, 0.25)
    assert resolve_duration(train_size=1000, batch_size=64, steps=3).examples == 192
    assert resolve_duration(train_size=1000, batch_size=64, examples=65).steps == 2


def test_flop_budget_sets_the_duration() -> None:
    d = resolve_duration(train_size=10**6, batch_size=10, budget_flops=1e6, flops_per_example=3e4)
    assert d.examples == 33 and d.steps == 4


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({}, "exactly one duration"),
        ({"epochs": 1.0, "steps": 3}, "exactly one duration"),
        ({"epochs": -1.0}, "epochs -1.0 must be > 0"),
        ({"steps": 0}, "steps 0 must be > 0"),
        ({"epochs": 1e-9}, "< 1 example"),
    ],
)
def test_bad_durations(kwargs: dict, needle: str) -> None:
    with pytest.raises(UsageError, match=needle):
        resolve_duration(train_size=100, batch_size=8, **kwargs)


def _params() -> dict:
    rng = np.random.default_rng(0)
    return {
        "conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32), "bias": jnp.ones(4)},
        "head": {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32), "bias": jnp.zeros(3)},
    }


def test_agc_clips_unitwise_except_excluded_and_decay_skips_biases() -> None:
    params = _params()
    grads = jax.tree_util.tree_map(lambda p: 1e3 * jnp.ones_like(p), params)
    recipe = Recipe(momentum=0.0, nesterov=False, weight_decay=0.5, agc_exclude=(r"^head/kernel$",))
    tx = make_optimizer(recipe, optax.constant_schedule(1.0))
    updates, _ = tx.update(grads, tx.init(params), params)
    # conv kernel: each output unit's gradient is rescaled to lambda * ||W_unit|| (NFNet §4), then L2 decay is added.
    w = params["conv"]["kernel"]
    g = -updates["conv"]["kernel"] - 0.5 * w
    unit_norm = lambda x: jnp.sqrt((x**2).sum(axis=(0, 1, 2)))  # noqa: E731
    np.testing.assert_allclose(unit_norm(g), 0.01 * unit_norm(w), rtol=1e-5)
    # head kernel is not clipped; the bias is clipped (whole-vector norm, eps floor) and gets no decay.
    np.testing.assert_allclose(-updates["head"]["kernel"], 1e3 + 0.5 * params["head"]["kernel"], rtol=1e-6)
    bias_update = -updates["head"]["bias"]
    np.testing.assert_allclose(jnp.linalg.norm(bias_update), 0.01 * 1e-3, rtol=1e-5)


def test_nesterov_sgd_matches_optax_sgd_without_clipping() -> None:
    params = _params()
    grads = jax.tree_util.tree_map(lambda p: 0.1 * jnp.ones_like(p), params)
    recipe = Recipe(agc_clip=None, weight_decay=0.0)
    tx, ref = make_optimizer(recipe, optax.constant_schedule(0.3)), optax.sgd(0.3, momentum=0.9, nesterov=True)
    s, r = tx.init(params), ref.init(params)
    for _ in range(3):
        u, s = tx.update(grads, s, params)
        v, r = ref.update(grads, r, params)
    for a, b in zip(jax.tree_util.tree_leaves(u), jax.tree_util.tree_leaves(v), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("max_norm", [0.5, 1.0, 100.0])
def test_global_norm_clipping_matches_optax(max_norm: float) -> None:
    grads = jax.tree_util.tree_map(lambda p: jnp.cos(jnp.arange(p.size, dtype=p.dtype)).reshape(p.shape), _params())
    norm = float(optax.tree.norm(grads))
    assert 0.5 < norm < 100.0  # one case clips, one passes unchanged
    ours, _ = clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
    ref, _ = optax.clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
    for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(ref), strict=True):
        if norm <= max_norm:
            np.testing.assert_array_equal(a, b)
        else:
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
    assert float(optax.tree.norm(ours)) == pytest.approx(min(norm, max_norm), rel=1e-6)


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_vit_optimizers_build_and_step(name: str) -> None:
    params = _params()
    tx = make_optimizer(Recipe(optimizer=name, agc_clip=None, grad_clip_norm=1.0), optax.constant_schedule(1e-3))
    updates, _ = tx.update(jax.tree_util.tree_map(jnp.ones_like, params), tx.init(params), params)
    assert all(bool(jnp.isfinite(u).all()) for u in jax.tree_util.tree_leaves(updates))


def test_schedule_warms_up_then_decays_to_zero_and_lr_scales_with_batch() -> None:
    assert peak_learning_rate(1.6, 256, 4096) == pytest.approx(0.1)
    sched = learning_rate_schedule(0.8, total_steps=100, warmup_fraction=0.1)
    assert float(sched(0)) == 0.0
    assert float(sched(10)) == pytest.approx(0.8)
    assert float(sched(55)) == pytest.approx(0.4, rel=1e-3)
    assert float(sched(100)) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize(("shape", "halfway"), [("linear", 0.4), ("1-sqrt", 0.8 * (1 - 0.5**0.5))])
def test_wsd_schedule_warms_up_holds_then_cools_down_over_the_last_fraction(shape: str, halfway: float) -> None:
    recipe = Recipe(schedule="wsd", warmup_fraction=0.1, cooldown_fraction=0.2, cooldown_shape=shape)
    sched = recipe_schedule(recipe, 0.8, 100)
    assert isinstance(sched, WarmupStableDecay) and (sched.warmup_steps, sched.cooldown_steps) == (10, 20)
    lrs = [float(sched(s)) for s in range(101)]
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.4)
    assert lrs[10:81] == pytest.approx([0.8] * 71)  # constant from the end of warm-up to the cooldown start
    assert lrs[90] == pytest.approx(halfway, rel=1e-5) and lrs[100] == 0.0
    assert all(a >= b for a, b in zip(lrs[80:], lrs[81:], strict=False))
    # A shorter budget's schedule equals the longer one's up to its own cooldown start: branching can share it.
    longer = recipe_schedule(recipe, 0.8, 400)
    assert [float(longer(s)) for s in range(40, 81)] == pytest.approx(lrs[40:81])
    assert isinstance(recipe_schedule(Recipe(), 0.8, 100), type(learning_rate_schedule(0.8, 100, 0.05)))


def test_wsd_numbers_live_in_the_optimiser_state_and_compile_once() -> None:
    params = _params()
    recipe = Recipe(schedule="wsd", cooldown_shape="1-sqrt")
    short, long = recipe_schedule(recipe, 0.8, 50), recipe_schedule(recipe, 0.4, 500)
    tx_short, tx_long = make_optimizer(recipe, short), make_optimizer(recipe, long)
    state_short, state_long = tx_short.init(params), tx_long.init(params)
    assert float(state_long.hyperparams["cooldown_steps"]) == 100.0
    for step in (0, 3, 45, 49):
        assert float(current_learning_rate(state_short, step, short)) == pytest.approx(float(short(step)))
    grads = jax.tree_util.tree_map(jnp.ones_like, params)

    def update(tx, state):
        return tx.update(grads, state, params)[0]

    # The two runs differ only in numbers held by the state, so one traced program serves both (as for cosine).
    lowered = [
        jax.jit(update, static_argnums=0).lower(tx, st).as_text()
        for tx, st in ((tx_short, state_short), (tx_long, state_long))
    ]
    assert lowered[0] == lowered[1]


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"schedule": "linear"}, "schedule must be cosine or wsd"),
        ({"cooldown_shape": "sqrt"}, "cooldown_shape must be linear or 1-sqrt"),
        ({"cooldown_fraction": 0.0}, "cooldown_fraction must be in"),
        ({"cooldown_fraction": 0.99}, "cooldown_fraction must be in"),
    ],
)
def test_recipe_refuses_bad_schedules(fields: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Recipe(**fields)


def test_param_path_joins_dict_keys() -> None:
    paths = [param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(_params())[0]]
    assert "conv/kernel" in paths and "head/bias" in paths


def test_losses_match_optax_and_handle_multi_hot() -> None:
    logits = jnp.asarray([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]])
    labels = jnp.asarray([0, 2])
    smooth = optax.smooth_labels(jax.nn.one_hot(labels, 3), 0.1)
    np.testing.assert_allclose(
        per_example_loss(logits, labels, loss="softmax", num_classes=3, label_smoothing=0.1),
        optax.softmax_cross_entropy(logits, smooth),
        rtol=1e-6,
    )
    sig = per_example_loss(logits, labels, loss="sigmoid", num_classes=3)
    np.testing.assert_allclose(sig, optax.sigmoid_binary_cross_entropy(logits, jax.nn.one_hot(labels, 3)).sum(-1))
    multi = jnp.asarray([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    soft = per_example_loss(logits, multi, loss="softmax", num_classes=3)
    np.testing.assert_allclose(soft, optax.softmax_cross_entropy(logits, multi / multi.sum(-1, keepdims=True)))
    assert topk_correct(logits, labels, 1).tolist() == [1.0, 1.0]
    assert topk_correct(logits, jnp.asarray([1, 0]), 1).tolist() == [0.0, 0.0]
    assert topk_correct(logits, jnp.asarray([1, 0]), 2).tolist() == [1.0, 0.0]
    assert topk_correct(logits, multi, 1).tolist() == [1.0, 1.0]


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"epochs": 0.0}, "epochs = 0.0 must be > 0"),
        ({"epochs": 1.0, "lr": 0.0}, "lr = 0.0 must be > 0"),
        ({"epochs": 1.0, "steps": 5}, "give one duration"),
        ({}, "no duration"),
        ({"epochs": 1.0, "recipe": {"weight_decy": 1.0}}, "did you mean 'recipe.weight_decay'"),
        ({"epochs": 1.0, "budget": "3-parsecs"}, "unknown budget unit"),
        ({"epochs": 1.0, "keep": 0}, "keep = 0 must be >= 1"),
    ],
)
def test_config_validation(kwargs: dict, needle: str) -> None:
    with pytest.raises((ConfigError, UsageError), match=needle):
        PretrainConfig(model="m", dataset="d", out="o", **kwargs)


def test_ledger_accounts_and_round_trips() -> None:
    ledger = Ledger(flops_per_example=6e9, num_devices=4, hardware="tpu-v4", peak_flops=137.5e12)
    ledger.add_steps(10, 40_000)
    ledger.charge("train", 100.0)
    ledger.charge("compile", 5.0)
    assert ledger.train_flops == 2.4e14
    assert ledger.device_seconds["train"] == 400.0
    assert ledger.img_per_sec_per_device == 100.0
    assert ledger.mfu == pytest.approx(2.4e14 / (400 * 137.5e12))
    assert ledger.spent(parse_budget("1e14-flops")) == 2.4e14
    # Every budget is counted in model FLOPs; a device-hour one at its hardware's peak x MFU, as `plan` converts it.
    assert ledger.spent(parse_budget("1-cpu-hours")) == pytest.approx(2.4e14 / parse_budget("1-cpu-hours").to_flops())
    assert ledger.spent(parse_budget("2-h100-hours")) == pytest.approx(2.4e14 / parse_budget("1-h100-hours").to_flops())
    assert ledger.spent(parse_budget("1-core-hours")) == pytest.approx(ledger.core_hours)
    again = Ledger.from_dict(ledger.to_dict())
    assert again == ledger and again.summary()["train_flops"] == 2.4e14


def test_the_cpu_peak_is_the_documented_one_so_mfu_compares_across_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """A matmul timed at the start of each run read 2.2e10-9.4e10 FLOP/s on a loaded machine, so one run's MFU could
    not be set against another's; the peak is the configured one (README: default 1.6e11), shared by the devices."""
    from convscale_cli.budget import CPU_PEAK_ENV, DEFAULT_CPU_PEAK_FLOPS
    from convscale_cli.engine.hardware import device_peak

    monkeypatch.delenv(CPU_PEAK_ENV, raising=False)
    devices = jax.local_device_count()
    assert device_peak() == ("cpu", DEFAULT_CPU_PEAK_FLOPS / devices)
    monkeypatch.setenv(CPU_PEAK_ENV, "4e11")
    assert device_peak() == ("cpu", 4e11 / devices)
    assert device_peak(peak_flops=1e9) == ("cpu", 1e9)  # --peak-flops is per device, as given


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="resetting the peak needs Linux's /proc")
def test_host_peak_memory_is_reset_per_run() -> None:
    """A sweep's runs share one process: without the reset each run would report the largest before it."""
    from convscale_cli.engine.ledger import host_peak_memory, reset_host_peak_memory

    reset_host_peak_memory()
    block = np.ones(64 << 20, np.uint8)  # 64 MiB, touched
    high = host_peak_memory()
    del block
    reset_host_peak_memory()
    low = host_peak_memory()
    assert high - low > 48 << 20 and Ledger().summary()["host_peak_memory_bytes"] >= low


def test_batch_divisibility_error_names_devices() -> None:
    class FakeMesh:
        size = 4

    with pytest.raises(UsageError, match="batch size 10 is not divisible by 4 devices"):
        check_batch(10, FakeMesh(), 1)  # type: ignore[arg-type]
    check_batch(12, FakeMesh(), 2)  # type: ignore[arg-type]


def test_fsdp_shards_largest_divisible_dimension() -> None:
    assert tuple(fsdp_spec((3, 3, 64, 128), 4)) == (None, None, None, "data")
    assert tuple(fsdp_spec((8,), 4)) == ()  # small arrays stay replicated
    assert tuple(fsdp_spec((4099, 3), 4)) == ()  # nothing divisible


def _tiny_specs() -> list:
    from convscale_cli.plugins import load_plugins

    return [s for s in load_plugins().registry.architectures if "tiny" in s.tags]


@pytest.mark.parametrize("spec", _tiny_specs(), ids=lambda s: s.name)
def test_recipe_masks_match_real_parameter_names(spec: object) -> None:
    """Each family's recipe regexes name real parameters: AGC skips exactly the classifier, decay skips gains."""
    from convscale_cli.engine.optim import path_mask

    model = spec.build(num_classes=7, dtype="float32", stochdepth_rate=0.0, drop_rate=0.0)  # type: ignore[attr-defined]
    res = spec.train_resolution  # type: ignore[attr-defined]
    params = jax.eval_shape(
        lambda: model.init({"params": jax.random.PRNGKey(0)}, jnp.zeros((1, res, res, 3)), train=False)["params"]
    )
    recipe = spec.recipe  # type: ignore[attr-defined]
    excluded = [
        (path, leaf.shape)
        for (path, leaf), hit in zip(
            jax.tree_util.tree_flatten_with_path(params)[0],
            jax.tree_util.tree_leaves(path_mask(recipe.agc_exclude, match=True)(params)),
            strict=True,
        )
        if hit
    ]
    if recipe.agc_clip is not None:
        assert len(excluded) == 1 and excluded[0][1][-1] == 7, excluded  # the classifier weight only
    no_decay = jax.tree_util.tree_leaves(path_mask(recipe.no_decay, match=True)(params))
    assert 0 < sum(no_decay) < len(no_decay)


def test_gradient_accumulation_is_the_large_batch_update() -> None:
    import _engine_helpers as helpers

    from convscale_cli.engine.state import TrainState
    from convscale_cli.engine.step import train_step

    model = helpers.build_tiny(4)
    rng = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(rng.integers(0, 255, (8, 8, 8, 3)), jnp.uint8),
        "label": jnp.asarray(rng.integers(0, 4, 8), jnp.int32),
        "mask": jnp.asarray([1, 1, 1, 1, 1, 0, 0, 0], jnp.float32),  # a padded final batch: the mean is over 5
    }
    params = model.init({"params": jax.random.key(0)}, jnp.zeros((1, 8, 8, 3)), train=False)["params"]
    tx = optax.sgd(0.5, momentum=0.9)
    kwargs = dict(model=model, tx=tx, schedule=optax.constant_schedule(0.5), loss="softmax", num_classes=4,
                  normalize=lambda x: x.astype(jnp.float32) / 255.0)  # fmt: skip
    outs = {}
    for k in (1, 2, 4):
        state = TrainState.create(params, tx, jax.random.key(1))
        for _ in range(2):  # twice: the optimiser state carries the accumulated gradient too
            state, metrics = train_step(state, batch, accum_steps=k, **kwargs)
        outs[k] = (state, metrics)
    for k in (2, 4):
        for a, b in zip(jax.tree.leaves(outs[1][0].params), jax.tree.leaves(outs[k][0].params), strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
        for key in ("loss", "top1", "grad_norm", "examples"):
            np.testing.assert_allclose(outs[k][1][key], outs[1][1][key], rtol=1e-5, err_msg=key)
    with pytest.raises(ValueError, match="batch of 8 examples into 3 micro-batches"):
        train_step(TrainState.create(params, tx, jax.random.key(1)), batch, accum_steps=3, **kwargs)


def test_held_out_batches_are_read_once_and_reused_by_later_evaluations() -> None:
    # Worker processes (--workers N) start for every pass over a loader: a small held-out set is read once.
    from convscale_cli.engine.build import Evaluate
    from convscale_cli.engine.ledger import Ledger

    calls = []
    batches = [
        {"image": np.full((4, 2, 2, 3), i, np.uint8), "label": np.arange(4), "mask": np.ones(4, np.float32)}
        for i in range(3)
    ]

    class Pipeline:
        @staticmethod
        def eval_loader(source, **kwargs):  # noqa: ANN001, ANN003, ANN205
            calls.append(kwargs)
            return iter(batches)

    def eval_fn(params, batch):  # noqa: ANN001, ANN202
        n = float(batch["mask"].sum())
        return {"loss_sum": n * params, "top1_sum": n / 2, "top5_sum": n, "count": n}

    ledger = Ledger(flops_per_example=1.0, num_devices=1, hardware="cpu", peak_flops=1e9)
    evaluate = Evaluate(eval_fn, [0] * 12, pipeline=Pipeline, batch_size=4, resolution=2, crop_fraction=1.0,
                        worker_count=2, to_device=lambda b: b, ledger=ledger)  # fmt: skip
    first, second = evaluate(1.0), evaluate(2.0)
    assert len(calls) == 1 and first["eval_top1"] == second["eval_top1"] == 0.5
    assert (first["eval_loss"], second["eval_loss"]) == (1.0, 2.0)  # the parameters still change the result


def test_a_held_out_set_too_large_to_keep_is_read_by_one_live_iteration(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every evaluation takes one pass from the same ``Loader.passes`` iteration (its workers start once); an
    evaluation cut short drops that iteration, so the next one starts at the first batch, not mid-pass."""
    import itertools
    import time

    from convscale_cli.engine import build
    from convscale_cli.engine.ledger import Ledger

    monkeypatch.setattr(build, "EVAL_CACHE_BYTES", 0)
    started = []

    class Loader:
        def __len__(self) -> int:
            return 3

        def passes(self):  # noqa: ANN202
            started.append(1)
            time.sleep(0.2)  # the workers starting
            for i in itertools.cycle(range(3)):
                yield {"image": np.full((2, 1, 1, 3), i, np.uint8), "label": np.arange(2), "mask": np.ones(2)}

    class Pipeline:
        @staticmethod
        def eval_loader(source, **kwargs):  # noqa: ANN001, ANN003, ANN205
            return Loader()

    seen = []

    def eval_fn(params, batch):  # noqa: ANN001, ANN202
        seen.append(int(batch["image"][0, 0, 0, 0]))
        if params == "fail" and len(seen) == 2:
            raise RuntimeError("interrupted")
        return {"loss_sum": float(seen[-1]), "top1_sum": 0.0, "top5_sum": 0.0, "count": 2.0}

    ledger = Ledger(num_devices=1)
    evaluate = build.Evaluate(eval_fn, None, pipeline=Pipeline, batch_size=2, resolution=1, crop_fraction=1.0,
                              worker_count=2, to_device=lambda b: b, ledger=ledger)  # fmt: skip
    assert [evaluate(1.0)["eval_loss"] for _ in range(3)] == [0.5, 0.5, 0.5]  # (0 + 1 + 2) / 6 each time
    assert seen == [0, 1, 2] * 3 and started == [1]
    assert ledger.device_seconds["loader_startup"] >= 0.2 and ledger.device_seconds["eval"] < 0.2
    seen.clear()
    with pytest.raises(RuntimeError):
        evaluate("fail")
    assert evaluate(1.0)["eval_loss"] == 0.5 and seen[2:] == [0, 1, 2] and started == [1, 1]
    evaluate.close()
