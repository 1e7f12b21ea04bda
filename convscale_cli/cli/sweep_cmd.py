"""``convscale sweep``: run a study's cells, in one process or as one of N workers sharing the runs directory.

``--plan`` imports neither jax nor numpy; the sweep imports the engine only when it trains.
"""

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from convscale_cli.cli import app
from convscale_cli.cli._output import err, print_json, progress_to_stderr

if TYPE_CHECKING:
    from convscale_cli.registry import Registry
    from convscale_cli.sweep import CellPlan, StudyConfig, SweepResult
    from convscale_cli.sweep_graph import Shard
    from convscale_cli.tuning import TuneResult


@app.command()
def sweep(
    study: Annotated[Path, typer.Argument(help="Study file (TOML), e.g. examples/quickstart.toml.")],
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set", metavar="KEY=VALUE", help="Override a study key as KEY=VALUE (e.g. out=runs/b); repeatable."
        ),
    ] = None,
    shard: Annotated[
        str | None,
        typer.Option(
            "--shard",
            metavar="I/N",
            help="Run as worker I of N (0 <= I < N): the workers share the runs directory and nothing else; start "
            "all N with the same study file (a job array, one process per GPU).",
        ),
    ] = None,
    plan: Annotated[
        bool, typer.Option("--plan", help="Print the cells' waves, costs and critical path; train nothing.")
    ] = False,
    wait_timeout: Annotated[
        float,
        typer.Option(
            "--wait-timeout",
            metavar="SECONDS",
            help="Give up after waiting this long for another worker's cell with nothing in the runs directory "
            "changing.",
        ),
    ] = 3600.0,
    json_: Annotated[bool, typer.Option("--json", help="Print the decisions (or the plan) as JSON.")] = False,
) -> None:
    """Run a study: every (model, epoch budget) cell, cheapest first, each tuned by the two-trial rule.

    Resumable: rerun the same command and finished runs are skipped (an interrupted run resumes from its checkpoint).
    With --shard I/N, N workers split the cells; their decisions and tuning.jsonl are those of one process.
    """
    from convscale_cli.config import nested_overrides
    from convscale_cli.errors import UsageError
    from convscale_cli.plugins import get_registry
    from convscale_cli.sweep import load_study, run_sweep
    from convscale_cli.sweep_graph import Shard

    worker = Shard.parse(shard) if shard is not None else None
    if not wait_timeout > 0:
        raise UsageError(f"--wait-timeout must be a positive number of seconds, got {wait_timeout:g}")
    config = load_study(study, nested_overrides(set_))
    registry = get_registry()
    if plan:
        _print_plan(config, registry, worker, json_)
        return
    if json_:
        with progress_to_stderr(True):
            result = run_sweep(config, registry, shard=worker, wait_timeout=wait_timeout, on_wait=err)
        print_json(
            {
                "out": config.out,
                "shard": None if worker is None else str(worker),
                "cells": [r.to_dict() for r in result.results],
                "runs_used": result.runs_used,
                "trained": result.trained,
                "full_grid_runs": result.full_grid_runs,
            }
        )
        return
    show_sweep(config, registry, worker, wait_timeout)


def show_sweep(
    config: "StudyConfig", registry: "Registry", worker: "Shard | None" = None, wait_timeout: float = 3600.0
) -> "SweepResult":
    """Run the study as ``convscale sweep`` shows it: a live table of the cells, then the runs the rule used."""
    result = _sweep_live(config, registry, worker, wait_timeout)
    mine = "" if worker is None else f" of worker {worker}"
    print(
        f"{len(result.results)} cells{mine}: the {config.rule} rule used {result.runs_used} runs "
        f"({result.trained} trained now) where {result.full_grid_text} needs {result.full_grid_runs}."
    )
    return result


