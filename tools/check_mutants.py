"""Check that the test suite kills three plausible training bugs ("mutants") that still let a run finish.

Each mutant is a one-line edit of the engine that a careful reviewer could miss, because the run it produces trains,
evaluates and saves sensible-looking numbers:

* ``finetune-drops-mixing``: fine-tuning validates and saves ``--mixup``/``--cutmix`` but never hands them to the step;
* ``ema-of-old-params``: the EMA averages the parameters from before the step's update (NFNet, Brock et al. 2021,
  appendix A, average the updated ones);
* ``dropout-key-fixed``: the dropout / stochastic-depth key does not depend on the step, so every step draws the
  same masks.

For each mutant the script edits the source file in place, runs the tests named for it, and puts the file back
byte for byte (also on Ctrl-C or SIGTERM). The tests are first run on the unmodified tree, so a test that fails
anyway cannot pass for a kill. Usage, from the repository root::

    python tools/check_mutants.py            # all three
    python tools/check_mutants.py ema-of-old-params

Exit status: 0 when every mutant is killed, 1 when one survives, 2 when the check itself cannot run (a test that
fails on the clean tree, or a mutant whose source line has changed: update its ``old`` text).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = "tests/test_step_semantics.py"


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the repository root
    old: str  # must occur exactly once in the file
    new: str
    tests: tuple[str, ...]  # pytest node ids that must fail on the mutant


MUTANTS = (
    Mutant(
        name="finetune-drops-mixing",
        path="convscale_cli/finetune/api.py",
        old='"mixup_alpha": config.mixup,\n            "cutmix_alpha": config.cutmix,',
        new='"mixup_alpha": 0.0,\n            "cutmix_alpha": 0.0,',
        tests=(f"{TESTS}::test_finetuning_mixes_the_batch_when_asked",),
    ),
    Mutant(
        name="ema-of-old-params",
        path="convscale_cli/engine/step.py",
        old="ema = ema_update(ema, params, state.step, ema_decay)",
        new="ema = ema_update(ema, state.params, state.step, ema_decay)",
        tests=(
            f"{TESTS}::test_pretraining_ema_averages_the_updated_parameters",
            f"{TESTS}::test_finetuning_ema_averages_the_updated_parameters",
        ),
    ),
    Mutant(
        name="dropout-key-fixed",
        path="convscale_cli/engine/step.py",
        old='rngs={"dropout": rng}',
        new='rngs={"dropout": state.rng}',
        tests=(
            f"{TESTS}::test_pretraining_draws_new_dropout_randomness_every_step",
            f"{TESTS}::test_finetuning_draws_new_dropout_randomness_every_step",
        ),
    ),
)
NAMES = [m.name for m in MUTANTS]


def _drop_bytecode(source: Path) -> None:
    """Remove the cached bytecode of ``source``, so no interpreter runs a stale copy of a file edited in place."""
    for cached in (source.parent / "__pycache__").glob(f"{source.stem}.*.pyc"):
        cached.unlink(missing_ok=True)


def _pytest(tests: tuple[str, ...]) -> int:
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    env.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    return subprocess.run(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode


def run_mutant(mutant: Mutant) -> bool:
    """Apply ``mutant``, run its tests, restore the file; True when a test failed (the mutant is killed)."""
    source = REPO / mutant.path
    original = source.read_bytes()
    text = original.decode()
    if text.count(mutant.old) != 1:
        raise RuntimeError(f"{mutant.name}: {mutant.path} holds {text.count(mutant.old)} copies of {mutant.old!r}")
    try:
        source.write_text(text.replace(mutant.old, mutant.new))
        _drop_bytecode(source)
        code = _pytest(mutant.tests)
    finally:
        source.write_bytes(original)
        _drop_bytecode(source)
    if code not in (0, 1):
        raise RuntimeError(f"{mutant.name}: pytest exited with {code} (not a test failure): run its tests by hand")
    return code == 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"mutants to check (default: all of {', '.join(NAMES)})")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in NAMES]
    if unknown:
        parser.error(f"unknown mutant {unknown[0]!r}: choose from {', '.join(NAMES)}")
    chosen = [m for m in MUTANTS if not args.names or m.name in args.names]
    # SIGTERM unwinds like Ctrl-C, through run_mutant's ``finally``, so the source file is always put back.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    for mutant in chosen:  # every patch must still apply before anything runs
        if (REPO / mutant.path).read_text().count(mutant.old) != 1:
            print(f"error: mutant {mutant.name}: {mutant.old!r} no longer occurs once in {mutant.path}")
            return 2
    tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
    if _pytest(tests) != 0:
        print(f"error: the mutants' tests fail on the unmodified tree: python -m pytest {' '.join(tests)}")
        return 2
    survived = []
    for mutant in chosen:
        start = time.monotonic()
        try:
            killed = run_mutant(mutant)
        except RuntimeError as exc:
            print(f"error: {exc}")
            return 2
        print(f"{mutant.name:24s} {'killed' if killed else 'SURVIVED'}  ({time.monotonic() - start:.0f} s)")
        if not killed:
            survived.append(mutant.name)
    if survived:
        print(f"{len(survived)} of {len(chosen)} mutants survived: {', '.join(survived)}")
        return 1
    print(f"all {len(chosen)} mutants killed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
