"""Pilot for a quickstart study design: is a ladder on ``shapes`` in the power-law regime within a CPU budget?

Before a study design is fixed, its cells must show what the paper's findings need (Smith et al. 2023, §2):

* the smallest rung leaves the early transient: below half of chance (0.5 ln K) by ~256 steps, its log-log loss
  curve flattening afterwards;
* the largest rung's loss-vs-FLOPs curve crosses the smallest's inside the study's compute range (otherwise the
  frontier never changes model and "size and epochs grow together" cannot show);
* two seeds agree within ~0.03 nats at the longest budget (the noise the verdicts must see through);
* the learning rate is tuned (>= 3 rates on a few cells), and AGC (lambda 0.01, NFNet §4) is checked at this batch
  size: how many units it clips at initialisation and what loosening it changes.

Everything runs in one process through the library API (``convscale_cli.engine.api.pretrain``), so each model
compiles once and the rendered images are shared by every run. One long run per model with a frequent evaluation
gives its whole loss-vs-steps curve (the cosine schedule has not decayed at the intermediate evaluations, so they
overstate the loss a run of that length would reach: an upper bound). Short direct runs give the lr scan.

    nice -n 10 python examples/pilot_study.py --out runs/pilot            # the whole pilot (~35 min on 2 busy cores)
    python examples/pilot_study.py --out runs/pilot --report              # tables from the finished runs only
    python examples/pilot_study.py --cells runs/pilot2/b32                # a study's cells and where rungs cross
    nice -n 10 python examples/pilot_study.py --study runs/pilot2-w64.toml # any study file, trained in-process

The second round runs candidate designs as ordinary studies (``convscale sweep``, wsd with cooldown branching, the
study files in ``docs/study-pilot.md``); ``--cells`` reads their runs: each cell's held-out loss and training FLOPs,
and every other rung's loss at that compute (log-log interpolation between its cells), which shows where a larger
rung's loss-vs-FLOPs curve crosses a smaller one's.

Results: ``docs/study-pilot.md``. Rerunning skips finished runs (each run directory resumes by itself).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

# The quickstart's engine settings (examples/quickstart.toml), with the pilot's data options.
DATA = {"size": 16384, "eval_size": 2048, "clutter": 0.0, "classes": 70}
ENGINE: dict[str, Any] = {
    "dataset": "shapes",
    "batch_size": 64,
    "resolution": 32,
    "precision": "fp32",
    "eval_examples": 1024,
    "log_every": 32,
    "checkpoint_every": 0,
    "checkpoint_minutes": 0.0,
    "tensorboard": False,
    "progress": "none",
    "augment": {"min_area": 0.35},
}
AGC_EXCLUDE = ["^(.*/)?fc/kernel$", "^(.*/)?skip_gain$"]

# lr scans: (model, epochs, alphas). The smallest rung at its 1-epoch budget (256 steps), the largest at 0.25 epochs
# (64 steps: the budget whose compute meets the smallest rung's longest runs) and at 1 epoch.
LR_SCANS = [
    ("nfnet-w16", 1.0, (6.4, 12.8, 25.6, 51.2, 102.4, 204.8)),
    ("nfnet-w4", 0.25, (12.8, 25.6, 51.2)),
    ("nfnet-w4", 1.0, (25.6,)),
]
AGC_SCAN = [0.04, 0.16]  # lambda on the smallest rung at 1 epoch, next to the recipe's 0.01
LONG_EPOCHS = 4.0
# Long runs (model, seed), evaluated every 32 steps: the smallest rung twice (seed agreement), then the middle one.
LONG_RUNS = [("nfnet-w16", 0), ("nfnet-w16", 1), ("nfnet-w8", 0), ("nfnet-w32", 0)]


def run_name(model: str, epochs: float, alpha: float, seed: int = 0, agc: float = 0.01, schedule: str = "") -> str:
    name = f"{model}-e{epochs:g}-lr{alpha:g}"
    if seed:
        name += f"-s{seed}"
    if agc != 0.01:
        name += f"-agc{agc:g}"
    if schedule:
        name += f"-{schedule}"
    return name


# wsd cooldown shapes by run-name suffix (the recipe's cosine has none).
WSD = {"wsd": "linear", "wsd1sqrt": "1-sqrt"}


def train(
    out: Path,
    model: str,
    epochs: float,
    alpha: float,
    *,
    seed: int = 0,
    agc: float = 0.01,
    eval_every: int = 0,
    schedule: str = "",
):
    """One run (resumed or skipped if already there); returns its held-out evaluations ``[(step, loss, top1)]``."""
    from convscale_cli.engine.api import pretrain
    from convscale_cli.engine.config import PretrainConfig
    from convscale_cli.errors import TrainingError

    run = out / run_name(model, epochs, alpha, seed, agc, schedule)
    summary_path = run / "summary.json"
    if (run / "diverged").exists():
        return []
    if not (summary_path.exists() and json.loads(summary_path.read_text()).get("status") == "finished"):
        start = time.perf_counter()
        config = PretrainConfig(
            model=model,
            out=str(run),
            epochs=epochs,
            lr=alpha,
            seed=seed,
            eval_every=eval_every,
            data_options=dict(DATA),
            recipe={"agc_exclude": AGC_EXCLUDE, "agc_clip": agc}
            | ({"schedule": "wsd", "cooldown_shape": WSD[schedule]} if schedule else {}),
            **ENGINE,
        )
        try:
            pretrain(config, _registry())
        except TrainingError as exc:  # a learning rate too high for this cell is a result, not a failure
            (run / "diverged").write_text(str(exc))
            print(f"{run.name}: diverged ({exc})", flush=True)
            return []
        print(f"{run.name}: {time.perf_counter() - start:.0f} s", flush=True)
    return evaluations(run)


def _registry() -> Any:
    """The installed plugins' registry (loaded once per process)."""
    from convscale_cli.plugins import load_plugins

    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = load_plugins().registry
    return _REGISTRY


