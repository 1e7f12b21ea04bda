"""``convscale plan`` and ``tune-lr``: spend a compute budget well.

``plan`` imports neither jax nor numpy in prior mode (it answers in well under a second); ``tune-lr`` imports the
training engine only when it actually trains.
"""

import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from convscale_cli.cli import app
from convscale_cli.cli._output import print_json, print_table, progress_to_stderr
from convscale_cli.errors import UsageError, did_you_mean

if TYPE_CHECKING:
    from convscale_cli.plan_data import DatasetPlan
    from convscale_cli.planner import Plan
    from convscale_cli.registry import Registry


def _dataset_plan(
    registry: "Registry",
    dataset: str | None,
    dataset_size: int | None,
    resolution: int | None,
    num_classes: int | None,
    data_options: dict[str, Any] | None = None,
) -> "DatasetPlan":
    """:func:`convscale_cli.plan_data.dataset_plan`, its errors in the command's flags."""
    from convscale_cli import plan_data

    if dataset is None and data_options:
        raise UsageError("--data-option needs --dataset (the options belong to a registered dataset)")
    try:
        return plan_data.dataset_plan(
            registry, dataset, size=dataset_size, resolution=resolution, num_classes=num_classes, options=data_options
        )
    except plan_data.DatasetInfoError as exc:
        raise UsageError(
            f"dataset {exc.dataset!r} needs options to report its size ({exc.reason}); pass them with --data-option "
            "KEY=VALUE, or give --dataset-size and --num-classes"
        ) from None


def _fmt_epochs(epochs: float) -> str:
    return f"{epochs:g}"


def _fmt_count(value: float) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


@app.command()
def plan(
    budget: Annotated[
        str, typer.Option(help="Compute budget: 10k-core-hours (TPU-v4), 250-h100-hours, 3-cpu-hours, 1.5e21-flops.")
    ],
    hardware: Annotated[
        str | None,
        typer.Option(
            help="Hardware that runs the plan (tpu-v4, tpu-v3, a100, h100, h200, cpu); default: the "
            "budget's, or tpu-v4 for a FLOP budget."
        ),
    ] = None,
    mfu: Annotated[
        float | None, typer.Option(help="Model-FLOP utilisation on that hardware (default: calibrated, ~0.36).")
    ] = None,
    dataset: Annotated[
        str | None, typer.Option(help="Registered pre-training dataset (default: JFT-4B sizes).")
    ] = None,
    dataset_size: Annotated[
        int | None, typer.Option(help="Training images per epoch (default: the dataset's, or 4e9 for JFT-4B).")
    ] = None,
    resolution: Annotated[
        int | None, typer.Option(help="Training resolution (default: the dataset's, or 224 as in the paper).")
    ] = None,
    num_classes: Annotated[
        int | None, typer.Option(help="Classifier size (default: the dataset's, or 30k for JFT-4B).")
    ] = None,
    data_option: Annotated[
        list[str] | None,
        typer.Option(
            "--data-option",
            metavar="KEY=VALUE",
            help="Dataset option KEY=VALUE, e.g. root=/data/records (repeat); passed to the commands.",
        ),
    ] = None,
    family: Annotated[
        str | None,
        typer.Option(
            help="Architecture family of the candidates (nfnet, vit, ...; default: that of --models, else nfnet)."
        ),
    ] = None,
    models: Annotated[
        str | None, typer.Option(help="Comma-separated globs restricting the candidates, e.g. 'nfnet-tiny-*'.")
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(help="Global batch size (default: the --from runs' batch, else the paper's 4096)."),
    ] = None,
    from_: Annotated[
        Path | None,
        typer.Option("--from", help="Runs directory: fit L(N, D) to its finished runs and rank by predicted loss."),
    ] = None,
    bootstrap: Annotated[
        int,
        typer.Option(
            help="With --from: bootstrap replicates over runs for the predicted-loss intervals (0: none); the same "
            "analysis as convscale report."
        ),
    ] = 200,
    top: Annotated[int, typer.Option(help="How many ranked candidates to show.")] = 5,
    json_: Annotated[bool, typer.Option("--json", help="Print the plan as JSON (schema in README).")] = False,
) -> None:
    """Recommend a model, epoch budget and learning-rate trials for a compute budget.

    Prior mode follows the paper's rules (model size and epochs grow together; alpha ~ 1.6 at small epoch budgets,
    falling slowly); with --from it ranks candidates by the loss a scaling law fitted to your runs predicts.
    """
    from convscale_cli import planner
    from convscale_cli.budget import get_hardware, parse_budget
    from convscale_cli.plan_data import family_of
    from convscale_cli.plugins import get_registry

    if bootstrap < 0:
        raise UsageError(f"--bootstrap must be >= 0, got {bootstrap}")
    parsed = parse_budget(budget)
    if mfu is not None and parsed.is_flops and hardware is None:
        raise UsageError(f"--mfu {mfu} has no effect on a FLOP budget without --hardware")
    hw_name = hardware or ("tpu-v4" if parsed.is_flops else parsed.unit)
    hw = get_hardware(hw_name, mfu=mfu)
    registry = get_registry()
    patterns = tuple(p for p in (models or "").split(",") if p.strip())
    family = family or family_of(registry, patterns)
    if batch_size is None:
        from_runs = None
        if from_ is not None:
            from convscale_cli.plan_fit import runs_batch_size

            from_runs = runs_batch_size(from_, family)
        batch_size = from_runs or planner.PAPER_BATCH_SIZE
    from convscale_cli.config import parse_overrides

    request = planner.PlanRequest(
        budget=parsed,
        hardware=hw,
        dataset=_dataset_plan(registry, dataset, dataset_size, resolution, num_classes, parse_overrides(data_option)),
        family=family,
        batch_size=batch_size,
        models=patterns,
        top=top,
    )
    if from_ is not None:
        from convscale_cli.plan_fit import plan_fitted

        result = plan_fitted(request, registry, from_, bootstrap=bootstrap)
    else:
        result = planner.plan_prior(request, registry)
    if json_:
        print_json(planner.plan_to_dict(result))
        return
    show_plan(result)


