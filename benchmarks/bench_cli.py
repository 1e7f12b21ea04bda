"""CLI start-up latency: `convscale --help`, `models`, `plan --budget 10k-core-hours` (goal: median <= 0.5 s).

Run: `python benchmarks/bench_cli.py [--repeat 7]`. Each command runs in a fresh interpreter, as a user types it;
the peer figure is a bare `python -c pass` start on the same machine, printed as the ratio's baseline.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "--help": ["--help"],
    "models": ["models"],
    "plan": ["plan", "--budget", "10k-core-hours"],
}
GOAL_S = 0.5


def _median_seconds(argv: list[str], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    baseline = _median_seconds([sys.executable, "-c", "pass"], args.repeat)
    if sys.flags.dont_write_bytecode or os.environ.get("PYTHONDONTWRITEBYTECODE"):
        # Then every start compiles convscale's modules from source (~60 ms on 2 cores); an installed copy does not.
        print("note: PYTHONDONTWRITEBYTECODE is set, so these figures include compiling convscale from source")
    print(f"{'command':<12} {'median s':>9} {'x python start':>15}  goal <= {GOAL_S} s")
    print(f"{'python':<12} {baseline:>9.3f} {1.0:>15.1f}")
    for name, cli_args in COMMANDS.items():
        seconds = _median_seconds([sys.executable, "-m", "convscale_cli", *cli_args], args.repeat)
        verdict = "ok" if seconds <= GOAL_S else "SLOW"
        print(f"{name:<12} {seconds:>9.3f} {seconds / baseline:>15.1f}  {verdict}")


if __name__ == "__main__":
    main()
