"""``convscale plan``, ``tune-lr`` and ``sweep``: spend a compute budget well (issue #6).

``plan`` imports neither jax nor numpy in prior mode (it answers in well under a second); ``tune-lr`` and ``sweep``
import the training engine only when they actually train.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from convscale_cli.cli import app
from convscale_cli.cli._output import print_json, print_table
from convscale_cli.errors import UsageError

if TYPE_CHECKING:
    from convscale_cli.planner import DatasetPlan, Plan
    from convscale_cli.registry import Registry


def _dataset_plan(
    registry: Registry, dataset: str | None, dataset_size: int | None, resolution: int | None, num_classes: int | None
) -> DatasetPlan:
    from convscale_cli import planner

    if dataset is None:
        return planner.DatasetPlan(
            name=None,
            size=planner.JFT4B_SIZE if dataset_size is None else dataset_size,
            num_classes=planner.JFT4B_CLASSES if num_classes is None else num_classes,
            resolution=planner.PAPER_RESOLUTION if resolution is None else resolution,
        )
    spec = registry.dataset(dataset)
    info = spec.static_info
    if info is None:
        try:
            info = spec.info()
        except UsageError as exc:
            raise UsageError(
                f"dataset {dataset!r} needs options to report its size ({exc}); pass --dataset-size and --num-classes"
            ) from None
    size = dataset_size if dataset_size is not None else int(info.split_sizes.get("train", 0))
    return planner.DatasetPlan(
        name=spec.name,
        size=size,
        num_classes=num_classes if num_classes is not None else info.num_classes,
        resolution=resolution if resolution is not None else info.resolution,
    )


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
    family: Annotated[str, typer.Option(help="Architecture family of the candidates (nfnet, vit, ...).")] = "nfnet",
    models: Annotated[
        str | None, typer.Option(help="Comma-separated globs restricting the candidates, e.g. 'nfnet-tiny-*'.")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Global batch size (the lr alpha is quoted at 4096).")] = 4096,
    from_: Annotated[
        Path | None,
        typer.Option("--from", help="Runs directory: fit L(N, D) to its finished runs and rank by predicted loss."),
    ] = None,
    top: Annotated[int, typer.Option(help="How many ranked candidates to show.")] = 5,
    json_: Annotated[bool, typer.Option("--json", help="Print the plan as JSON (schema in README).")] = False,
) -> None:
    """Recommend a model, epoch budget and learning-rate trials for a compute budget.

    Prior mode follows the paper's rules (model size and epochs grow together; alpha ~ 1.6 at small epoch budgets,
    falling slowly); with --from it ranks candidates by the loss a scaling law fitted to your runs predicts.
    """
    from convscale_cli import planner
    from convscale_cli.budget import get_hardware, parse_budget
    from convscale_cli.plugins import get_registry

    parsed = parse_budget(budget)
    if mfu is not None and parsed.is_flops and hardware is None:
        raise UsageError(f"--mfu {mfu} has no effect on a FLOP budget without --hardware")
    hw_name = hardware or ("tpu-v4" if parsed.is_flops else parsed.unit)
    hw = get_hardware(hw_name, mfu=mfu)
    registry = get_registry()
    request = planner.PlanRequest(
        budget=parsed,
        hardware=hw,
        dataset=_dataset_plan(registry, dataset, dataset_size, resolution, num_classes),
        family=family,
        batch_size=batch_size,
        models=tuple(p for p in (models or "").split(",") if p.strip()),
        top=top,
    )
    if from_ is not None:
        from convscale_cli.plan_fit import plan_fitted

        result = plan_fitted(request, registry, from_)
    else:
        result = planner.plan_prior(request, registry)
    document = planner.plan_to_dict(result)
    if json_:
        print_json(document)
        return
    _print_plan(result, document)


def _print_plan(plan: Plan, document: dict[str, Any]) -> None:
    from convscale_cli.budget import format_amount

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
        columns.append("pred. loss [interval]")
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
            row.append(f"{c.predicted_loss:.3f} [{low:.3f}, {high:.3f}]{mark}")
        row += [f"{c.lr:g}", f"{c.lr_trials[0]:g}, {c.lr_trials[1]:g}"]
        rows.append(row)
    print_table(None, columns, rows, right=["params", "GMACs", "epochs", "examples", "steps", "% budget"])
    best = plan.recommendation
    print(
        f"\nRecommendation: {best.model} for {_fmt_epochs(best.epochs)} epochs "
        f"({request.budget.format(best.cost)}, {100 * best.cost_fraction:.0f}% of the budget); "
        f"try lr alpha {best.lr_trials[0]:g} and {best.lr_trials[1]:g}, keep the lower held-out loss:"
    )
    for command in document["recommendation"]["commands"]:
        print(f"  {command}")
    if fitted and any(c.extrapolated for c in plan.candidates):
        print("* model size outside the fitted runs' range: the prediction extrapolates")
    for note in document["notes"]:
        print(f"Note: {note}")
