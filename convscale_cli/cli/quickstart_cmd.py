"""``convscale quickstart``: the main job — a small scaling study, fine-tuning, report and plan, on a laptop CPU."""

import contextlib
import sys
from pathlib import Path
from typing import Annotated

import typer

from convscale_cli.cli import app
from convscale_cli.cli._output import print_json


@app.command()
def quickstart(
    out: Annotated[Path, typer.Option(help="Where runs/ and report/ go; rerun to resume.")] = Path("quickstart"),
    study: Annotated[
        str | None,
        typer.Option(
            help="A packaged study by name (powerlaw, the default; quickstart, 4 minutes in the early transient, "
            "where only the log-log law can show) or a study TOML file (see examples/).",
            metavar="<name|path>",
        ),
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Training seed instead of the study's (use another --out per seed).")
    ] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print the final summary as JSON.")] = False,
) -> None:
    """Run a complete small scaling study on the embedded data (8-13 minutes on a 2-core CPU, install included).

    Pre-trains a width ladder of small NFNets on `shapes` for epoch budgets of 0.5 to 8 epochs at two learning rates
    (each shorter budget a cooldown branch of the longest run), fine-tunes the best on the real `digits` data, fits the
    scaling laws, writes the HTML report and plans a 10x larger budget from the fitted runs.

    Its cells reach the power-law regime (held-out losses near a quarter of chance, as the paper's), where the paper's
    findings can show, or fail to; `--study quickstart` is a 4-minute version in the early transient of training.
    """
    from convscale_cli import quickstart as job
    from convscale_cli.cli.plan_cmd import show_plan
    from convscale_cli.cli.report_cmd import show_report
    from convscale_cli.cli.sweep_cmd import show_sweep

    display = job.Display(sweep=show_sweep, report=show_report, plan=show_plan)
    if not json_:
        job.run(out, study=study, seed=seed, display=display)
        return
    # Machine-readable mode: the steps' own tables and progress go to stderr, only the summary to stdout.
    with contextlib.redirect_stdout(sys.stderr):
        result = job.run(out, study=study, seed=seed, display=display, echo=lambda _: None)
    print_json(result.to_dict())
