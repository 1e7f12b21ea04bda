"""Typed errors raised by library code and caught only by the CLI.

Every error carries the exit code the CLI returns for it. Messages are one line and name the bad value, what was
expected and, where there is a finite set of choices, the close matches (pytest's ``ExitCode`` is the model).

A message names a parameter as the library calls it, in backticks: ```epochs` must be a positive number``, ``pass
`force=True```, ``set `holdout=0.01```. The library knows no command-line flags; the CLI shows each backticked name as
the running command's flag (``--epochs``, ``--force``, ``--set holdout=0.01``), see
:func:`convscale_cli.cli._flags.as_flags`.
"""

from __future__ import annotations

import difflib
import enum
from collections.abc import Iterable


class ExitCode(enum.IntEnum):
    """Process exit codes of the ``convscale`` command."""

    OK = 0
    INTERNAL_ERROR = 1  # a bug: an unexpected exception (traceback with --debug)
    USAGE_ERROR = 2  # bad input: unknown name, malformed config, impossible value
    TRAINING_FAILED = 3  # the run itself failed (NaN loss, budget impossible to meet, ...)
    INTERRUPTED = 130  # SIGINT/SIGTERM after a clean save


class ConvscaleError(Exception):
    """Base class of every error convscale raises on purpose."""

    exit_code: ExitCode = ExitCode.USAGE_ERROR


class UsageError(ConvscaleError):
    """Bad input from the user: a value out of range, a missing file, an inconsistent option set."""


class ConfigError(UsageError):
    """A run config (TOML or overrides) that does not match the config schema."""


class PluginError(ConvscaleError):
    """A plugin failed to load or register (raised only in strict mode; otherwise reported as a warning)."""


class DuplicateRegistrationError(PluginError):
    """Two plugins registered the same architecture or dataset name."""


class DataError(UsageError):
    """A dataset that cannot be read: missing directory, no images, corrupt files in strict mode."""


class CheckpointError(UsageError):
    """A checkpoint or run directory that cannot be used for what was asked."""


class TrainingError(ConvscaleError):
    """The training run failed (for example a non-finite loss)."""

    exit_code = ExitCode.TRAINING_FAILED


class RunInterrupted(ConvscaleError):
    """The run was stopped by a signal after saving a checkpoint."""

    exit_code = ExitCode.INTERRUPTED


def close_matches(name: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """Return up to ``n`` choices that look like ``name`` (typos first, then shared prefixes)."""
    choices = list(choices)
    found = difflib.get_close_matches(name, choices, n=n, cutoff=0.6)
    if len(found) < n:
        low = name.lower()
        for choice in sorted(choices):
            if choice not in found and (choice.lower().startswith(low) or low in choice.lower()):
                found.append(choice)
            if len(found) == n:
                break
    return found


def did_you_mean(name: str, choices: Iterable[str], *, prefix: str = "", n: int = 3) -> str:
    """``did you mean 'a' or 'b'?`` for up to ``n`` choices that look like ``name`` (shown with ``prefix``), or ""."""
    matches = close_matches(name, choices, n=n)
    return f"did you mean {' or '.join(repr(prefix + m) for m in matches)}?" if matches else ""


class UnknownNameError(UsageError):
    """A name (model, dataset, hardware, config key, ...) that is not one of the known choices."""

    def __init__(self, kind: str, name: str, choices: Iterable[str], hint: str = "") -> None:
        choices = sorted(choices)
        self.kind, self.name, self.choices = kind, name, choices
        if choices and len(choices) <= 12:
            otherwise = "choose from " + ", ".join(choices)
        else:
            otherwise = hint or f"{len(choices)} known; list them with `convscale {kind}s`"
        tail = did_you_mean(name, choices) or otherwise
        super().__init__(f"unknown {kind} {name!r}: {tail}")
