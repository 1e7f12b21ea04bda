"""Time one jitted SGD train step of each laptop-ladder NFNet on this machine.

    python -m convscale_plugins.nfnet.ladder_timing [--batch 64] [--resolution 32] [--repeats 10]

Prints model, analytic MACs and the median wall and CPU time of a step (forward + backward + Nesterov SGD update,
float32, after compilation); the package docstring records the numbers measured on the CI CPU. The step is
self-contained (plain softmax cross-entropy and optax SGD) so that the numbers measure the model, not an engine.
"""

from __future__ import annotations

import argparse
import statistics
import time


def time_step(
    name: str, batch: int = 64, resolution: int = 32, repeats: int = 10, num_classes: int = 10
) -> tuple[float, float]:
    """(median wall seconds, median process CPU seconds) of one jitted train step of the variant ``name``.

    CPU seconds (all threads of this process) do not grow when other processes compete for the cores, so they are
    the number to compare across busy machines; on an idle machine the wall time lies between CPU / cores and CPU.
    """
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from convscale_plugins.nfnet import build

    model = build(name, num_classes=num_classes)
    images = jax.random.normal(jax.random.key(0), (batch, resolution, resolution, 3))
    labels = jnp.arange(batch) % num_classes
    # Random values of the right shapes: initialising through jax.random would only add compile time.
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(1), images[:1], train=False))["params"]
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape, np.float32)), shapes)
    tx = optax.sgd(0.1, momentum=0.9, nesterov=True)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, rng):
        def loss_fn(p):
            logits = model.apply({"params": p}, images, train=True, rngs={"dropout": rng})
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = tx.init(params)
    rng = jax.random.key(2)
    params, opt_state, loss = step(params, opt_state, rng)  # compile
    jax.block_until_ready(loss)
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        params, opt_state, loss = step(params, opt_state, rng)
        jax.block_until_ready(loss)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("names", nargs="*", help="variants (default: every ladder rung)")
    args = parser.parse_args(argv)

    from convscale_plugins.nfnet import count
    from convscale_plugins.nfnet.variants import VARIANTS

    names = args.names or [n for n, v in VARIANTS.items() if "ladder" in v.tags]
    for name in names:
        wall, cpu = time_step(name, args.batch, args.resolution, args.repeats)
        macs = count(name, args.resolution, 10).macs
        print(
            f"{name:16s} {macs / 1e6:8.2f}M MACs  {wall * 1e3:8.1f} ms/step wall  {cpu * 1e3:8.1f} ms CPU", flush=True
        )


if __name__ == "__main__":
    main()