def show_plan(plan: "Plan") -> None:
    """Print a plan as ``convscale plan`` does: the budget, the ranked candidates and the recommended commands."""
    from convscale_cli.budget import format_amount
    from convscale_cli.planner import plan_to_dict

    document = plan_to_dict(plan)
    request = plan.request
    b = document["budget"]
    ds = request.dataset
    print(
        f"Budget {b['text']}: {b['flops']:.3g} model FLOPs = {format_amount(b['core_hours'], 'core-hours')} "
        f"(TPU-v4) on {request.hardware.name} at MFU {request.hardware.mfu:.2f}"
    )
    print(
        f"Data: {ds.name or 'JFT-4B-sized'} ({_fmt_count(ds.size)} images/epoch, {ds.num_classes} classes, "
        f"{ds.resolution} px, batch {request.batch_size}); mode: {document['mode']}"
    )
    frontier = document["frontier"]
    print(
        f"Frontier: ~{_fmt_epochs(round(frontier['epochs'], 3))} epochs of a "
        f"~{frontier['macs_per_image'] / 1e9:.3g}-GMAC/image model\n"
    )
    fitted = document["mode"] == "fitted"
    columns = [
        "#",
        "model",
        "params",
        "GMACs",
        "epochs",
        "examples",
        "steps",
        f"cost ({request.budget.unit_label})",
        "% budget",
    ]
    if fitted:
        columns.append("pred. loss (one run, 90%)")
    columns += ["lr", "trials"]
    rows = []
    for i, c in enumerate(plan.candidates, 1):
        row = [
            i,
            c.model,
            _fmt_count(c.params),
            f"{c.macs_per_image / 1e9:.3g}",
            _fmt_epochs(c.epochs),
            _fmt_count(c.examples),
            _fmt_count(c.steps),
            request.budget.format(c.cost).split(" ")[0],
            f"{100 * c.cost_fraction:.0f}%",
        ]
        if fitted:
            low, high = c.loss_interval or (c.predicted_loss, c.predicted_loss)
            mark = "*" if c.extrapolated else ""
            row.append(f"{c.predicted_loss:.3f} ({low:.3f}-{high:.3f}){mark}")
        row += [f"{c.lr:g}", f"{c.lr_trials[0]:g}, {c.lr_trials[1]:g}"]
        rows.append(row)
    print_table(None, columns, rows, right=["params", "GMACs", "epochs", "examples", "steps", "% budget"])
    print(f"params and GMACs at {ds.resolution} px with a {ds.num_classes}-class head")
    best = plan.recommendation
    print(
        f"\nRecommendation: {best.model} for {_fmt_epochs(best.epochs)} epochs "
        f"({request.budget.format(best.cost)}, {100 * best.cost_fraction:.0f}% of the budget); "
        f"try lr alpha {best.lr_trials[0]:g} and {best.lr_trials[1]:g}, keep the lower held-out loss:"
    )
    for command in document["recommendation"]["commands"]:
        print(f"  {command}")
    print(f"lr: {best.lr_source}")
    outside = sorted({what for c in plan.candidates for what in c.extrapolated_in})
    if fitted and outside:
        print(f"* {' or '.join(outside)} outside the fitted runs' range: the prediction extrapolates")
    for note in document["notes"]:
        print(f"Note: {note}")


