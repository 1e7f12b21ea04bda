"""The ``convscale`` command: a thin Typer layer over the library.

Only this package defines options. Commands build typed configs and call library code; library code raises
:class:`~convscale_cli.errors.ConvscaleError`, which :func:`main` turns into one ``Error: ...`` line on stderr (the
parameters it names shown as the command's flags) and the error's exit code (2 for bad input). ``--debug`` shows the
traceback instead.

Keep this import graph free of jax, flax, optax, grain and orbax: ``--help``, ``models``, ``datasets``, ``plugins`` and
``plan`` must start in well under a second. Commands that train import the engine inside their function body.
Command modules leave out ``from __future__ import annotations``: typer reads every command's signature at each start,
and string annotations would be compiled anew each time (30 ms of ``convscale models``).
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Sequence

import typer

from convscale_cli import __version__, interrupts
from convscale_cli.cli import _state, coerce
from convscale_cli.errors import ConvscaleError, ExitCode

coerce.install()  # typer would import pydantic (~145 ms) to pass most options through unchanged

app = typer.Typer(
    name="convscale",
    help=(
        "Spend a vision pre-training compute budget well: plan the model, epochs and learning rate for a budget, "
        "train and fine-tune NFNets and ViTs, and fit scaling laws to your runs "
        "(Smith et al. 2023, 'ConvNets Match Vision Transformers at Scale')."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"convscale {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks instead of one-line errors."),
    strict: bool = typer.Option(
        False, "--strict", help="Fail when a plugin cannot be loaded (default: warn and skip it)."
    ),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    _state.debug = debug or _state.debug
    if strict:
        import os

        os.environ["CONVSCALE_STRICT_PLUGINS"] = "1"


def _register_commands() -> None:
    # Each module adds its commands to `app`; importing them is cheap (no jax at module level).
    from convscale_cli.cli import (  # noqa: F401
        data_cmd,
        eval_cmd,
        export_cmd,
        finetune_cmd,
        plan_cmd,
        pretrain_cmd,
        quickstart_cmd,
        registry_cmds,
        report_cmd,
        sweep_cmd,
        weights_cmd,
    )


_register_commands()


MESSAGE_CHARS = 600  # an error line quoting a pasted 20 kB value stays readable


def _one_line(text: str) -> str:
    line = " ".join(part.strip() for part in str(text).splitlines() if part.strip())
    if len(line) <= MESSAGE_CHARS:
        return line
    return f"{line[: MESSAGE_CHARS - 100]} ...[{len(line) - MESSAGE_CHARS + 20} characters]... {line[-80:]}"


def _os_error(exc: OSError) -> str:
    """``Read-only file system: 'runs/a/config.json'``: the reason and the path, without the errno."""
    names = [repr(str(name)) for name in (exc.filename, exc.filename2) if name is not None]
    return f"{exc.strerror or exc}: {' -> '.join(names)}" if names else str(exc.strerror or exc)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    print(f"Warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point; returns the process exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    _state.debug = "--debug" in args
    warnings.showwarning = _show_warning
    if not _state.debug:
        # Orbax and grain log through absl: routine notices at WARNING ("Metadata file does not exist"), and at ERROR
        # what convscale reports itself in one line (a corrupt checkpoint: a CheckpointWarning, then the fallback).
        logging.getLogger("absl").setLevel(logging.CRITICAL)
    try:
        with interrupts.latched():
            result = app(args=args, prog_name="convscale", standalone_mode=False)
        if result == ExitCode.INTERRUPTED:  # typer turns a Ctrl-C into this exit code, silently
            print("Interrupted.", file=sys.stderr)
        return int(result) if isinstance(result, int) else ExitCode.OK
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        print("Interrupted.", file=sys.stderr)
        return ExitCode.INTERRUPTED
    except typer.TyperException as exc:  # typer's (vendored click's) usage errors: unknown command/option, bad value
        if _state.debug:
            raise
        if type(exc).__name__ == "NoArgsIsHelpError":
            print(exc.ctx.get_help())  # type: ignore[attr-defined]
            return ExitCode.OK
        print(f"Error: {_one_line(exc.format_message())}", file=sys.stderr)  # type: ignore[attr-defined]
        return getattr(exc, "exit_code", ExitCode.USAGE_ERROR)
    except ConvscaleError as exc:
        if _state.debug:
            raise
        from convscale_cli.cli._flags import as_flags, command_flags

        print(f"Error: {_one_line(as_flags(str(exc), command_flags(args)))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return ExitCode.INTERRUPTED
    except OSError as exc:  # a path given: read-only, not writable, a file where a directory goes, a name too long
        if _state.debug:
            raise
        print(f"Error: {_one_line(_os_error(exc))}", file=sys.stderr)
        return ExitCode.USAGE_ERROR


def run() -> None:
    """The ``convscale`` console script."""
    sys.exit(main())
