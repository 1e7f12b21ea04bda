"""Every registered model keeps the model contract (timm's tests/test_models.py does the same over ``list_models()``).

For each architecture the installed plugins register (the built-in NFNet and ViT families arrive through the same
entry points as a third-party package's): it builds; its parameters, found by ``jax.eval_shape`` of its initialiser
without allocating them, are exactly the ``count()`` that ``plan`` and the FLOP budgets rely on; its forward pass maps
``[batch, H, W, 3]`` images to float32 ``[batch, classes]`` logits; and models small enough to run on a CPU in a
fraction of a second are run, at a small resolution, and their logits are finite. The paper-scale variants are
checked abstractly only: their forward pass is traced, never executed.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from convscale_cli.plugins import load_plugins

NUM_CLASSES, BATCH = 7, 2
RUN_BELOW = 2_500_000  # parameters: larger models are traced, never run
TRACE_FAST_BELOW = 30_000_000  # parameters: larger models are traced in the slow suite only
# The tests check values, not speed: compiling without LLVM optimisation halves XLA's CPU compile time.
FAST_COMPILE = {"xla_backend_optimization_level": 0}

SPECS = load_plugins(strict=True).registry.architectures


def _resolution(spec: Any) -> int:
    """The smallest resolution of at least 32 px that the model accepts."""
    multiple = spec.resolution_multiple
    return max(math.ceil(max(32, spec.min_resolution) / multiple) * multiple, multiple)


def _abstract(spec: Any) -> tuple[Any, Any, Any, Any]:
    """The module, its abstract logits and variables (one trace of ``init``, which runs the forward pass), and the
    abstract images."""
    import jax
    import jax.numpy as jnp

    module = spec.build(num_classes=NUM_CLASSES, dtype="float32")
    size = _resolution(spec)
    images = jax.ShapeDtypeStruct((BATCH, size, size, 3), jnp.float32)
    key = jax.random.key(0)
    out, variables = jax.eval_shape(lambda x: module.init_with_output({"params": key}, x, train=False), images)
    return module, out, variables, images


def _cases(specs: Any, *, run: bool) -> list[Any]:
    """One case per model: all of them traced (``run=False``), or those small enough to run (``run=True``).

    The fast suite traces every model below the paper's scale and runs each family's tiny variant; the rest are slow
    tests (tracing an NFNet-F forward pass takes 15-60 s on a 2-core CPU, where its grouped convolutions are split
    per group, and compiling each ladder model's takes seconds), so CI still checks every model.
    """
    cases = []
    for spec in specs:
        params = spec.count(_resolution(spec), NUM_CLASSES).params
        if run and params >= RUN_BELOW:
            continue
        slow = "tiny" not in spec.tags if run else params >= TRACE_FAST_BELOW
        cases.append(pytest.param(spec, id=spec.name, marks=[pytest.mark.slow] if slow else []))
    return cases


def test_the_registry_holds_both_families_and_their_tiny_variants() -> None:
    families = {spec.family for spec in SPECS}
    assert {"nfnet", "vit"} <= families
    for family in families:  # every family registers a tiny variant for tests and laptop studies
        assert any("tiny" in spec.tags for spec in SPECS if spec.family == family), family


@pytest.mark.parametrize("spec", _cases(SPECS, run=False))
def test_count_and_output_shape_match_the_built_model(spec: Any) -> None:
    import jax
    import jax.numpy as jnp

    _, out, variables, images = _abstract(spec)
    assert set(variables) == {"params"}, f"{spec.name} keeps state besides its parameters: {sorted(variables)}"
    leaves = jax.tree_util.tree_leaves(variables["params"])
    assert all(leaf.dtype == jnp.float32 for leaf in leaves), "parameters are kept in float32"
    counted = spec.count(images.shape[1], NUM_CLASSES).params
    assert sum(math.prod(leaf.shape) for leaf in leaves) == counted, f"count() of {spec.name}"
    assert (out.shape, out.dtype) == ((BATCH, NUM_CLASSES), jnp.float32)


@pytest.mark.parametrize("spec", _cases(SPECS, run=True))
def test_forward_gives_finite_logits_per_image_and_class(spec: Any) -> None:
    import jax

    module = spec.build(num_classes=NUM_CLASSES, dtype="float32")
    size = _resolution(spec)
    x = np.random.default_rng(0).normal(size=(BATCH, size, size, 3)).astype(np.float32)
    key = jax.random.key(0)
    init = jax.jit(lambda k, x: module.init({"params": k}, x, train=False))
    variables = init.lower(key, x).compile(compiler_options=FAST_COMPILE)(key, x)
    apply = jax.jit(lambda v, x: module.apply(v, x, train=False))
    logits = np.asarray(apply.lower(variables, x).compile(compiler_options=FAST_COMPILE)(variables, x))
    assert logits.shape == (BATCH, NUM_CLASSES) and logits.dtype == np.float32
    assert np.isfinite(logits).all(), spec.name
