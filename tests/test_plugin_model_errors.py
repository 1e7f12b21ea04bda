"""A third-party model that builds but fails when it is initialised or applied: one ``Error:`` line naming the plugin
and the model, exit 2, never a traceback, and the CLI keeps working for the next command.

The plugin is registered in code (as a notebook would) next to the engine tests' tiny CNN and in-memory dataset.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import _engine_helpers as helpers
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from convscale_cli import plugins as plugin_loader
from convscale_cli.hookspecs import hookimpl
from convscale_cli.registry import ArchitectureSpec, ModelCount


class Broken(nn.Module):
    """A mean-pool and dense head, failing as ``fail`` says: ``init`` (a bug in a parameter's initialiser), ``apply``
    (a shape the model did not expect, raised while tracing the training step), ``eval`` (only in evaluation) or
    ``shape`` (a real shape mismatch that JAX itself reports)."""

    num_classes: int
    fail: str = ""

    @nn.compact
    def __call__(self, x: Any, *, train: bool) -> Any:
        if self.fail == "init" and self.is_initializing():
            raise KeyError("depth")
        if self.fail == "apply" and not self.is_initializing():
            raise ValueError("expected 3 stages, got 2")
        if self.fail == "eval" and not train and not self.is_initializing():
            raise RuntimeError("no running statistics")
        x = x.astype(jnp.float32).mean(axis=(1, 2))
        if self.fail == "shape":
            x = x @ jnp.ones((x.shape[-1] + 1, 4))  # a matmul whose inner dimensions differ
        return nn.Dense(self.num_classes, name="head")(x)


def _build_broken(
    *, num_classes: int, dtype: str = "float32", drop_rate: float = 0.0, stochdepth_rate: float = 0.0, fail: str = ""
) -> Any:
    return Broken(num_classes=num_classes, fail=fail)


class BrokenPlugin:
    @hookimpl
    def register_architectures(self, register: Any) -> None:
        register(
            ArchitectureSpec(
                name="toy-broken",
                family="toy",
                build=_build_broken,
                count=lambda resolution, num_classes: ModelCount(100, 1000),
                train_resolution=helpers.NATIVE,
                eval_resolution=helpers.NATIVE,
                options={"fail": ""},
            )
        )


@pytest.fixture
def cli_plugins(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The tiny setup plus the broken model as the CLI's plugins for one test."""
    from convscale_plugins import trackers

    loaded = plugin_loader.load_plugins(
        extra=[("engine-test", helpers.TinyPlugin()), ("brokenmodels", BrokenPlugin()), ("trackers", trackers)],
        entry_points=lambda: [],
    )
    monkeypatch.setattr(plugin_loader, "_CACHE", loaded)
    return loaded


def _pretrain(out: Path, *extra: str) -> list[str]:
    args = ["pretrain", "--model", "toy-broken", "--dataset", "colours", "--steps", "2", "--batch-size", "16"]
    return [*args, "--precision", "fp32", "--out", str(out), *extra]


@pytest.mark.parametrize(
    ("fail", "reason"),
    [
        ("init", "init: KeyError: 'depth'"),
        ("apply", "apply: ValueError: expected 3 stages, got 2"),
        ("shape", "init: TypeError: dot_general requires contracting dimensions to have the same shape"),
        ("eval", "apply: RuntimeError: no running statistics"),
    ],
)
def test_a_model_that_fails_to_initialise_or_apply_is_one_error_line(
    cli_plugins: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str], fail: str, reason: str
) -> None:
    out = tmp_path / "run"
    code, stdout, err = helpers.run_cli(_pretrain(out, "--set", f"model_options.fail={fail}"), capsys)
    assert code == 2, err
    last = err.splitlines()[-1]
    assert last.startswith(f"Error: plugin 'brokenmodels': model 'toy-broken' failed in {reason}"), err
    assert "Traceback" not in err and "pybind11" not in err and "jax" not in last.lower(), err
    assert [line for line in err.splitlines() if line.startswith("Error:")] == [last]
    if fail != "eval":  # nothing was trained
        assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())
    # The CLI survives: the same run without the failing option (a different config, so --force) trains.
    code, _, err = helpers.run_cli(_pretrain(out, "--force"), capsys)
    assert code == 0, err


def test_a_checked_model_keeps_its_parameters_and_its_equality(cli_plugins: Any) -> None:
    """The checking subclass changes no parameter name, and two builds of one model stay one compiled program."""
    build = cli_plugins.registry.architecture("toy-broken").build
    first, second = build(num_classes=4), build(num_classes=4)
    assert first == second and hash(first) == hash(second) and type(first).__name__ == "Broken"
    assert isinstance(first, Broken) and type(first) is not Broken
    images = jnp.zeros((1, 8, 8, 3))
    checked = jax.eval_shape(lambda x: first.init({"params": jax.random.key(0)}, x, train=False), images)
    plain = jax.eval_shape(
        lambda x: _build_broken(num_classes=4).init({"params": jax.random.key(0)}, x, train=False), images
    )
    assert jax.tree.structure(checked) == jax.tree.structure(plain)
