"""Study efficiency: the two-trial rule against the full learning-rate grid, and cooldown branching against cosine.

Run: `python benchmarks/bench_study.py [--runs runs/quickstart] [--study STUDY.toml]`. It runs (or resumes) the study
with the two-trial rule, then the same cells on a full 6-point factor-2 grid around the study's `start_lr` into the
same runs directory (runs the rule already trained are reused, not retrained), and prints per cell the rule's choice,
the grid's optimum and the loss regret, plus the runs and training FLOPs each approach used. Not a test: it trains
~36 extra runs (about 10 minutes on a 2-core CPU).

`--branching` instead runs the same design twice, into RUNS/cosine (the recipe's cosine, every cell trained from
scratch) and RUNS/branching (wsd with `branching = true`: one trunk per model and learning rate, every budget a
cooldown branch of it, Hägele et al. 2024), and prints each study's total compute (each trunk counted once), the
wall time of this invocation, and the report's verdicts on each runs directory.

`--workers N` instead runs the study twice from scratch, into RUNS/workers-1 (one `convscale sweep` process) and
RUNS/workers-N (N concurrent `convscale sweep --shard I/N` processes), each with its own empty compilation cache, and
prints both wall times, the speed-up, and the critical-path bound: the longest dependency chain of cells, costed
with the one-worker run's measured seconds per cell, which no number of workers can beat. The machine's cores are
split between the workers (each pinned to its share, which also sizes XLA's CPU thread pool), so one worker gets
every core and N workers get 1/N each: the comparison spends the same machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

GRID_OCTAVES = (1, 0, -1, -2, -3, -4)  # the grid spans 2x above start_lr down to start_lr / 16


def _decisions(runs: Path, rule: str) -> dict[tuple[str, float], dict]:
    out = {}
    for line in (runs / "tuning.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if entry["rule"] == rule:
            out[(entry["model"], float(entry["epochs"]))] = entry
    return out


def _flops(runs: Path, names: set[str]) -> tuple[float, int]:
    """Training FLOPs of the named runs, and how many of them diverged.

    A diverged run leaves no summary; it is counted at its cell's full cost (a finished run of the same model and
    epochs, at another lr), an upper bound: the engine notices a non-finite loss at the next log point. A cell whose
    every run diverged has no such cost and counts 0.
    """
    cost, diverged = {}, []
    for name in names:
        summary = runs / name / "summary.json"
        if summary.exists():
            cost[name] = json.loads(summary.read_text())["ledger"]["train_flops"]
        else:
            diverged.append(name)
    by_cell = {n.rsplit("-lr", 1)[0]: v for n, v in cost.items()}
    return sum(cost.values()) + sum(by_cell.get(n.rsplit("-lr", 1)[0], 0.0) for n in diverged), len(diverged)


def _with_schedule(study: Any, out: Path, schedule: str, branching: bool) -> Any:
    recipe = {**(study.engine.get("recipe") or {}), "schedule": schedule}
    return dataclasses.replace(study, out=str(out), branching=branching, engine={**study.engine, "recipe": recipe})


def _best(runs: Path, decision: dict | None) -> tuple[float, float]:
    """A cell's chosen alpha and its held-out loss (nan when the cell is missing or every trial failed)."""
    if decision is None:
        return math.nan, math.nan
    losses = {t["run"]: t["eval_loss"] for t in decision["trials"]}
    return decision["best_lr"], float(losses.get(decision["best_run"], math.nan))