_REGISTRY = None


def evaluations(run: Path) -> list[tuple[int, float, float]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["step"], r["eval_loss"], r["eval_top1"]) for r in records if "eval_loss" in r]


def summary(run: Path) -> dict[str, Any]:
    return json.loads((run / "summary.json").read_text())


def agc_clip_fraction(model: str, *, lam: float = 0.01, batches: int = 2, seed: int = 0) -> float:
    """Fraction of AGC-clipped units at initialisation (optax's unit-wise norms, the recipe's exclusions)."""
    import re

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from convscale_cli.data import IMAGENET_MEAN, IMAGENET_STD
    from convscale_cli.plugins import get_registry

    registry = get_registry()
    module = registry.architecture(model).build(num_classes=DATA["classes"])
    source = registry.dataset("shapes").open("train", **DATA)
    rng = np.random.default_rng(seed)
    clipped = total = 0
    params = module.init(jax.random.key(seed), np.zeros((1, 32, 32, 3), np.float32), train=False)["params"]

    @jax.jit
    @jax.grad
    def gradient(p, images, labels):
        logits = module.apply({"params": p}, images, train=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    for _ in range(batches):
        items = [source[int(i)] for i in rng.integers(0, len(source), 64)]
        images = (np.stack([it["image"] for it in items]).astype(np.float32) - IMAGENET_MEAN) / IMAGENET_STD
        grads = gradient(params, images, jnp.asarray([it["label"] for it in items]))
        flat_g = jax.tree_util.tree_flatten_with_path(grads)[0]
        flat_p = dict(jax.tree_util.tree_flatten_with_path(params)[0])
        for path, g in flat_g:
            name = "/".join(str(getattr(k, "key", k)) for k in path)
            if any(re.search(pattern, name) for pattern in AGC_EXCLUDE):
                continue
            w = flat_p[path]
            # optax.adaptive_grad_clip: norms over every axis but the last (per output unit); scalars are one unit.
            axes = tuple(range(g.ndim - 1)) if g.ndim > 1 else None
            g_norm = jnp.sqrt(jnp.sum(g * g, axis=axes, keepdims=False))
            w_norm = jnp.sqrt(jnp.sum(w * w, axis=axes, keepdims=False))
            limit = lam * jnp.maximum(w_norm, 1e-3)
            clipped += int(jnp.sum(g_norm > limit))
            total += int(np.size(g_norm))
    return clipped / total


def at_step(curve: list[tuple[int, float, float]], step: int) -> float:
    return min(curve, key=lambda e: abs(e[0] - step))[1]


def slope(curve: list[tuple[int, float, float]], lo: int, hi: int) -> float:
    """Log-log slope d ln L / d ln steps between two evaluated steps."""
    return (math.log(at_step(curve, hi)) - math.log(at_step(curve, lo))) / (math.log(hi) - math.log(lo))


def cells_table(runs: Path) -> None:
    """Print a study's finished cells (best lr per budget) and each rung's loss at every cell's compute."""
    cells: dict[str, list[tuple[float, float, float, float, float]]] = {}
    for path in sorted(runs.glob("*/summary.json")):
        s = json.loads(path.read_text())
        if s.get("status") == "finished":
            row = (s["ledger"]["train_flops"], s["epochs"], s["lr"], s["final"]["eval_loss"], s["final"]["eval_top1"])
            cells.setdefault(s["model"], []).append(row)
    chance = math.log(DATA["classes"])
    best = {
        model: sorted(min((r for r in rows if r[1] == e), key=lambda r: r[3]) for e in {r[1] for r in rows})
        for model, rows in cells.items()
    }
    order = sorted(best, key=lambda m: best[m][0][0])
    for model in order:
        for flops, epochs, alpha, loss, top1 in best[model]:
            others = []
            for other in order:
                xs = [math.log(r[0]) for r in best[other]]
                ys = [math.log(r[3]) for r in best[other]]
                x = math.log(flops)
                inside = xs[0] - 1e-9 <= x <= xs[-1] + 1e-9
                others.append(f"{other} {math.exp(_interp(x, xs, ys)):.3f}" if inside else f"{other}   -  ")
            lrs = sorted(r[2] for r in cells[model] if r[1] == epochs)
            print(
                f"{model} e{epochs:g} alpha {alpha:g} (of {lrs}) {flops:.3g} FLOPs: loss {loss:.3f} "
                f"({loss / chance:.0%} of chance), top-1 {top1:.3f} | " + ", ".join(others)
            )


def _interp(x: float, xs: list[float], ys: list[float]) -> float:
    if len(xs) == 1:
        return ys[0]
    for i in range(1, len(xs)):
        if x <= xs[i] + 1e-12:
            return ys[i - 1] + (ys[i] - ys[i - 1]) * (x - xs[i - 1]) / (xs[i] - xs[i - 1])
    return ys[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/pilot"))
    parser.add_argument("--report", action="store_true", help="only print the tables of the finished runs")
    parser.add_argument("--skip", nargs="*", default=[], help="parts to skip: agc, scan, long, seeds, lambda")
    parser.add_argument("--cells", type=Path, help="only print the cells of the study in this runs directory")
    parser.add_argument("--study", type=Path, help="run this study file in this process, as `convscale sweep` does")
    args = parser.parse_args()
    if args.cells is not None:
        cells_table(args.cells)
        return
    if args.study is not None:
        from convscale_cli.config import from_dict
        from convscale_cli.engine.api import pretrain
        from convscale_cli.engine.config import PretrainConfig
        from convscale_cli.sweep import load_study, run_sweep

        def trainer(model: str, dataset: str, epochs: float, lr: float, out: Any, **options: Any) -> dict:
            fields = {"model": model, "dataset": dataset, "epochs": epochs, "lr": lr, "out": str(out), **options}
            return dict(pretrain(from_dict(PretrainConfig, fields), _registry()))

        run_sweep(load_study(args.study), _registry(), trainer=trainer)
        return
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"data": DATA, "engine": ENGINE}
    chance = math.log(DATA["classes"])
    steps_per_epoch = DATA["size"] // ENGINE["batch_size"]

    def final(model: str, epochs: float, alpha: float, **kw: Any) -> float:
        """Final held-out loss of a run (trained unless --report); inf if it diverged, nan if missing."""
        run = out / run_name(model, epochs, alpha, kw.get("seed", 0), kw.get("agc", 0.01), kw.get("schedule", ""))
        if args.report:
            if (run / "diverged").exists():
                return math.inf
            finished = (run / "summary.json").exists() and summary(run).get("status") == "finished"
            return evaluations(run)[-1][1] if finished else math.nan
        curve = train(out, model, epochs, alpha, **kw)
        return curve[-1][1] if curve else math.inf

    # 1. lr scans.
    scans: dict[str, dict[float, float]] = {}
    if "scan" not in args.skip:
        for model, epochs, alphas in LR_SCANS:
            for alpha in alphas:
                scans.setdefault(f"{model}@{epochs:g}ep", {})[alpha] = final(model, epochs, alpha)
    results["lr_scans"] = scans
    # Missing runs (nan, --report) rank last, like diverged ones (inf).
    best = {
        cell: min(losses, key=lambda a, losses=losses: math.inf if math.isnan(losses[a]) else losses[a])
        for cell, losses in scans.items()
    }
    best_w16 = best.get("nfnet-w16@1ep", 25.6)
    # The middle rung: the geometric mean of its neighbours' 1-epoch optima, on the rule's factor-2 grid.
    best_w4 = best.get("nfnet-w4@1ep", best_w16)
    long_lr = {"nfnet-w16": best_w16, "nfnet-w8": 0.1 * 2 ** round(math.log2(math.sqrt(best_w16 * best_w4) / 0.1))}
    long_lr["nfnet-w32"] = best_w16
    results["long_lr"] = long_lr

    # 2. AGC lambda on the smallest rung at 1 epoch.
    lam_scan = {0.01: scans.get("nfnet-w16@1ep", {}).get(best_w16)}
    if "lambda" not in args.skip:
        for lam in AGC_SCAN:
            lam_scan[lam] = final("nfnet-w16", 1.0, best_w16, agc=lam)
    results["agc_lambda_w16_1_epoch"] = lam_scan

    # 3. Long runs.
    curves: dict[str, list] = {}
    for model, seed in LONG_RUNS:
        if "long" in args.skip or (seed and "seeds" in args.skip):
            continue
        run = out / run_name(model, LONG_EPOCHS, long_lr[model], seed)
        if args.report:
            curve = evaluations(run) if (run / "metrics.jsonl").exists() else []
        else:
            curve = train(out, model, LONG_EPOCHS, long_lr[model], seed=seed, eval_every=32)
        if curve:
            curves[f"{model}/s{seed}"] = curve
    results["curves"] = curves

    # 4. wsd (cooldown over the last 20%) against the cosine at equal budget, on cells of the scans.
    if "wsd" not in args.skip:
        best_w4_short = best.get("nfnet-w4@0.25ep", best_w16)
        wsd_cells = [("nfnet-w16", 1.0, best_w16, "wsd"), ("nfnet-w16", 1.0, best_w16, "wsd1sqrt")]
        wsd_cells += [("nfnet-w4", 0.25, best_w4_short, "wsd"), ("nfnet-w16", LONG_EPOCHS, best_w16, "wsd")]
        results["wsd_vs_cosine"] = {
            f"{m}@{e:g}ep lr{a:g} {sched}": {
                "cosine": final(m, e, a),
                sched: final(m, e, a, schedule=sched, eval_every=32 if e == LONG_EPOCHS else 0),
            }
            for m, e, a, sched in wsd_cells
        }

    if "agc" not in args.skip and not args.report:
        results["agc_clipped_at_init"] = {m: agc_clip_fraction(m) for m in ("nfnet-w16", "nfnet-w4")}
        print("AGC lambda 0.01, units clipped at initialisation:", results["agc_clipped_at_init"], flush=True)

    registry = _registry()
    rungs = ("nfnet-w32", "nfnet-w16", "nfnet-w8", "nfnet-w4")
    macs = {m: registry.architecture(m).count(32, DATA["classes"]).macs for m in rungs}
    results["macs_per_image"] = macs

    # Gates.
    gates: dict[str, Any] = {"half_ln_K": 0.5 * chance}
    small = curves.get("nfnet-w16/s0")
    if small:
        gates["w16_loss_at_256_steps_of_4ep_run"] = at_step(small, 256)
        gates["w16_slope_64_256"] = slope(small, 64, 256)
        gates["w16_slope_256_1024"] = slope(small, 256, int(LONG_EPOCHS * steps_per_epoch))
    if small and "nfnet-w16/s1" in curves:
        gates["seed_gap_longest"] = abs(curves["nfnet-w16/s1"][-1][1] - small[-1][1])
    if small:
        # The largest rung's direct runs against the smallest rung's curve at the same training FLOPs.
        crossing = {}
        for cell, losses in scans.items():
            model, epochs = cell.split("@")
            if model != "nfnet-w4":
                continue
            epochs = float(epochs.removesuffix("ep"))
            equal_steps = epochs * steps_per_epoch * macs["nfnet-w4"] / macs["nfnet-w16"]
            crossing[cell] = {
                "w4_best_loss": min(losses.values()),
                "w16_steps_at_equal_flops": equal_steps,
                "w16_loss_there": at_step(small, int(equal_steps)) if equal_steps <= small[-1][0] else None,
            }
        gates["w4_vs_w16_at_equal_flops"] = crossing
    results["gates"] = gates
    (out / "pilot.json").write_text(json.dumps(results, indent=1, default=str))
    print(json.dumps({k: v for k, v in results.items() if k != "curves"}, indent=1, default=str))
    for key, curve in curves.items():
        print(key, " ".join(f"{s}:{loss:.3f}" for s, loss, _ in curve))


if __name__ == "__main__":
    main()
