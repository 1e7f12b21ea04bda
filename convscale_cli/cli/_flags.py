"""Library error messages in the running command's flags.

Library messages name parameters in backticks, as the library calls them (:mod:`convscale_cli.errors`): ```epochs`
must be a positive number``, ``pass `force=True```, ``set `data_options.size=4096```. :func:`as_flags` shows each as
the command's option (``--epochs``, ``--force``, ``--data-option size=4096``; ``name=...`` as the option alone), a
``name=value`` the command has no option for as ``--set name=value``, and any other name plainly, without the
backticks.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

# Config fields whose command-line option has another name.
ALIASES = {
    "pretrained": "from",
    "eval_crop_fraction": "eval_crop",
    "crop_fraction": "eval_crop",
    "worker_count": "workers",
    "data_options": "data_option",
    "runs_dir": "runs",
    "trackers": "tracker",
}
_NAMED = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)((?:\.[A-Za-z0-9_]+)*)(?:=([^`]*))?`")


def command_flags(args: Sequence[str]) -> dict[str, str]:
    """Each option of the command ``args`` runs, by its parameter name: ``{"batch_size": "--batch-size", ...}``."""
    import typer.main

    from convscale_cli.cli import app

    command = typer.main.get_command(app)
    for word in (a for a in args if not a.startswith("-")):  # down the groups: `data convert`
        subcommands = getattr(command, "commands", None)
        if not subcommands or word not in subcommands:
            break
        command = subcommands[word]
    if getattr(command, "commands", None) is not None:
        return {}  # no command reached, only a group
    flags = {}
    for param in command.params:
        long = [o for o in param.opts if o.startswith("--")]
        if long and param.name:
            flags[param.name.rstrip("_")] = long[0]
    return flags


def as_flags(message: str, flags: Mapping[str, str]) -> str:
    """``message`` with each backticked parameter shown as one of ``flags`` (see the module docstring)."""

    def show(match: re.Match[str]) -> str:
        head, rest, value = match.group(1), match.group(2), match.group(3)
        flag = flags.get(ALIASES.get(head, head)) or flags.get(head)
        if flag is not None and not rest:  # `batch_size=...`: the flag alone
            return flag if value in (None, "...") else f"{flag} {value}"
        if flag is not None:  # data_options.size=4096 -> --data-option size=4096
            key = rest[1:]
            return f"{flag} {key}" if value is None else f"{flag} {key}={value}"
        name = head + rest
        if value is None:
            return name
        return f"--set {name}={value}" if "set" in flags else f"{name}={value}"

    return _NAMED.sub(show, message)