def compare_branching(study: Any, registry: Any, runs: Path) -> None:
    """Train the study with cosine and with wsd branching; print the compute, wall time and verdicts of each."""
    from convscale_cli.errors import ConvscaleError
    from convscale_cli.report.build import analyse
    from convscale_cli.sweep import run_sweep, study_compute

    designs = {
        "cosine": _with_schedule(study, runs / "cosine", "cosine", False),
        "wsd + branching": _with_schedule(study, runs / "branching", "wsd", True),
    }
    rows, verdicts = {}, {}
    for name, design in designs.items():
        start = time.perf_counter()
        result = run_sweep(design, registry)
        wall = time.perf_counter() - start
        rows[name] = (study_compute(design.out), wall, result.trained)
        try:
            verdicts[name] = {v.claim: v.status for v in analyse(design.out).verdicts}
        except ConvscaleError as exc:  # too few runs for a report: say why, keep the compute figures
            verdicts[name] = {"(no report)": str(exc)}
    cells = len(study.models) * len(study.epochs)
    print(f"{cells} cells ({len(study.models)} models x {len(study.epochs)} epoch budgets), rule {study.rule}")
    print(
        f"{'design':<16} {'runs':>5} {'trunks':>6} {'train FLOPs':>12} {'core-hours':>11} {'device-s':>9} "
        f"{'wall-s':>7} {'trained now':>11}"
    )
    for name, (compute, wall, trained) in rows.items():
        print(
            f"{name:<16} {compute.runs:>5} {compute.trunks:>6} {compute.train_flops:>12.4g} "
            f"{compute.core_hours:>11.4g} {compute.device_seconds:>9.1f} {wall:>7.1f} {trained:>11}"
        )
    (cosine, cosine_wall, _), (branching, branching_wall, _) = rows.values()
    print(
        f"branching / cosine: training FLOPs {branching.train_flops / cosine.train_flops:.2f}x, device-seconds "
        f"{branching.device_seconds / max(cosine.device_seconds, 1e-9):.2f}x, wall time of this invocation "
        f"{branching_wall / max(cosine_wall, 1e-9):.2f}x (cosine ran first and paid the compilations both share: "
        "the initialisers and the evaluation step)"
    )
    best = {name: _decisions(Path(design.out), design.rule) for name, design in designs.items()}
    print(
        f"{'model':<16} {'epochs':>6} {'cosine alpha':>12} {'loss':>7} {'wsd alpha':>10} {'loss':>7} {'wsd - cos':>9}"
    )
    for key in sorted(best["cosine"], key=lambda k: (k[1], k[0])):
        (c_lr, c_loss), (w_lr, w_loss) = (_best(Path(designs[n].out), best[n].get(key)) for n in designs)
        print(
            f"{key[0]:<16} {key[1]:>6g} {c_lr:>12g} {c_loss:>7.4f} {w_lr:>10g} {w_loss:>7.4f} {w_loss - c_loss:>9.4f}"
        )
    claims = list(dict.fromkeys(c for v in verdicts.values() for c in v))
    print(f"{'verdict':<60} {'cosine':<18} {'wsd + branching':<18}")
    for claim in claims:
        shown = [verdicts[n].get(claim, "-") for n in designs]
        print(f"{claim[:60]:<60} {shown[0][:18]:<18} {shown[1][:18]:<18}")
    same = all(verdicts["cosine"].get(c) == verdicts["wsd + branching"].get(c) for c in claims)
    print(f"verdicts agree: {'yes' if same else 'no'}")


def _worker_env(cache: Path, cores: list[int]) -> dict[str, str]:
    env = dict(os.environ, CONVSCALE_COMPILATION_CACHE=str(cache), JAX_PLATFORMS="cpu")
    if len(cores) == 1:  # one core: keep XLA's Eigen thread pool from spinning threads it cannot run
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_cpu_multi_thread_eigen=false".strip()
    return env


