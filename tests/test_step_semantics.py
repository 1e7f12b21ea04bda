"""What every training step must do, checked through whole runs so that a slip anywhere on the way to the step shows.

Each test names the plausible bug it exists to catch, bugs that leave a run finishing with sensible-looking numbers:

* fine-tuning that silently drops MixUp/CutMix (the option is validated and saved, but never reaches the step);
* an EMA that averages the parameters from before the step's update instead of after it (NFNet A.1/A.5 average the
  updated parameters, with the DeepMind warm-up ``min(decay, (1 + t) / (10 + t))``);
* a dropout / stochastic-depth key that does not change from step to step (every step would draw the same masks).

A probe model (the engine tests' tiny CNN, plus a host callback that records one draw from the ``dropout`` stream on
every training forward pass) is pre-trained for three steps and fine-tuned from there, in process, at fp32 and 8 px.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import _engine_helpers as helpers
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from convscale_cli import plugins as plugin_loader

PRETRAIN_STEPS, FINETUNE_STEPS, DECAY = 3, 2, 0.9
DRAWS: list[float] = []  # one value per training forward pass, appended by the probe's host callback


def _record(value: Any) -> None:
    DRAWS.append(float(value))


def build_probe(
    num_classes: int,
    dtype: str = "float32",
    stochdepth_rate: float = 0.0,
    drop_rate: float = 0.0,
    width: int = helpers.WIDTH,
) -> Any:
    """``helpers.build_tiny``'s layers (same names), recording a draw from the dropout stream when training."""
    import flax.linen as nn
    import jax.numpy as jnp

    class Probe(nn.Module):
        @nn.compact
        def __call__(self, x: Any, *, train: bool) -> Any:
            if train:
                jax.debug.callback(_record, jax.random.uniform(self.make_rng("dropout")))
            x = nn.gelu(nn.Conv(width, (3, 3), name="stem")(x.astype(jnp.float32)))
            x = nn.gelu(nn.Conv(width, (3, 3), strides=(2, 2), name="conv")(x)).mean(axis=(1, 2))
            x = nn.Dropout(drop_rate, deterministic=not train)(x)
            return nn.Dense(num_classes, name="head")(x)

    return Probe()


@pytest.fixture(scope="module")
def registry() -> Any:
    return plugin_loader.load_plugins(
        extra=[("semantics-test", helpers.TinyPlugin(model={"name": "probe-cnn", "build": build_probe}))],
        entry_points=lambda: [],
    ).registry


def _train(run: Any, config: Any, registry: Any) -> list[float]:
    """Run one training job and return the probe's draws of it."""
    DRAWS.clear()
    run(config, registry)
    jax.effects_barrier()
    return list(DRAWS)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory, registry: Any) -> tuple[Path, list[float]]:
    from convscale_cli.engine.api import pretrain

    out = tmp_path_factory.mktemp("pre") / "run"
    config = helpers.config(
        out, model="probe-cnn", steps=PRETRAIN_STEPS, ema_decay=DECAY, checkpoint_every=1, keep=PRETRAIN_STEPS,
        log_every=1, drop_rate=0.5,
    )  # fmt: skip
    return out, _train(pretrain, config, registry)


def _finetune(out: Path, pretrained: Path, registry: Any, **overrides: Any) -> tuple[Path, list[float]]:
    from convscale_cli.finetune.api import finetune
    from convscale_cli.finetune.config import FinetuneConfig

    values: dict[str, Any] = dict(
        pretrained=str(pretrained), dataset="colours", out=str(out), steps=FINETUNE_STEPS, batch_size=16,
        precision="fp32", resolution=8, eval_resolution=8, ema_decay=DECAY, sam_rho=0.0, log_every=1,
        checkpoint_every=1, keep=FINETUNE_STEPS, checkpoint_minutes=0.0, progress="none", tensorboard=False,
    )  # fmt: skip
    return out, _train(finetune, FinetuneConfig(**(values | overrides)), registry)


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory: pytest.TempPathFactory, registry: Any, pretrained: Any) -> tuple[Path, list[float]]:
    return _finetune(tmp_path_factory.mktemp("ft") / "run", pretrained[0], registry)


