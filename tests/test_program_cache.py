"""The in-process program cache: later runs of a model reuse its compiled steps, and train exactly as if they had not.

The engine tests' tiny setup, with the model's module class defined once (``_engine_helpers.build_tiny`` defines a
new class per build, which never matches a cached program, as a plugin's unhashable module would not).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import _engine_helpers as helpers
import pytest

from convscale_cli.engine.api import pretrain
from convscale_cli.engine.cache import clear_programs, program, program_stats
from convscale_cli.hookspecs import hookimpl


@functools.cache
def _module() -> Any:
    import flax.linen as nn
    import jax.numpy as jnp

    class Stable(nn.Module):
        num_classes: int
        dtype: str = "float32"

        @nn.compact
        def __call__(self, x: Any, *, train: bool) -> Any:
            x = nn.gelu(nn.Conv(helpers.WIDTH, (3, 3), dtype=self.dtype, name="stem")(x.astype(self.dtype)))
            x = nn.gelu(nn.Conv(helpers.WIDTH, (3, 3), strides=(2, 2), dtype=self.dtype, name="conv")(x))
            return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x.mean(axis=(1, 2))).astype(jnp.float32)

    return Stable


def build_stable(num_classes: int, dtype: str = "float32", stochdepth_rate: float = 0.0, drop_rate: float = 0.0) -> Any:
    return _module()(num_classes=num_classes, dtype=dtype)


class StablePlugin:
    @hookimpl
    def register_architectures(self, register: Any) -> None:
        tiny = helpers.registry().architecture("tiny-cnn")
        register(dataclasses.replace(tiny, name="stable-cnn", build=build_stable, options={}))


@pytest.fixture(scope="module")
def registry() -> Any:
    from convscale_cli.plugins import load_plugins

    plugins = [("engine-test", helpers.TinyPlugin()), ("stable", StablePlugin())]
    return load_plugins(extra=plugins, entry_points=lambda: []).registry


@pytest.fixture(autouse=True)
def _empty_cache() -> Any:
    clear_programs()
    yield
    clear_programs()


def train(registry: Any, out: Path, **overrides: Any) -> dict[str, Any]:
    return pretrain(helpers.config(out, model="stable-cnn", checkpoint_every=0, **overrides), registry)


def losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["split"] == "train"]


def test_later_runs_reuse_the_programs_and_train_bit_for_bit_alike(registry: Any, tmp_path: Path) -> None:
    train(registry, tmp_path / "first", lr=0.4, steps=8)
    compiled = program_stats()["misses"]
    assert compiled > 0 and program_stats()["hits"] == 0

    # Another learning rate and length: those numbers live in the optimiser state, so nothing is traced again and
    # every program of the first run is reused.
    reused = train(registry, tmp_path / "reused", lr=0.2, steps=12)
    assert program_stats() == {"hits": compiled, "misses": compiled, "kept": compiled}
    assert reused["ledger"]["device_seconds"]["compile"] < 1.0

    clear_programs()
    fresh = train(registry, tmp_path / "fresh", lr=0.2, steps=12)
    assert program_stats()["misses"] == compiled
    assert reused["final"] == fresh["final"]
    assert losses(tmp_path / "reused") == losses(tmp_path / "fresh")
    assert len(losses(tmp_path / "fresh")) == 3  # logged every 4 of 12 steps


def test_what_changes_the_program_is_traced_again(registry: Any, tmp_path: Path) -> None:
    def delta(before: dict[str, int]) -> tuple[int, int]:
        after = program_stats()
        return after["hits"] - before["hits"], after["misses"] - before["misses"]

    train(registry, tmp_path / "a")
    # Each of these changes some programs (traced again) and leaves others (reused): another weight decay changes
    # the optimiser but not the model; another seed the initialiser but not the steps; another batch size the steps
    # but not the initialiser.
    for name, change in (("b", {"recipe": {"weight_decay": 1e-4}}), ("c", {"seed": 1}), ("d", {"batch_size": 8})):
        before = program_stats()
        train(registry, tmp_path / name, **change)
        hits, misses = delta(before)
        assert hits > 0 and misses > 0, (change, hits, misses)
    # The test double's module class is new in every build: never a hit.
    before = program_stats()
    pretrain(helpers.config(tmp_path / "e", checkpoint_every=0), registry)
    pretrain(helpers.config(tmp_path / "f", checkpoint_every=0), registry)
    assert delta(before)[0] == 0


def test_an_unhashable_key_is_computed_every_time() -> None:
    calls: list[int] = []
    for _ in range(2):
        assert program(("test", [1, 2]), lambda: calls.append(1) or len(calls)) == len(calls)
    assert len(calls) == 2 and program_stats()["kept"] == 0

    class ArrayLike:  # hashable, but == fails, as a module field holding a numpy array would
        def __hash__(self) -> int:
            return 0

        def __eq__(self, other: object) -> bool:
            raise ValueError("The truth value of an array with more than one element is ambiguous")

    assert program(("test", ArrayLike()), lambda: 0) == 0
    assert program(("test", ArrayLike()), lambda: 1) == 1  # compared, fails to compare: computed, not shared
    assert program_stats()["kept"] == 1
