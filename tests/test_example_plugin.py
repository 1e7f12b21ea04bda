"""The example third-party package (examples/convscale-resnet) installs and plugs in like any other."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "convscale-resnet"


@pytest.fixture(scope="module")
def example_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """pip-install the example package into a private target directory (a real dist-info with its entry point)."""
    site = tmp_path_factory.mktemp("site")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(site),
            str(EXAMPLE),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return {**os.environ, "PYTHONPATH": str(site)}


def _json(args: list[str], env: dict[str, str]) -> list[dict]:
    result = subprocess.run(
        [sys.executable, "-m", "convscale_cli", *args, "--json"], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_installed_example_adds_its_model_dataset_and_plugin(example_env: dict[str, str]) -> None:
    models = {row["name"]: row for row in _json(["models", "resnet"], example_env)}
    assert models["resnet-mini"]["plugin"] == "resnet" and models["resnet-mini"]["family"] == "resnet"
    assert {row["name"] for row in _json(["datasets", "bars"], example_env)} == {"bars"}
    plugin = {row["name"]: row for row in _json(["plugins"], example_env)}["resnet"]
    assert plugin["source"] == "entry point (convscale-resnet)" and plugin["error"] is None
    assert sorted(plugin["hooks"]) == ["register_architectures", "register_datasets"]


def test_example_counts_match_the_flax_model(monkeypatch: pytest.MonkeyPatch) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    monkeypatch.syspath_prepend(str(EXAMPLE))
    import convscale_resnet

    captured: list = []
    convscale_resnet.register_architectures(register=captured.append)
    spec = captured[0]
    model = spec.build(num_classes=7)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == spec.count(32, 7).params
    cost = (
        jax.jit(lambda v, x: model.apply(v, x))
        .lower(model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))), jnp.zeros((1, 32, 32, 3)))
        .compile()
        .cost_analysis()
    )
    cost = cost[0] if isinstance(cost, list) else cost
    # The analytic count charges every 3x3 tap (like DeepMind's count_flops); XLA skips taps that fall on the SAME
    # padding, which is a visible share at 8x8 feature maps, and adds the elementwise ops.
    assert 0.9 < cost["flops"] / 2 / spec.count(32, 7).macs < 1.1


def test_example_study_names_the_examples_models_and_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    from convscale_cli.plugins import load_plugins
    from convscale_cli.sweep import load_study, plan_cells

    monkeypatch.syspath_prepend(str(EXAMPLE))
    import convscale_resnet

    registry = load_plugins([("resnet", convscale_resnet)], strict=True, entry_points=lambda: []).registry
    study = load_study(EXAMPLE / "study.toml")
    cells = plan_cells(study, registry)
    assert {(c.model, c.epochs) for c in cells} == {(m, e) for m in study.models for e in study.epochs}
