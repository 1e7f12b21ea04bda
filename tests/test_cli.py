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
        (["models", "--resolution", "abc"], "Error: Invalid value for '--resolution': Input should be a valid integer, "
         "unable to parse string as an integer"),
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


@pytest.mark.parametrize("args", [["--help"], ["models"], ["datasets"], ["plugins"]])
def test_light_commands_never_import_jax(args: list[str]) -> None:
    code = (
        f"import sys; from convscale_cli.cli import main; rc = main({args!r}); "
        f"heavy = sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})); "
        "print('HEAVY=' + ','.join(heavy), file=sys.stderr); sys.exit(rc)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "HEAVY=\n" in result.stderr + "\n", result.stderr


def test_models_and_datasets_json_are_valid() -> None:
    for command in ("models", "datasets", "plugins"):
        result = _run([command, "--json"])
        assert result.returncode == 0, result.stderr
        assert isinstance(json.loads(result.stdout), list)
