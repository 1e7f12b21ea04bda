"""Fuzzed command lines across every subcommand: bad input is an ``Error:`` line and exit 2, never exit 1.

Hypothesis draws a subcommand, then options and arguments read from the CLI itself, each given a value from a pool of
hostile strings (overflowing numbers, NaN, full-width digits, dotted keys, paths to files of the wrong kind). Nothing
trains: runs go to a directory convscale did not write (refused), studies and weights are hostile files. A watchdog
turns a hang into a failure naming the command line.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from convscale_cli.cli import app, main

EXAMPLES = int(os.environ.get("CONVSCALE_FUZZ_EXAMPLES", "200"))
SECONDS_PER_LINE = 60
# Options that reach outside the process (a coordinator to connect to) are not fuzzed.
SKIPPED = {"--coordinator-address", "--num-processes", "--process-id", "--debug"}
WORDS = [
    "", "0", "-1", "1", "7", "2147483648", "100000000000", "1e309", "nan", "-inf", "１２", "0x10", "3.5", "x", "a=b",
    "=", "augment.min_area=x", "num_classes=2", "recipe.lr=[1]", "a.b.c.d=1", "lr=1e400", "seed=-1", "model_options=5",
    "root=/nonexistent", "nfnet-test", "vit-test", "shapes", "digits", "arrayrecord", "timm", "dm_nfnet_f0",
    "tpu-v4", "cpu", "2-cpu-hours", "1e20-flops", "-3-core-hours", "fp32", "bf16", "params", "macs", "~", "../..",
    "ünïcødé", "a" * 300,
]  # fmt: skip


def _paths(root: Path) -> list[str]:
    """Files and directories of the wrong kind for every path argument."""
    foreign = root / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"model_type": "vit"}))
    (foreign / "metrics.jsonl").write_text("{}\n")
    (root / "empty").mkdir()
    (root / "text.txt").write_text("hello")
    (root / "bad.toml").write_text("[study\n")
    (root / "table.toml").write_text('pretrain = 5\nfinetune = "x"\nstudy = 5\n')
    (root / "deep.toml").write_text("a = " + "[" * 1000 + "]" * 1000 + "\n")
    (root / "study.toml").write_text('[study]\nmodels = 5\n[engine]\nmodel = "x"\n')
    (root / "weights.safetensors").write_bytes(b"\xff" * 24)
    names = ("empty", "text.txt", "bad.toml", "deep.toml", "study.toml", "weights.safetensors", "missing", "table.toml")
    return [str(foreign), *(str(root / name) for name in names), "/dev/zero"]


def _commands() -> dict[str, list[Any]]:
    """``"data convert" -> [click params]`` for every leaf command of the CLI."""
    out: dict[str, list[Any]] = {}

    def walk(group: Any, prefix: str) -> None:
        for name, command in group.commands.items():
            if hasattr(command, "commands"):
                walk(command, f"{prefix}{name} ")
            else:
                out[f"{prefix}{name}"] = [p for p in command.params if not set(p.opts) & SKIPPED]

    walk(typer.main.get_command(app), "")
    return out


COMMANDS = _commands()
PATH_PARAMS = {"config", "study", "from_", "runs", "out", "file", "src", "runs_dir"}
# Where a valid line would train or run a study, a hostile value is always given (drawn first, so it wins).
GUARDS = {
    "pretrain": ["--out", "{foreign}"],
    "finetune": ["--out", "{foreign}"],
    "tune-lr": ["--runs", "{foreign}"],
    "quickstart": ["--study", "{study}"],
}


@st.composite
def command_lines(draw: st.DrawFn, paths: list[str]) -> list[str]:
    name = draw(st.sampled_from(sorted(COMMANDS)))
    words, files = st.sampled_from(WORDS + paths), st.sampled_from([*paths, "", "~", "x"])
    argv = name.split()
    params = COMMANDS[name]
    # Each path option half of the time (they lead to the most code), then up to four others.
    chosen = [p for p in params if p.name in PATH_PARAMS and draw(st.booleans())]
    chosen += draw(st.lists(st.sampled_from(params), max_size=4)) if params else []
    for param in chosen:
        values = files if param.name in PATH_PARAMS else words  # a path option mostly gets a path of the wrong kind
        if param.param_type_name == "argument":
            argv.append(draw(values))
        elif getattr(param, "is_flag", False):
            argv.append(param.opts[0])
        else:
            argv += [param.opts[0], draw(values)]
    return argv


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    yield _paths(tmp_path_factory.mktemp("fuzz"))


def _guarded(argv: list[str], paths: list[str]) -> list[str]:
    guard = [p.format(foreign=paths[0], study=paths[5]) for p in GUARDS.get(argv[0], [])]
    return [*argv, *guard]


def _watchdog(signum: int, frame: Any) -> None:
    raise TimeoutError(f"a command line ran for over {SECONDS_PER_LINE} s")


@pytest.mark.slow
def test_fuzzed_command_lines_never_crash(
    hostile: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)  # default output directories land here

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(command_lines(hostile))
    def check(argv: list[str]) -> None:
        argv = _guarded(argv, hostile)
        previous = signal.signal(signal.SIGALRM, _watchdog)
        signal.alarm(SECONDS_PER_LINE)
        try:
            code = main(argv)
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
        out = capsys.readouterr()
        text = out.out + out.err
        assert code in (0, 2), (argv, code, text[-2000:])
        assert "Traceback" not in text, (argv, text[-2000:])
        if code == 2:
            assert "Error:" in out.err, (argv, text[-2000:])

    check()
