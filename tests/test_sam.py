"""SAM: the perturbation, the ascent rows, the gradient it returns and how AGC and the optimiser consume it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from convscale_cli.engine.sam import ascent_rows, ascent_size, check_sam, perturbation, sam_gradients
from convscale_cli.errors import UsageError


def _quadratic_grad_fn(params, batch):
    """L(w) = mean_i mask_i * 0.5 * a_i * |w - x_i|^2 over the rows of the batch."""

    def loss(p):
        diff = p["w"][None, :] - batch["x"]
        per = 0.5 * batch["a"] * (diff**2).sum(-1)
        return (per * batch["mask"]).sum() / jnp.maximum(batch["mask"].sum(), 1.0), batch["mask"].sum()

    return jax.value_and_grad(loss, has_aux=True)(params)


def _batch(rows: int = 8, dim: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    return {
        "x": jnp.asarray(rng.normal(size=(rows, dim)), jnp.float32),
        "a": jnp.asarray(rng.uniform(0.5, 2.0, size=rows), jnp.float32),
        "mask": jnp.ones((rows,), jnp.float32),
    }


def test_rho_zero_is_the_plain_gradient():
    params, batch = {"w": jnp.array([0.3, -0.2, 1.0])}, _batch()
    (loss0, _), g0 = _quadratic_grad_fn(params, batch)
    (loss1, _), g1 = sam_gradients(_quadratic_grad_fn, params, batch, rho=0.0, fraction=0.2)
    assert float(loss0) == float(loss1)
    np.testing.assert_array_equal(g0["w"], g1["w"])


def test_perturbation_has_norm_rho_and_the_gradient_direction():
    grads = {"a": jnp.array([3.0, 0.0]), "b": {"c": jnp.array([[4.0]])}}
    e = perturbation(grads, 0.05)
    assert float(optax.tree.norm(e)) == pytest.approx(0.05, rel=1e-6)
    np.testing.assert_allclose(e["a"], [0.03, 0.0], rtol=1e-6)
    np.testing.assert_allclose(e["b"]["c"], [[0.04]], rtol=1e-6)


def test_zero_ascent_gradient_gives_zero_perturbation_not_nan():
    e = perturbation({"w": jnp.zeros(4)}, 0.05)
    assert np.all(np.asarray(e["w"]) == 0.0)


def test_full_fraction_matches_the_closed_form():
    params, batch = {"w": jnp.array([0.3, -0.2, 1.0])}, _batch()
    a, x = np.asarray(batch["a"], np.float64), np.asarray(batch["x"], np.float64)
    w = np.asarray(params["w"], np.float64)
    grad = lambda v: (a[:, None] * (v[None, :] - x)).mean(0)  # noqa: E731
    g = grad(w)
    expected = grad(w + 0.1 * g / np.linalg.norm(g))
    _, got = sam_gradients(_quadratic_grad_fn, params, batch, rho=0.1, fraction=1.0)
    np.testing.assert_allclose(np.asarray(got["w"]), expected, rtol=1e-5)


def test_ascent_uses_only_the_leading_fraction_of_each_shard():
    params, batch = {"w": jnp.zeros(3)}, _batch(rows=20)
    rho, fraction, shards = 0.5, 0.2, 2  # 10 rows per shard -> rows 0, 1 and 10, 11
    a, x = np.asarray(batch["a"], np.float64), np.asarray(batch["x"], np.float64)
    w = np.zeros(3)
    rows = [0, 1, 10, 11]
    g_ascent = (a[rows, None] * (w[None, :] - x[rows])).mean(0)
    w_pert = w + rho * g_ascent / np.linalg.norm(g_ascent)
    expected = (a[:, None] * (w_pert[None, :] - x)).mean(0)
    _, got = sam_gradients(_quadratic_grad_fn, params, batch, rho=rho, fraction=fraction, num_shards=shards)
    np.testing.assert_allclose(np.asarray(got["w"]), expected, rtol=1e-5)


def test_ascent_rows_keeps_every_shard_balanced():
    batch = {"i": jnp.arange(16), "img": jnp.arange(16 * 2).reshape(16, 2)}
    out = ascent_rows(batch, 0.25, num_shards=4)
    np.testing.assert_array_equal(out["i"], [0, 4, 8, 12])
    np.testing.assert_array_equal(out["img"][:, 0], [0, 8, 16, 24])
    assert ascent_rows(batch, 1.0, num_shards=4) is batch
    assert ascent_size(10, 0.2) == 2 and ascent_size(3, 0.2) == 1 and ascent_size(5, 0.6) == 3
    with pytest.raises(ValueError, match="does not split"):
        ascent_rows(batch, 0.5, num_shards=3)


def test_agc_clips_the_sam_gradient_against_the_unperturbed_weights():
    """The optimiser consumes the SAM gradient; AGC's unit norms are those of w, not of w + e (NFNet A.4)."""
    params = {"w": jnp.array([[0.01, 2.0], [0.02, -1.0]])}  # two output units (columns) of a linear layer
    batch = _batch(rows=4, dim=4)

    def grad_fn(p, b):
        def loss(q):
            pred = b["x"][:, :2] @ q["w"]
            return (b["a"][:, None] * (pred - b["x"][:, 2:]) ** 2).mean(), 0.0

        return jax.value_and_grad(loss, has_aux=True)(p)

    clip, lr = 0.01, 0.1
    tx = optax.chain(optax.adaptive_grad_clip(clip, eps=1e-3), optax.sgd(lr))
    _, g = sam_gradients(grad_fn, params, batch, rho=0.05, fraction=0.5)
    updates, _ = tx.update(g, tx.init(params), params)
    new = optax.apply_updates(params, updates)

    w, gw = np.asarray(params["w"], np.float64), np.asarray(g["w"], np.float64)
    w_norm = np.maximum(np.linalg.norm(w, axis=0), 1e-3)  # unit-wise over the fan-in (axis 0)
    g_norm = np.linalg.norm(gw, axis=0)
    max_norm = clip * w_norm
    clipped = np.where(g_norm > max_norm, gw * max_norm / np.maximum(g_norm, 1e-6), gw)
    assert np.any(g_norm > max_norm), "the test must exercise clipping"
    np.testing.assert_allclose(np.asarray(new["w"]), w - lr * clipped, rtol=1e-5, atol=1e-7)


def test_sam_step_jits_and_matches_eager():
    params, batch = {"w": jnp.array([0.3, -0.2, 1.0])}, _batch()
    eager = sam_gradients(_quadratic_grad_fn, params, batch, rho=0.05, fraction=0.25)[1]
    jitted = jax.jit(lambda p, b: sam_gradients(_quadratic_grad_fn, p, b, rho=0.05, fraction=0.25)[1])(params, batch)
    np.testing.assert_allclose(np.asarray(eager["w"]), np.asarray(jitted["w"]), rtol=1e-6)


@pytest.mark.parametrize(
    ("rho", "fraction", "match"),
    [(-0.1, 0.2, "rho"), (0.05, 0.0, "fraction"), (0.05, 1.5, "fraction"), (float("nan"), 0.2, "rho")],
)
def test_bad_settings_are_usage_errors(rho, fraction, match):
    with pytest.raises(UsageError, match=match):
        check_sam(rho, fraction)
    check_sam(0.0, 1.0)