def _sweep(study_file: Path, out: Path, workers: int) -> float:
    """Wall seconds of ``workers`` concurrent sweep processes over the study, the cores split between them."""
    cores = sorted(os.sched_getaffinity(0))
    share = max(1, len(cores) // workers)
    procs = []
    start = time.perf_counter()
    for i in range(workers):
        mine = cores[i * share : (i + 1) * share] or cores[-1:]
        argv = [sys.executable, "-m", "convscale_cli", "sweep", str(study_file), "--set", f"out={out}", "--json"]
        if workers > 1:
            argv += ["--shard", f"{i}/{workers}"]
        log = (out.parent / f"{out.name}-worker{i}.log").open("w")
        procs.append(
            subprocess.Popen(
                argv,
                env=_worker_env(out.parent / f"{out.name}-xla-cache", mine),
                stdout=subprocess.DEVNULL,
                stderr=log,
                preexec_fn=lambda cpus=set(mine): os.sched_setaffinity(0, cpus),  # noqa: PLW1509
            )
        )
    try:
        failed = [i for i, p in enumerate(procs) if p.wait() != 0]
    finally:  # interrupted (or a test's timeout): take the workers down too
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    if failed:
        raise SystemExit(f"worker {failed[0]} failed: see {out.parent / f'{out.name}-worker{failed[0]}.log'}")
    return time.perf_counter() - start


def _cell_seconds(runs: Path) -> dict[tuple[str, float], float]:
    """Measured device seconds of each cell (its trials together) from the runs' ledgers."""
    seconds: dict[tuple[str, float], float] = {}
    for summary in runs.glob("*/summary.json"):
        data = json.loads(summary.read_text())
        key = (data["model"], float(data["epochs"]))
        seconds[key] = seconds.get(key, 0.0) + sum((data["ledger"].get("device_seconds") or {}).values())
    return seconds


def _tuning(runs: Path) -> list[dict]:
    lines = (runs / "tuning.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "time"} for line in lines]


def _decisions_only(decision: dict) -> dict:
    """A tuning.jsonl line without its time stamp and losses: which cell, which trials, which lr kept."""
    trials = [{k: v for k, v in t.items() if k != "eval_loss"} for t in decision["trials"]]
    return {**{k: v for k, v in decision.items() if k not in ("time", "trials")}, "trials": trials}


def compare_workers(study_file: Path, study: Any, registry: Any, runs: Path, workers: int) -> None:
    """Run the study with 1 and with ``workers`` processes; print wall times, speed-up and the critical-path bound."""
    import shutil

    from convscale_cli.sweep_graph import cell_key, study_graph

    graph = study_graph(study, registry)
    walls = {}
    for n in (1, workers):
        out = runs / f"workers-{n}"
        for stale in (out, runs / f"workers-{n}-xla-cache"):
            shutil.rmtree(stale, ignore_errors=True)
        runs.mkdir(parents=True, exist_ok=True)
        walls[n] = _sweep(study_file, out, n)
    measured = _cell_seconds(runs / "workers-1")
    path, bound = graph.critical_path({cell_key(c): measured.get(cell_key(c), 0.0) for c in graph.cells})
    total = sum(measured.values())
    _, flops_path = graph.critical_path()
    flops_total = sum(graph.cost(cell_key(c)) for c in graph.cells)
    cores = len(os.sched_getaffinity(0))
    print(f"{len(graph.cells)} cells in {len(graph.waves())} waves, {cores} cores split between the workers")
    for n, wall in walls.items():
        print(f"{n} worker{'s' * (n != 1)}: wall {wall:.1f} s" + (f", {walls[1] / wall:.2f}x" if n != 1 else ""))
    print(
        f"critical path ({' -> '.join(f'{m} x {e:g}' for m, e in path)}): {bound:.1f} device-s of the one-worker "
        f"run's {total:.1f}, so no number of workers beats {total / max(bound, 1e-9):.2f}x on these cells "
        f"(the FLOP estimate of --plan says {flops_total / flops_path:.2f}x)"
    )
    one, many = _tuning(runs / "workers-1"), _tuning(runs / f"workers-{workers}")
    print(f"tuning.jsonl identical apart from time stamps: {'yes' if one == many else 'no'}")
    if one != many:
        # Each setup runs XLA with its own share of the cores, so reductions may add in another order: the losses
        # can differ in their last digits even where every decision is the same.
        same_decisions = [_decisions_only(d) for d in one] == [_decisions_only(d) for d in many]
        cells = zip(one, many, strict=False)
        pairs = [pair for x, y in cells for pair in zip(x["trials"], y["trials"], strict=False)]
        gap = max((abs(a["eval_loss"] - b["eval_loss"]) for a, b in pairs), default=0.0)
        print(
            f"decisions (cells, trials, kept lrs) identical: {'yes' if same_decisions else 'no'}; largest held-out "
            f"loss difference {gap:.2g} (XLA thread counts differ between the setups)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/quickstart"))
    parser.add_argument("--study", type=Path, default=None, help="default: the packaged two-trial study, quickstart")
    parser.add_argument("--branching", action="store_true", help="cosine vs wsd cooldown branching instead")
    parser.add_argument("--workers", type=int, default=None, help="1 vs N worker processes instead")
    args = parser.parse_args()

    from convscale_cli.plugins import get_registry
    from convscale_cli.quickstart import packaged_studies
    from convscale_cli.sweep import load_study, run_sweep

    study_path = args.study or packaged_studies()["quickstart"]
    study = load_study(study_path, {"out": str(args.runs)})
    registry = get_registry()
    if args.branching:
        compare_branching(study, registry, args.runs)
        return
    if args.workers is not None:
        compare_workers(Path(study_path), study, registry, args.runs, args.workers)
        return
    run_sweep(study, registry)
    families: dict[str, list[str]] = {}
    for model in study.models:
        families.setdefault(registry.architecture(model).family, []).append(model)
    for family, models in families.items():  # each family's grid sits around its own start_lr (SGD vs AdamW alphas)
        start = study.start_lr_for(family) or 1.6
        grid = tuple(start * 2.0**k for k in GRID_OCTAVES)
        one = dataclasses.replace(study, models=tuple(models), start_lr=start, rule="grid", lr_grid=grid)
        run_sweep(one, registry)
        print(f"grid ({family}): alpha in {', '.join(f'{a:g}' for a in grid)}")

    rule, full = _decisions(args.runs, "two-trial"), _decisions(args.runs, "grid")
    print(
        f"{'model':<15} {'epochs':>6} {'rule alpha':>10} {'rule loss':>9} {'grid alpha':>10} {'grid loss':>9} "
        f"{'regret':>7}"
    )
    regrets = []
    for key in sorted(rule, key=lambda k: (k[1], k[0])):
        mine, best = rule[key], full[key]
        losses = {t["run"]: t["eval_loss"] for t in best["trials"]}
        chosen, optimum = losses[mine["best_run"]], min(losses.values())
        regrets.append(chosen - optimum)
        print(
            f"{key[0]:<15} {key[1]:>6g} {mine['best_lr']:>10g} {chosen:>9.4f} {best['best_lr']:>10g} "
            f"{optimum:>9.4f} {chosen - optimum:>7.4f}"
        )
    rule_runs = {t["run"] for e in rule.values() for t in e["trials"]}
    grid_runs = {t["run"] for e in full.values() for t in e["trials"]}
    rule_flops, rule_diverged = _flops(args.runs, rule_runs)
    grid_flops, grid_diverged = _flops(args.runs, grid_runs)
    print(
        f"runs: rule {len(rule_runs)}, grid {len(grid_runs)} ({len(grid_runs) / len(rule_runs):.1f}x); "
        f"training FLOPs: rule {rule_flops:.3g}, grid {grid_flops:.3g} ({grid_flops / rule_flops:.1f}x)"
    )
    if rule_diverged or grid_diverged:
        print(f"diverged (non-finite loss, counted at full cost): rule {rule_diverged}, grid {grid_diverged}")
    print(
        f"loss regret of the rule: mean {sum(regrets) / len(regrets):.4f}, max {max(regrets):.4f}, "
        f"zero in {sum(r == 0 for r in regrets)} of {len(regrets)} cells"
    )


if __name__ == "__main__":
    main()