def _state(run: Path, step: int) -> dict[str, dict[str, np.ndarray]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sharding info not provided": host arrays are what we want
        tree = ocp.PyTreeCheckpointer().restore(run / "checkpoints" / str(step) / "state")
    flat = {}
    for name in ("params", "ema"):
        leaves = jax.tree_util.tree_flatten_with_path(tree[name])[0]
        flat[name] = {jax.tree_util.keystr(path): np.asarray(leaf, np.float64) for path, leaf in leaves}
    return flat


def _train_losses(run: Path, key: str = "loss") -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in records if r["split"] == "train"]


def _warm_decay(t: int) -> float:
    return min(DECAY, (1 + t) / (10 + t))


def _assert_ema_follows_updated_params(run: Path, first: int, last: int) -> None:
    """Between saved steps k-1 and k (update index t = k-1): ema_k = d_t ema_{k-1} + (1 - d_t) params_k."""
    before = _state(run, first)
    for step in range(first + 1, last + 1):
        after = _state(run, step)
        d = _warm_decay(step - 1)
        for path, ema in after["ema"].items():
            expected = d * before["ema"][path] + (1 - d) * after["params"][path]
            np.testing.assert_allclose(ema, expected, rtol=1e-5, atol=1e-7, err_msg=f"step {step} {path}")
        # The update moved the parameters, so an average of the old ones would be visibly different.
        moved = [p for p in after["params"] if not np.allclose(after["params"][p], before["params"][p], rtol=1e-3)]
        assert moved, f"step {step} left every parameter in place: the test cannot tell old from new"
        before = after


# --- the dropout key changes every step ------------------------------------------------------------------------------


def test_pretraining_draws_new_dropout_randomness_every_step(pretrained: tuple[Path, list[float]]) -> None:
    draws = pretrained[1]
    assert draws, "the probe never saw a training forward pass"
    assert len(set(draws)) == PRETRAIN_STEPS, f"{len(set(draws))} distinct dropout draws in {PRETRAIN_STEPS} steps"


def test_finetuning_draws_new_dropout_randomness_every_step(finetuned: tuple[Path, list[float]]) -> None:
    draws = finetuned[1]
    assert draws, "the probe never saw a training forward pass"
    assert len(set(draws)) == FINETUNE_STEPS, f"{len(set(draws))} distinct dropout draws in {FINETUNE_STEPS} steps"


# --- the EMA averages the updated parameters -------------------------------------------------------------------------


def test_pretraining_ema_averages_the_updated_parameters(pretrained: tuple[Path, list[float]]) -> None:
    _assert_ema_follows_updated_params(pretrained[0], 1, PRETRAIN_STEPS)


def test_finetuning_ema_averages_the_updated_parameters(
    pretrained: tuple[Path, list[float]], finetuned: tuple[Path, list[float]]
) -> None:
    run = finetuned[0]
    # The first update (t = 0, d = 0.1) averages the loaded backbone with the parameters after the step.
    loaded, first = _state(pretrained[0], PRETRAIN_STEPS)["params"], _state(run, 1)
    d = _warm_decay(0)
    for path, value in loaded.items():
        if "head" in path:
            continue  # the new head starts random, so its initial value is not in any checkpoint
        expected = d * value + (1 - d) * first["params"][path]
        np.testing.assert_allclose(first["ema"][path], expected, rtol=1e-5, atol=1e-7, err_msg=path)
    _assert_ema_follows_updated_params(run, 1, FINETUNE_STEPS)


# --- fine-tuning's MixUp and CutMix reach the step -------------------------------------------------------------------


@pytest.mark.parametrize("option", ["mixup", "cutmix"])
def test_finetuning_mixes_the_batch_when_asked(
    tmp_path: Path,
    registry: Any,
    pretrained: tuple[Path, list[float]],
    finetuned: tuple[Path, list[float]],
    option: str,
) -> None:
    """Same seed, data and initial weights: only the mixing differs, so the first step's gradient must differ.

    The new head starts near 0, so the first loss is about log C whatever the targets; the gradient is not: the
    head's is (softmax - targets) x features, and mixing changes both the targets and the features.
    """
    mixed, _ = _finetune(tmp_path / option, pretrained[0], registry, steps=1, **{option: 1.0})
    plain = _train_losses(finetuned[0], "grad_norm")[0]
    with_mixing = _train_losses(mixed, "grad_norm")[0]
    assert abs(with_mixing - plain) > 0.01 * abs(plain), f"{option}=1.0 left the first gradient norm at {plain}"
