"""Is ``shapes`` hard enough to stand in for JFT-4B? Held-out loss vs training compute for a tiny NFNet ladder.

The paper's central plot (Smith et al. 2023, Fig. 2) needs a pre-training set on which the held-out loss keeps
falling as compute grows, over several decades. This script trains tiny NFNets from the registry (the ``ladder``
variants; falls back to a small Flax ConvNet if no architecture plugin is installed) on ``shapes`` at 32 px for a
geometric sequence of example budgets, evaluates each on the fixed held-out split, and prints loss vs training FLOPs.

Command and runtime (measured on a 2-core machine shared with other jobs, load ~12: 70 minutes; an idle laptop is
several times faster, one GPU takes a few minutes):

    python examples/shapes_difficulty.py                        # nfnet-tiny-l0 and -l1, 4k..262k examples
    python examples/shapes_difficulty.py --models nfnet-tiny-l0 --budgets 4096,16384,65536   # ~6 minutes

Expected result (measured, seed 0, held-out loss on 2,000 eval images; chance = log 420 = 6.04):

    model          examples  train FLOPs  eval loss  top-1
    nfnet-tiny-l0      4096     1.29e+10      6.020   0.5%
    nfnet-tiny-l0     16384     5.16e+10      5.268   1.1%
    nfnet-tiny-l0     65536     2.06e+11      4.430   4.2%
    nfnet-tiny-l0    262144     8.25e+11      3.205  14.6%
    nfnet-tiny-l1      4096     2.45e+10      6.036   0.2%
    nfnet-tiny-l1     16384     9.81e+10      5.320   1.1%
    nfnet-tiny-l1     65536     3.92e+11      4.477   4.6%
    nfnet-tiny-l1    262144     1.57e+12      3.215  14.0%

The loss falls by a large, even growing, step per 4x of compute over the 2.1 decades covered, with no sign of
saturation: ``shapes`` is far from exhausted by these models at 262k examples, so longer runs and larger models extend
the curve by further decades. At these budgets the smaller model is the better use of compute (l0 beats l1 at equal
FLOPs), as the paper's Fig. 2 shows for small budgets. The training recipe is deliberately fixed (SGD + Nesterov,
cosine schedule, inception crop with min area 0.35 + flip) so that only model size and example budget vary.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax

from convscale_cli.data import AugmentConfig, eval_loader, normalize, train_loader
from convscale_cli.plugins import get_registry

RESOLUTION = 32
NUM_CLASSES = 420


def _fallback_convnet() -> tuple[Any, int]:
    """A small Flax ConvNet and its forward MACs per image, for when no architecture plugin is installed."""
    import flax.linen as nn

    class ConvNet(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
            for width in (32, 64, 128):
                x = nn.gelu(nn.Conv(width, (3, 3))(x))
                x = nn.gelu(nn.Conv(width, (3, 3))(x))
                x = nn.max_pool(x, (2, 2), (2, 2))
            return nn.Dense(NUM_CLASSES)(x.mean(axis=(1, 2)))

    macs = 0
    size, channels = RESOLUTION, 3
    for width in (32, 64, 128):
        macs += size * size * 9 * (channels * width + width * width)
        size, channels = size // 2, width
    return ConvNet(), macs + channels * NUM_CLASSES


def build(name: str) -> tuple[Any, int]:
    """A registry model (or the fallback ConvNet when ``name`` is ``convnet``) and its MACs per image at 32 px."""
    if name == "convnet":
        return _fallback_convnet()
    spec = get_registry().architecture(name)
    return spec.build(num_classes=NUM_CLASSES), spec.count(RESOLUTION, NUM_CLASSES).macs


class Trainer:
    """Compiles one model's train and eval steps once; the learning rate is an argument, so every budget reuses them."""

    def __init__(self, name: str, args: argparse.Namespace) -> None:
        self.model, self.macs = build(name)
        self.args = args
        # SGD + Nesterov with the schedule applied outside the optimizer (lr is a traced argument: no recompiles).
        self.optimizer = optax.chain(
            optax.clip_by_global_norm(1.0), optax.add_decayed_weights(1e-5), optax.sgd(1.0, 0.9, nesterov=True)
        )
        model, optimizer = self.model, self.optimizer

        def train_step(params: Any, opt_state: Any, batch: dict[str, jax.Array], lr: jax.Array, key: jax.Array):
            def loss_fn(p: Any) -> jax.Array:
                logits = model.apply({"params": p}, normalize(batch["image"]), train=True, rngs={"dropout": key})
                losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
                return (losses * batch["mask"]).sum() / jnp.maximum(batch["mask"].sum(), 1.0)

            grads = jax.grad(loss_fn)(params)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            updates = jax.tree.map(lambda u: lr * u, updates)
            return optax.apply_updates(params, updates), opt_state

        def eval_step(params: Any, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
            logits = model.apply({"params": params}, normalize(batch["image"]), train=False)
            losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
            correct = (logits.argmax(-1) == batch["label"]).astype(jnp.float32)
            return (losses * batch["mask"]).sum(), (correct * batch["mask"]).sum()

        self.train_step = jax.jit(train_step, donate_argnums=(0, 1))
        self.eval_step = jax.jit(eval_step)

    def run(self, examples: int) -> dict[str, float]:
        """Train from scratch on ``examples`` shapes images; return held-out loss and top-1."""
        from convscale_plugins.datasets import shapes

        args = self.args
        loader = train_loader(
            shapes.open_split("train", size=args.dataset_size),
            global_batch_size=args.batch_size,
            resolution=RESOLUTION,
            seed=args.seed,
            num_examples=examples,
            augment=AugmentConfig(min_area=0.35),
        )
        schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, max(1, loader.steps // 20), loader.steps)
        dummy = jnp.zeros((1, RESOLUTION, RESOLUTION, 3))
        params = self.model.init({"params": jax.random.key(args.seed)}, dummy, train=False)["params"]
        opt_state = self.optimizer.init(params)
        key = jax.random.key(args.seed)
        start = time.perf_counter()
        for i, batch in enumerate(loader):
            lr = jnp.float32(schedule(i))
            params, opt_state = self.train_step(params, opt_state, batch, lr, jax.random.fold_in(key, i))
        jax.block_until_ready(params)
        seconds = time.perf_counter() - start
        total_loss = total_correct = 0.0
        held_out = shapes.open_split("eval", eval_size=args.eval_size)
        for batch in eval_loader(held_out, global_batch_size=args.batch_size, resolution=RESOLUTION, crop_fraction=1.0):
            loss, correct = self.eval_step(params, batch)
            total_loss += float(loss)
            total_correct += float(correct)
        return {
            "train_flops": 6.0 * self.macs * examples,
            "eval_loss": total_loss / args.eval_size,
            "eval_top1": total_correct / args.eval_size,
            "seconds": seconds,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="nfnet-tiny-l0,nfnet-tiny-l1", help="registry names, or 'convnet'")
    parser.add_argument("--budgets", default="4096,16384,65536,262144", help="training examples per run")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--eval-size", type=int, default=2000)
    parser.add_argument("--dataset-size", type=int, default=2_000_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    if "convnet" not in names and not any(name in get_registry().architectures for name in names):
        print("no requested model is registered; using the fallback ConvNet")
        names = ["convnet"]
    budgets = sorted(int(b) for b in args.budgets.split(","))
    print(f"{'model':<16}{'examples':>10}{'train FLOPs':>14}{'eval loss':>11}{'top-1':>8}{'seconds':>9}")
    results: dict[str, list[tuple[float, float]]] = {}
    for name in names:
        trainer = Trainer(name, args)
        for examples in budgets:
            r = trainer.run(examples)
            results.setdefault(name, []).append((r["train_flops"], r["eval_loss"]))
            print(
                f"{name:<16}{examples:>10}{r['train_flops']:>14.2e}{r['eval_loss']:>11.3f}"
                f"{100 * r['eval_top1']:>7.1f}%{r['seconds']:>9.1f}",
                flush=True,
            )
    flops = [f for runs in results.values() for f, _ in runs]
    print(f"\ncompute covered: {math.log10(max(flops) / min(flops)):.1f} decades (chance loss {math.log(420):.2f})")
    for name, runs in results.items():
        losses = [loss for _, loss in runs]
        falling = all(b < a for a, b in zip(losses, losses[1:], strict=False))
        print(f"{name}: loss {losses[0]:.3f} -> {losses[-1]:.3f}, {'still improving' if falling else 'NOT monotone'}")


if __name__ == "__main__":
    main()
