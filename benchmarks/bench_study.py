"""Study efficiency: the two-trial rule against the full learning-rate grid on the quickstart study.

Run: `python benchmarks/bench_study.py [--runs quickstart/runs] [--study STUDY.toml]`. It runs (or resumes) the study
with the two-trial rule, then the same cells on a full 6-point factor-2 grid around the study's `start_lr` into the
same runs directory (runs the rule already trained are reused, not retrained), and prints per cell the rule's choice,
the grid's optimum and the loss regret, plus the runs and training FLOPs each approach used. Not a test: it trains
~36 extra runs (about 10 minutes on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("quickstart/runs"))
    parser.add_argument("--study", type=Path, default=None, help="default: the packaged quickstart study")
    args = parser.parse_args()

    from convscale_cli.plugins import get_registry
    from convscale_cli.quickstart import default_study
    from convscale_cli.sweep import load_study, run_sweep

    study = load_study(args.study or default_study(), {"out": str(args.runs)})
    registry = get_registry()
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
