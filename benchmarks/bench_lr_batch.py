"""Would one program that trains K learning rates at once beat K separate runs? The step cost of the small ladders.

Run: `python benchmarks/bench_lr_batch.py [--models nfnet-w32 nfnet-w16 nfnet-w8] [--batch 32] [--resolution 32]
[--classes 70] [--k 3 5] [--steps 50] [--rounds 3]`.

A study tunes each cell's learning rate over a grid, and every lr of a (model, seed) sees the same batches, so the
grid could train as one program: the engine's ``train_step`` vmapped over K states whose injected peak rates differ,
on one shared batch (one data pipeline, one dispatch per step instead of K). That pays only where a step is dominated
by per-step overhead rather than by the model's arithmetic. This benchmark measures it with the engine's own step and
the family's recipe optimiser (wsd schedule, numbers in the state): for each model, the ms per step of one run (the
peer) and of the K-run program, side by side, and the speed-up ``K x single / batched`` (above 1: batching pays).
Warm-up (compilation) is excluded; the two sides' timed windows alternate for ``--rounds`` rounds and the best window
of each counts. Input data are random (the data pipeline is not timed: it is shared by either side).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from collections.abc import Callable

from bench_train_step import step_timer


def _step_timers(
    name: str, batch: int, resolution: int, classes: int, ks: list[int]
) -> dict[int, Callable[[int], float]]:
    """``{K: timed(steps) -> seconds per step}``; K = 1 is the plain jitted step, K > 1 the vmapped one."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from convscale_cli.data import normalize
    from convscale_cli.engine.optim import make_optimizer, peak_learning_rate, recipe_schedule
    from convscale_cli.engine.state import TrainState
    from convscale_cli.engine.step import train_step
    from convscale_cli.plugins import get_registry

    spec = get_registry().architecture(name)
    recipe = dataclasses.replace(spec.recipe, schedule="wsd")
    model = spec.build(num_classes=classes, dtype="float32")
    steps_total = 10_000
    schedule = recipe_schedule(recipe, peak_learning_rate(recipe.lr, batch, recipe.base_batch_size), steps_total)
    tx = make_optimizer(recipe, schedule)
    params = jax.jit(
        lambda: model.init({"params": jax.random.key(0)}, jnp.zeros((1, resolution, resolution, 3)), train=False)[
            "params"
        ]
    )()
    rng = np.random.default_rng(0)
    batch_data = {
        "image": jnp.asarray(rng.integers(0, 256, (batch, resolution, resolution, 3), dtype=np.uint8)),
        "label": jnp.asarray(rng.integers(0, classes, (batch,), dtype=np.int32)),
        "mask": jnp.ones((batch,), jnp.float32),
    }
    bound = functools.partial(
        train_step, model=model, tx=tx, schedule=schedule, normalize=normalize, loss=recipe.loss, num_classes=classes
    )

    def fresh() -> TrainState:
        copy = jax.tree_util.tree_map(jnp.copy, params)
        return TrainState.create(copy, tx, jax.random.key_data(jax.random.key(1)))

    timers: dict[int, Callable[[int], float]] = {}
    for k in ks:
        if k == 1:
            step = jax.jit(bound, donate_argnums=0)
            state = fresh()
        else:
            step = jax.jit(jax.vmap(bound, in_axes=(0, None)), donate_argnums=0)
            states = [fresh() for _ in range(k)]
            # K peak rates a factor 2 apart, as an lr grid: the injected numbers are state, so they batch.
            for i, s in enumerate(states):
                s.opt_state.hyperparams["peak_lr"] = s.opt_state.hyperparams["peak_lr"] * 2.0 ** (i - k // 2)
            state = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *states)
        timers[k] = step_timer(step, state, batch_data)
    return timers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["nfnet-w32", "nfnet-w16", "nfnet-w8"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--classes", type=int, default=70)
    parser.add_argument("--k", type=int, nargs="+", default=[3, 5], help="learning rates per program")
    parser.add_argument("--steps", type=int, default=50, help="steps per timed window")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import jax

    print(f"device: {jax.devices()[0].device_kind} x {jax.device_count()}; batch {args.batch}, {args.resolution} px, "
          f"{args.classes} classes, fp32; best of {args.rounds} windows of {args.steps} steps")  # fmt: skip
    print(f"{'model':<12} {'K':>2} {'1 run ms/step':>14} {'K-run program ms/step':>22} {'per run':>8} {'speed-up':>9}")
    for name in args.models:
        timers = _step_timers(name, args.batch, args.resolution, args.classes, [1, *args.k])
        best = {k: float("inf") for k in timers}
        for _ in range(args.rounds):
            for k, timed in timers.items():
                best[k] = min(best[k], timed(args.steps))
        single = best[1]
        for k in args.k:
            batched = best[k]
            print(f"{name:<12} {k:>2} {single * 1e3:>14.1f} {batched * 1e3:>22.1f} {batched * 1e3 / k:>8.1f} "
                  f"{k * single / batched:>8.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