def _print_plan(config: "StudyConfig", registry: "Registry", worker: "Shard | None", json_: bool) -> None:
    from convscale_cli.budget import flops_to_core_hours, format_amount
    from convscale_cli.sweep_graph import plan_dict, study_graph

    graph = study_graph(config, registry)
    counts = sorted({1, 2, 4, 8} | ({worker.count} if worker is not None else set()))
    document = plan_dict(graph, counts)
    owner = graph.assign(worker.count) if worker is not None else None
    if json_:
        if owner is not None:  # each cell's worker of the N given
            for row in document["cells"]:
                row["worker"] = owner[(row["model"], row["epochs"])]
        print_json({"study": str(config.out), **document})
        return
    hours = lambda flops: format_amount(flops_to_core_hours(flops), "core-hours")  # noqa: E731
    note = "; a branching study pays each trunk once, so less" if config.branching else ""
    print(
        f"{len(graph.cells)} cells, {_trials_text(graph.trials)} ({config.rule} rule); estimated cost: each trial "
        f"trained from scratch, 6 x MACs x examples{note}"
    )
    for n, wave in enumerate(graph.waves()):
        print(f"wave {n}: {len(wave)} cell{'s' * (len(wave) != 1)}")
        for key in wave:
            deps = ", ".join(f"{m} x {e:g}" for m, e in graph.direct_deps(key)) or "none"
            who = f"  worker {owner[key]}/{worker.count}" if owner is not None else ""
            print(
                f"  {key[0]} x {key[1]:g} epochs  {graph.cost(key):.3g} FLOPs ({hours(graph.cost(key))}){who}"
                f"  after: {deps}"
            )
    path, critical = graph.critical_path()
    total = document["total"]["train_flops"]
    print(
        f"critical path: {' -> '.join(f'{m} x {e:g}' for m, e in path)}: {critical:.3g} FLOPs ({hours(critical)}),"
        f" {critical / total:.0%} of the study's {total:.3g} ({hours(total)})"
    )
    print(
        f"at most {document['max_useful_workers']} cells can run at once; estimated wall time (FLOPs on the busiest "
        "worker) and speed-up over one worker:"
    )
    for row in document["workers"]:
        print(
            f"  {row['workers']} worker{'s' * (row['workers'] != 1)}: {row['train_flops']:.3g} FLOPs, "
            f"{row['speedup']:.2f}x"
        )


def _sweep_live(
    config: "StudyConfig", registry: "Registry", worker: "Shard | None", wait_timeout: float
) -> "SweepResult":
    from rich.console import Console
    from rich.live import Live
    from rich.table import Table

    from convscale_cli.sweep import plan_cells, run_sweep
    from convscale_cli.sweep_graph import study_graph

    cells = plan_cells(config, registry)
    if worker is not None:
        owner = study_graph(config, registry).assign(worker.count)
        cells = [c for c in cells if owner[(c.model, c.epochs)] == worker.index]
    rows: dict[tuple[str, float], list[str]] = {
        (c.model, c.epochs): [c.model, f"{c.epochs:g}", "pending", "", "", ""] for c in cells
    }

    def render() -> "Table":
        title = f"sweep -> {config.out}" + ("" if worker is None else f" (worker {worker})")
        table = Table(title=title, header_style="bold", box=None, pad_edge=False)
        for column in ("model", "epochs", "status", "trials (alpha: loss)", "best alpha", "note"):
            table.add_column(column, no_wrap=True)
        for row in rows.values():
            table.add_row(*row)
        return table

    console = Console()
    live_mode = console.is_terminal

    def start(cell: "CellPlan") -> None:
        rows[(cell.model, cell.epochs)][2] = "running"
        if live_mode:
            live.update(render())

    def done(cell: "CellPlan", result: "TuneResult") -> None:
        trials = ", ".join(
            f"{t.lr:g}: {'failed' if t.status == 'failed' else f'{t.eval_loss:.4f}'}" for t in result.trials
        )
        reused = all(t.status == "reused" for t in result.trials)
        note = ""
        if result.next_lr is not None:
            won = "alpha/2" if result.next_lr < result.best_lr else "alpha"
            note = f"{won} won: try {result.next_lr:g} next"
        rows[(cell.model, cell.epochs)][2:] = ["done" if reused else "trained", trials, f"{result.best_lr:g}", note]
        if live_mode:
            live.update(render())
        else:
            print(" ".join(x for x in rows[(cell.model, cell.epochs)] if x), flush=True)
        for trial in result.trials:
            if trial.error:
                why = f"{cell.model} x {cell.epochs:g} epochs, alpha {trial.lr:g} failed: {trial.error}"
                if live_mode:
                    console.print(why, markup=False, highlight=False)
                else:
                    print(why, flush=True)

    def wait(message: str) -> None:
        if live_mode:
            console.print(message)
        else:
            print(message, flush=True)

    options: dict[str, Any] = dict(shard=worker, wait_timeout=wait_timeout, on_start=start, on_done=done, on_wait=wait)
    if live_mode:
        import dataclasses

        # One live display at a time: the engine's own Rich bar would clash with the table, so runs log plain lines,
        # which Live prints above the table.
        if "progress" not in config.engine:
            config = dataclasses.replace(config, engine={**config.engine, "progress": "plain"})
        with Live(render(), console=console, refresh_per_second=4, redirect_stdout=True, redirect_stderr=True) as live:
            return run_sweep(config, registry, **options)
    result = run_sweep(config, registry, **options)
    Console(width=1000).print(render())
    return result


def _trials_text(trials: dict[str, int]) -> str:
    """``3 trials each``, or per family where the families' grids differ (``nfnet 3, vit 2 trials per cell``)."""
    sizes = set(trials.values())
    if len(sizes) == 1:
        return f"{sizes.pop()} trials each"
    return ", ".join(f"{family} {n}" for family, n in trials.items()) + " trials per cell"