@app.command("tune-lr")
def tune_lr(
    model: Annotated[str, typer.Option(help="Registered model to tune, e.g. nfnet-tiny-l2.")],
    epochs: Annotated[float, typer.Option(help="Epoch budget of the cell.")],
    runs: Annotated[Path, typer.Option(help="Runs directory: trials are written here, earlier cells read from here.")],
    dataset: Annotated[
        str | None, typer.Option(help="Registered dataset (default: the one the runs directory holds).")
    ] = None,
    grid: Annotated[bool, typer.Option("--grid", help="Run the full factor-2 grid instead of two trials.")] = False,
    lr_grid: Annotated[
        str | None, typer.Option(help="Comma-separated grid for --grid (default: alpha x 2, 1, 1/2 .. 1/16).")
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(help="Global batch size (default: that of the runs already in RUNS, else the recipe's)."),
    ] = None,
    resolution: Annotated[
        int | None,
        typer.Option(help="Training resolution (default: that of the runs already in RUNS, else the model's)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of every trial.")] = 0,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            metavar="KEY=VALUE",
            help="Further engine config fields as KEY=VALUE (precision=fp32, data_options.size=16384); repeatable.",
        ),
    ] = None,
    size_axis: Annotated[str, typer.Option(help="Judge 'smaller model' by params or macs.")] = "params",
    json_: Annotated[bool, typer.Option("--json", help="Print the decision as JSON.")] = False,
) -> None:
    """Tune one cell's learning rate by the paper's two-trial rule (alpha, alpha/2) and record the decision.

    alpha is the best learning rate of the nearest finished cell with a smaller-or-equal model and epoch budget in
    RUNS (none: the recipe's, 1.6 for NFNets). Decisions are appended to RUNS/tuning.jsonl.

    Trials inherit the data options, batch size, precision, resolution, class count and held-out example count of the
    runs already in RUNS on the dataset, and the recipe (schedule, warm-up, AGC exemptions) and augmentation of its
    runs of the model's family, so they stay comparable with the cells they continue; a different value given with
    --batch-size, --resolution or --set is refused.
    """
    from convscale_cli.config import nested_overrides
    from convscale_cli.plugins import get_registry
    from convscale_cli.tuning import tune_cell

    if size_axis not in ("params", "macs"):
        hint = did_you_mean(size_axis, ("params", "macs"), n=1)
        hint = f"; {hint}" if hint else ""
        raise UsageError(f"--size-axis {size_axis!r} is not one of 'params', 'macs'{hint}")
    options: dict[str, Any] = {"seed": seed, **nested_overrides(set_)}
    if batch_size is not None:
        options["batch_size"] = batch_size
    if resolution is not None:
        options["resolution"] = resolution
    grid_values: bool | list[float] = grid
    if lr_grid is not None:
        if not grid:
            raise UsageError("--lr-grid needs --grid (the two-trial rule picks its own two learning rates)")
        try:
            grid_values = [float(x) for x in lr_grid.split(",") if x.strip()]
        except ValueError:
            grid_values = [math.nan]
        # NaN-safe: float() reads "nan" and "inf" too.
        if not grid_values or not all(math.isfinite(x) and x > 0 for x in grid_values):
            raise UsageError(
                f"--lr-grid {lr_grid!r} is not a comma-separated list of positive numbers, e.g. 1.6,0.8,0.4"
            )
    with progress_to_stderr(json_):
        result = tune_cell(
            model,
            epochs,
            runs,
            dataset=dataset,
            registry=get_registry(),
            options=options,
            grid=grid_values,
            size_axis=size_axis,  # type: ignore[arg-type]
        )
    if json_:
        print_json(result.to_dict())
        return
    print(result.message())
    if result.next_lr is not None:
        command = (
            f"convscale tune-lr --model {result.model} --epochs {result.epochs:g} --runs {runs} --grid "
            f"--lr-grid {result.next_lr:g} --dataset {result.dataset}"
        )
        print(f"Next trial: {command}")
