"""Parameter EMA with the NFNet decay warm-up min(decay, (1 + t) / (10 + t))."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convscale_cli.engine.ema import check_decay, ema_decay, ema_init, ema_update
from convscale_cli.errors import UsageError


def test_decay_warm_up_values():
    assert float(ema_decay(0, 0.9999)) == pytest.approx(0.1)
    assert float(ema_decay(10, 0.9999)) == pytest.approx(11 / 20)
    assert float(ema_decay(10**6, 0.9999)) == pytest.approx(0.9999)
    # The warm-up crosses the target decay at t = (10 d - 1) / (1 - d).
    assert float(ema_decay(89, 0.9)) == pytest.approx(0.9)
    assert float(ema_decay(88, 0.9)) < 0.9


def test_update_matches_a_python_reference_over_many_steps():
    rng = np.random.default_rng(0)
    params = [
        {"a": rng.normal(size=(3, 2)).astype(np.float32), "b": rng.normal(size=4).astype(np.float32)} for _ in range(30)
    ]
    decay = 0.95
    ema = ema_init(jax.tree_util.tree_map(jnp.asarray, params[0]))
    ref = {k: v.astype(np.float64) for k, v in params[0].items()}
    step = jax.jit(ema_update, static_argnums=3)
    for t, p in enumerate(params[1:]):
        ema = step(ema, jax.tree_util.tree_map(jnp.asarray, p), t, decay)
        d = min(decay, (1 + t) / (10 + t))
        ref = {k: d * ref[k] + (1 - d) * p[k] for k in ref}
    for k in ref:
        np.testing.assert_allclose(np.asarray(ema[k]), ref[k], rtol=1e-5)
        assert ema[k].dtype == jnp.float32


def test_init_copies_so_donation_is_safe():
    params = {"w": jnp.ones(3)}
    ema = ema_init(params)
    assert ema["w"] is not params["w"]
    np.testing.assert_array_equal(ema["w"], params["w"])


@pytest.mark.parametrize("decay", [-0.1, 1.0, 1.5, float("inf")])
def test_bad_decay_is_a_usage_error(decay):
    with pytest.raises(UsageError, match="EMA decay"):
        check_decay(decay)
    check_decay(0.0)
