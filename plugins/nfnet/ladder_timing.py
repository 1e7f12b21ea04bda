"""Time one jitted SGD train step of each laptop-ladder NFNet on this machine.

    python -m convscale_plugins.nfnet.ladder_timing [--batch 64] [--resolution 32] [--repeats 10]

Prints model, analytic MACs and the median step time (forward + backward + Nesterov SGD update, float32, after
compilation); the package docstring records the numbers measured on the CI CPU. The step is self-contained (plain
softmax cross-entropy and optax SGD) so that the numbers measure the model, not a training engine.
"""

from __future__ import annotations

import argparse
import statistics
import time


def time_step(name: str, batch: int = 64, resolution: int = 32, repeats: int = 10, num_classes: int = 10) -> float:
    """Median seconds of one jitted train step of the registered variant ``name``."""
    import functools

    import jax
    import jax.numpy as jnp
    import optax
    from convscale_plugins.nfnet import build

    model = build(name, num_classes=num_classes)
    images = jax.random.normal(jax.random.key(0), (batch, resolution, resolution, 3))
    labels = jnp.arange(batch) % num_classes
    params = jax.jit(lambda k: model.init(k, images[:1], train=False)["params"])(jax.random.key(1))
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
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        params, opt_state, loss = step(params, opt_state, rng)
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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
        seconds = time_step(name, args.batch, args.resolution, args.repeats)
        macs = count(name, args.resolution, 10).macs
        print(f"{name:16s} {macs / 1e6:8.2f}M MACs  {seconds * 1e3:8.1f} ms/step", flush=True)


if __name__ == "__main__":
    main()
