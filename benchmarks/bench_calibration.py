"""Calibration of the report's intervals and verdicts on simulated studies with a known truth.

Each scenario (:func:`convscale_cli.report.simulate.scenarios`) fixes a law L(N, D), an lr response with a known
optimum path, run noise and a design. Every simulation runs the real sweep (two-trial rule or full grid, with a
trainer that writes summaries from the truth), the real ``report`` analysis and the real ``plan --from``, and
records whether each 90% interval holds the truth and what each verdict says. The table is written to stdout (and
as JSON with ``--json``); the exit status is 1 when any bound is missed:

- coverage of every interval (b, alpha, beta, E, a, plan's predicted loss) in [0.80, 0.97];
- "supported" in at most 10% of the simulations where a finding is false, "not supported" in at most 10% where
  it holds;
- "supported" in at least 80% where it holds and the design is meant to decide it;
- a two-trial study never "supported" on the lr finding.

    python benchmarks/bench_calibration.py                       # 200 simulations per scenario (~45 min, 2 cores)
    python benchmarks/bench_calibration.py --sims 40 --workers 2  # a quick look
    python benchmarks/bench_calibration.py --plan-at 10            # plan --from at 10x the largest cell's compute
    python benchmarks/bench_calibration.py --scenarios main-job --seeds 5   # a what-if design: 5 seeds pooled
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial


def _scenario(name: str, changes: dict) -> object:
    import dataclasses

    from convscale_cli.report.simulate import scenarios

    return dataclasses.replace(scenarios()[name], **changes)


def _one(name: str, changes: dict, workdir: str, replicates: int, plan_at: float, seed: int) -> dict:
    from convscale_cli.report.calibration import run_once

    return run_once(_scenario(name, changes), seed, workdir, replicates, plan_at)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sims", type=int, default=200, help="simulations per scenario")
    parser.add_argument("--replicates", type=int, default=100, help="bootstrap replicates per simulation")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--scenarios", default="", help="comma-separated names (default: all)")
    parser.add_argument(
        "--plan-at",
        type=float,
        default=1.0,
        help="plan --from's budget as a multiple of the largest cell's compute (10: the quickstart's extrapolation)",
    )
    parser.add_argument("--seeds", type=int, default=0, help="seeds pooled per study (default: each scenario's)")
    parser.add_argument("--sigma", type=float, default=0.0, help="run noise in log loss (default: each scenario's)")
    parser.add_argument("--json", dest="json_out", default="", help="also write the tallies to this file")
    args = parser.parse_args(argv)

    from convscale_cli.report.calibration import check, tally
    from convscale_cli.report.simulate import scenarios

    # What-if designs: another seed count or run noise for the chosen scenarios (their truths unchanged).
    changes = {k: v for k, v in {"seeds": args.seeds, "sigma": args.sigma}.items() if v}
    names = [name for name in scenarios() if not args.scenarios or name in args.scenarios.split(",")]
    chosen = [_scenario(name, changes) for name in names]
    summaries, failures = [], []
    with (
        tempfile.TemporaryDirectory() as workdir,
        ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool,
    ):
        for scenario in chosen:
            start = time.time()
            rows = list(
                pool.map(
                    partial(_one, scenario.name, changes, workdir, args.replicates, args.plan_at), range(args.sims)
                )
            )
            summary = tally(scenario, rows)
            if changes:
                summary["scenario"] += " with " + ", ".join(f"{k} {v:g}" for k, v in changes.items())
            summary["rows"] = rows
            summary["seconds"] = time.time() - start
            summaries.append(summary)
            failures += check(scenario, summary)
            _print(summary)
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            json.dump(summaries, f, default=str)
    print()
    print("\n".join(f"MISSED: {line}" for line in failures) if failures else "All bounds met.")
    return 1 if failures else 0


def _print(summary: dict) -> None:
    print(
        f"\n## {summary['scenario']} ({summary['sims']} simulations, median run noise {summary['noise']:.3f}, "
        f"{summary['seconds']:.0f} s)"
    )
    cover = ", ".join(f"{k} {v['coverage']:.2f} (n={v['n']})" for k, v in summary["coverage"].items())
    print(f"coverage of 90% intervals: {cover}")
    for finding, shares in summary["verdicts"].items():
        print(f"  {finding:15s} " + "  ".join(f"{k} {v:4.0%}" for k, v in shares.items()))
    sys.stdout.flush()  # one scenario takes minutes: show it when it is done, also when stdout is a file


if __name__ == "__main__":
    sys.exit(main())
