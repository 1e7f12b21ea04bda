"""The CLI shell: command listing, one-line errors with exit code 2, fast start without jax."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from convscale_cli.cli import main


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "convscale_cli", *args], capture_output=True, text=True)


def test_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("models", "datasets", "plugins"):
        assert f"  {command} " in out


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["modls"], "Error: No such command 'modls'. Did you mean 'models'?"),
        (["models", "--jsn"], "Error: No such option: --jsn (Possible options: --json)"),
        (["models", "--resolution", "-3"], "Error: --resolution must be > 0, got -3"),
        (
            ["models", "--resolution", "abc"],
            "Error: Invalid value for '--resolution': Input should be a valid integer, "
            "unable to parse string as an integer",
        ),
        (["models", "--family", "nfent"], "Error: unknown family 'nfent': did you mean 'nfnet'?"),
        (["datasets", "no-such"], "Error: no dataset matches 'no-such'; run `convscale datasets` to list all"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(args: list[str], expected: str) -> None:
    result = _run(args)
    assert result.returncode == 2
    assert result.stderr.strip() == expected
    assert "Traceback" not in result.stderr


def test_debug_shows_the_traceback() -> None:
    result = _run(["--debug", "models", "--resolution", "-3"])
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_version() -> None:
    result = _run(["--version"])
    assert result.returncode == 0 and result.stdout.startswith("convscale ")


HEAVY = ("jax", "flax", "optax", "grain", "orbax", "torch", "tensorflow")
# pydantic is typer's, for coercing option values; convscale_cli/cli/coerce.py keeps it out of the light commands.
LIGHT_ONLY = (*HEAVY, "pydantic", "numpy")


def _imported_top_level(args: list[str], watch: tuple[str, ...]) -> list[str]:
    code = (
        f"import sys; from convscale_cli.cli import main; rc = main({args!r}); "
        f"heavy = sorted({{m.split('.')[0] for m in sys.modules}} & set({watch!r})); "
        "print('HEAVY=' + ','.join(heavy), file=sys.stderr); sys.exit(rc)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stderr.strip().splitlines()[-1].removeprefix("HEAVY=").split(",")


@pytest.mark.parametrize(
    "args", [["--help"], ["models"], ["datasets"], ["plugins"], ["eval", "--help"], ["export", "--help"]]
)
def test_light_commands_never_import_jax(args: list[str]) -> None:
    assert _imported_top_level(args, HEAVY) == [""]


@pytest.mark.parametrize("args", [["--help"], ["models"], ["plan", "--budget", "10k-core-hours"]])
def test_benchmarked_commands_import_neither_pydantic_nor_numpy(args: list[str]) -> None:
    """The start-up benchmark's commands (benchmarks/bench_cli.py) stay on typer's pydantic-free path."""
    assert _imported_top_level(args, LIGHT_ONLY) == [""]


def test_models_and_datasets_json_are_valid() -> None:
    for command in ("models", "datasets", "plugins"):
        result = _run([command, "--json"])
        assert result.returncode == 0, result.stderr
        assert isinstance(json.loads(result.stdout), list)


TAKEN = [
    (str, "nfnet-tiny-*"),
    (str, ""),
    (int, 4096),
    (int, "64"),
    (int, "-3"),
    (int, "0"),
    (int, "-0"),
    (float, 0.356),
    (float, "0.3"),
    (float, "-2"),
    (float, "1e-1"),
    (float, "1.5E21"),
    (float, "10"),
]
DECLINED = [
    (int, "012"),
    (int, "1_000"),
    (int, " 7"),
    (int, "1.0"),
    (int, "abc"),
    (int, True),
    (float, ".3"),
    (float, "inf"),
    (float, "1e+3"),
    (float, 1),
    (bool, "yes"),
]


@pytest.mark.parametrize(("annotation", "value"), TAKEN + DECLINED)
def test_fast_coercion_agrees_with_typer_or_declines(annotation: type, value: object) -> None:
    import typer._coercion
    from typer.models import OptionInfo

    from convscale_cli.cli.coerce import UNDECIDED, fast_value

    info = OptionInfo()
    fast = fast_value(annotation, info, None, value)
    if (annotation, value) in DECLINED:
        assert fast is UNDECIDED  # left to typer's pydantic adapter: lax forms and every error message stay typer's
        return
    descriptor = typer._coercion.resolve_type_descriptor(annotation, info)
    expected = typer._coercion.build_runtime_param(descriptor)._coerce_value(value, param=None, ctx=None)
    assert type(fast) is type(expected) and str(fast) == str(expected)


def test_ranged_and_parsed_options_are_left_to_typer() -> None:
    from typer.models import OptionInfo

    from convscale_cli.cli.coerce import UNDECIDED, fast_value

    assert fast_value(int, OptionInfo(min=1), None, "5") is UNDECIDED
    assert fast_value(str, OptionInfo(parser=str.upper), None, "a") is UNDECIDED


COMMANDS = ["pretrain", "finetune", "plan", "tune-lr", "sweep", "eval", "export", "models", "datasets", "report"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_no_python_types(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "list[" not in out and "<dict" not in out  # repeatable options read KEY=VALUE, not <list[str]>


def test_pattern_help_fits_each_listing(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["datasets", "--help"]) == 0
    assert "nfnet" not in capsys.readouterr().out
    assert main(["models", "--help"]) == 0
    assert "nfnet-f*" in capsys.readouterr().out


def test_pretrain_help_gives_examples_and_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    import dataclasses

    from convscale_cli.engine.config import PretrainConfig

    assert main(["pretrain", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.replace("│", " ").split())
    assert "Examples" in text and "convscale pretrain --model nfnet-tiny-l1 --dataset shapes" in text
    assert "0.25 .. 8" not in text  # the paper's grid is not a limit of the flag
    defaults = {f.name: f.default for f in dataclasses.fields(PretrainConfig)}
    for key in ("eval_every", "checkpoint_every", "keep", "log_every", "seed", "worker_count"):
        assert f"(default {defaults[key]:g})" in text or f"(default: {defaults[key]:g})" in text, key
    assert f"(default {defaults['checkpoint_minutes']:g})" in text


def test_pretrain_dry_run_prints_the_resolved_run_without_jax(tmp_path) -> None:  # noqa: ANN001
    out = tmp_path / "run"
    args = ["pretrain", "--model", "nfnet-tiny-l1", "--dataset", "shapes", "--data-option", "size=1024", "--steps", "5",
            "--batch-size", "64", "--lr", "25.6", "--out", str(out), "--dry-run"]  # fmt: skip
    assert _imported_top_level(args, HEAVY) == [""]  # nothing compiles, nothing imports jax
    assert not out.exists()
    result = _run([*args, "--json"])
    assert result.returncode == 0, result.stderr
    resolved = json.loads(result.stdout)
    assert resolved["derived"]["total_steps"] == 5 and resolved["derived"]["total_examples"] == 320
    assert resolved["derived"]["peak_lr"] == pytest.approx(25.6 * 64 / 4096)
    text = _run(args).stdout
    assert "pretrain nfnet-tiny-l1 on shapes" in text and "5 steps" in text and "peak lr 0.4" in text


def test_models_table_shows_small_models_in_thousands(capsys: pytest.CaptureFixture[str]) -> None:
    from convscale_cli.cli.registry_cmds import format_params

    shown = [format_params(n) for n in (512, 25_400, 999_949, 999_950)]
    assert shown == ["512", "25.4k", "999.9k", "1.0M"]
    assert main(["models", "vit-tiny-l0"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("vit-tiny-l0"))
    assert "0.0M" not in row and "k " in row  # ~25k parameters printed as 0.0M before
