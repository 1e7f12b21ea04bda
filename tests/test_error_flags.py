"""Library errors name parameters; the CLI shows them as the running command's flags."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from convscale_cli.cli import main
from convscale_cli.cli._flags import as_flags, command_flags
from convscale_cli.errors import UsageError

PACKAGE = Path(__file__).resolve().parents[1] / "convscale_cli"
FLAG = re.compile(r"(?<![\w`-])--[a-z][a-z0-9-]+")


def _raised_strings(path: Path) -> list[tuple[int, str]]:
    """Every string literal inside a ``raise`` statement of ``path``, with its line."""
    source = path.read_text()
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Raise) and node.exc is not None:
            text = ast.get_source_segment(source, node.exc) or ""
            found.append((node.lineno, text))
    return found


def test_library_errors_name_no_command_line_flags() -> None:
    """Outside ``convscale_cli/cli`` an error names the parameter (``epochs``), never a flag (``--epochs``); only a
    suggested command (``convscale finetune --from ...``) may spell flags out."""
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}:{line}: {FLAG.search(text).group()}"  # type: ignore[union-attr]
        for path in sorted(PACKAGE.rglob("*.py"))
        if "cli" not in path.relative_to(PACKAGE).parts[:1]
        for line, text in _raised_strings(path)
        if FLAG.search(text) and "convscale " not in text
    ]
    assert offenders == []


@pytest.mark.parametrize(
    ("message", "command", "shown"),
    [
        ("`epochs` must be a positive number, got 0", "tune-lr", "--epochs must be a positive number, got 0"),
        ("choose another `out` or pass `force` to start over", "pretrain", "choose another --out or pass --force to"),
        ("`pretrained` 'x' holds b, not `model=c`", "finetune", "--from 'x' holds b, not --model c"),
        ("drop `batch_size=...` to inherit it", "tune-lr", "drop --batch-size to inherit it"),
        ("drop `precision=...` to inherit it", "tune-lr", "drop --set precision=... to inherit it"),
        ("drop `data_options.KEY=VALUE`", "pretrain", "drop --data-option KEY=VALUE"),
        ("carve one with `holdout=0.01`", "pretrain", "carve one with --set holdout=0.01"),
        ("`out` 'a' is a file", "sweep", "out 'a' is a file"),  # no such option: the name, plainly
        ("e.g. `shard=0/4`", "sweep", "e.g. --shard 0/4"),
        ("`workers` must be >= 0", "data convert", "--workers must be >= 0"),  # a command inside a group
        ("`crop_fraction` must be in (0, 1]", "eval", "--eval-crop must be in (0, 1]"),
        ("run `convscale tune-lr` first", "sweep", "run `convscale tune-lr` first"),  # not a parameter
    ],
)  # fmt: skip
def test_backticked_parameters_become_the_commands_flags(message: str, command: str, shown: str) -> None:
    assert as_flags(message, command_flags(command.split())).startswith(shown)


def test_the_library_names_the_parameter_and_the_cli_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The same bad value, from a notebook and from the shell: the library's error names ``epochs``, the command's
    one ``Error:`` line names ``--epochs`` (the CLI itself no longer checks the value), exit 2."""
    from convscale_cli.plugins import get_registry
    from convscale_cli.tuning import tune_cell

    with pytest.raises(UsageError, match=r"^`epochs` must be a positive number, got -1"):
        tune_cell("nfnet-tiny-l0", -1.0, tmp_path, dataset="shapes", registry=get_registry())
    argv = ["tune-lr", "--model", "nfnet-tiny-l0", "--epochs", "-1", "--runs", str(tmp_path / "runs")]
    assert main(argv) == 2
    assert capsys.readouterr().err == "Error: --epochs must be a positive number, got -1.0\n"
    assert not (tmp_path / "runs").exists()  # refused before the runs directory is made
    with pytest.raises(UsageError, match=r"^`runs_dir` '.*' is a file"):
        (tmp_path / "afile").write_text("x")
        tune_cell("nfnet-tiny-l0", 1.0, tmp_path / "afile", registry=get_registry())
    assert main(["tune-lr", "--model", "nfnet-tiny-l0", "--epochs", "1", "--runs", str(tmp_path / "afile")]) == 2
    assert capsys.readouterr().err.startswith(f"Error: --runs '{tmp_path / 'afile'}' is a file")
    assert main(["sweep", "x.toml", "--shard", "3/2"]) == 2
    assert capsys.readouterr().err.startswith("Error: --shard 3/2: worker index 3 is not below N = 2")
